"""`moelab bench train`: training throughput (tokens/s), MFU and peak RSS, moelab vs transformers.

Every measurement runs in its own process (`train_worker.py`): the trainer's real optimizer step on
Zipf-distributed synthetic tokens in memory, a few warm-up steps, then the median of the timed steps.
Variants (implementation x dtype) are interleaved round by round, so machine noise hits all of them
alike; the reported value is the median over rounds, and ratios compare medians of the same run.
MFU = tokens/s x training FLOPs per token (`moelab info`) / a 2048^3 (CPU) or 8192^3 (GPU) matmul's
FLOP/s in the same dtype on the same device, measured in this process at start. On a GPU, step times
are taken after `torch.cuda.synchronize` and memory is `torch.cuda.max_memory_allocated` (the
`peak_rss_bytes` field then holds GPU bytes, named in `memory`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from moelab.bench import write_results

TARGETS = {"tiny": 1.3, "tiny-fine": 2.0, "gpu-coarse": 1.5, "gpu-fine": 3.0}  # moelab / transformers tok/s targets
PRESETS = {
    "h200": dict(config=["gpu-coarse", "gpu-fine"], dtypes=["bfloat16"], compare="hf", steps=8, warmup=3, repeats=1)
}


def add_arguments(p):
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="h200: the GPU issue's whole-model table (gpu-coarse, gpu-fine; bf16; vs transformers)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--config",
        nargs="+",
        default=["tiny"],
        help="preset names in configs/ or YAML paths (default tiny; e.g. tiny tiny-fine)",
    )
    p.add_argument("--compare", choices=["hf"], default=None, help="also train transformers' Mixtral of the same shape")
    p.add_argument(
        "--twin",
        action="store_true",
        help="also measure each MoE config's dense twin (every MoE FFN replaced by a SwiGLU of the active width: "
        "equal active parameters) and report MoE / dense step time, wall clock and process CPU time",
    )
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=6, help="timed steps per round (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported; default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every variant, e.g. --set train.batch_size=4",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one more step of each variant in the first round (torch.profiler): the top "
        "operators or kernels, and on a GPU the kernel count and device-busy time against the step's wall time "
        "(host-bound when far below); printed and kept in the JSON under each variant's `profile`",
    )
    p.add_argument("--json", dest="json_out", default="benchmarks/train.json", help="where to write results")


def config_path(name: str) -> Path:
    from moelab.presets import preset_path

    return preset_path(name)


def dense_twin(cfg):
    """The dense twin of the Config `cfg` (`quality_setup.dense_twin`: the same one `bench quality` trains)."""
    import dataclasses

    from moelab.bench import quality_setup
    from moelab.config import load_config

    return load_config(quality_setup.dense_twin(dataclasses.asdict(cfg)))


def run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "moelab.bench.train_worker", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({spec.get('impl')}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> int:
    import dataclasses

    from moelab.config import load_config
    from moelab.errors import UserError
    from moelab.model.counting import flops_per_token
    from moelab.train.telemetry import measure_matmul_peak

    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    from moelab.device import resolve_device

    device = resolve_device(args.device, "--device")
    impls = ["moelab"] + (["hf"] if args.compare == "hf" else [])
    if args.compare == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--compare hf needs transformers (pip install -e '.[interop]')") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    n = 8192 if device.type == "cuda" else 2048
    peaks = {dt: measure_matmul_peak(dt, str(device), 2.0, n=n) for dt in args.dtypes}
    results: dict = {
        "peak_matmul_flops": peaks,
        "configs": {},
        "method": __doc__.strip().splitlines()[0],
        "device": str(device),
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "RSS",
    }
    cfgs = {
        name: load_config(
            config_path(name),
            [
                *args.overrides,
                "data.path=null",
                "log.progress=false",
                "train.peak_flops=0",  # the bench computes MFU itself, against its measured peak
                "checkpoint.every=0",
                f"train.device={device}",
            ],
        )
        for name in args.config
    }
    if args.twin:
        moe_cfgs = {name: cfg for name, cfg in cfgs.items() if cfg.model.moe_layer_ids()}
        cfgs.update({f"{Path(name).stem}-twin": dense_twin(cfg) for name, cfg in moe_cfgs.items()})
    # every config's variants in each round (not config after config): a MoE and its dense twin then see
    # the same machine load, which is what their ratio needs on a shared machine
    all_runs: dict[str, dict[str, list[dict]]] = {name: {} for name in cfgs}
    for rep in range(args.repeats):
        for name, cfg in cfgs.items():
            for dtype in args.dtypes:
                for impl in impls:
                    variant = dataclasses.asdict(cfg)
                    variant["train"]["dtype"] = dtype
                    spec = {
                        "impl": impl,
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "threads": args.threads,
                        "config": variant,
                        "profile": args.profile and rep == 0,
                    }
                    r = run_worker(spec)
                    all_runs[name].setdefault(f"{impl}/{dtype}", []).append(r)
                    if "profile" in r:
                        _print_profile(f"{name} {impl}/{dtype}", r["profile"])
                    print(
                        f"[{name} round {rep + 1}/{args.repeats}] {impl:6s} {dtype:8s} "
                        f"{r['tokens_per_s']:8.0f} tok/s  memory {r['peak_rss_bytes'] / 2**20:6.0f} MiB",
                        flush=True,
                    )
    for name, cfg in cfgs.items():
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)["train"]
        runs = all_runs[name]
        summary = {}
        for key, rs in runs.items():
            dtype = key.split("/")[1]
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            summary[key] = {
                "impl": rs[0]["impl"],
                "tokens_per_s": tps,
                "mfu": tps * fpt / peaks[dtype],
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                "rounds_tokens_per_s": [r["tokens_per_s"] for r in rs],
                "threads": rs[0]["threads"],
            }
            if "profile" in rs[0]:
                summary[key]["profile"] = rs[0]["profile"]
        ratios = {}
        if "hf" in impls:
            for dtype in args.dtypes:
                ours, theirs = summary[f"moelab/{dtype}"], summary[f"hf/{dtype}"]
                ratios[dtype] = {
                    "speed_moelab_over_hf": ours["tokens_per_s"] / theirs["tokens_per_s"],
                    "rss_moelab_over_hf": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
                }
        results["configs"][name] = {
            "flops_per_token_train": fpt,
            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum,
            "variants": summary,
            "ratios": ratios,
            "target_speed_ratio": TARGETS.get(Path(name).stem),
        }
        _print_table(name, summary, ratios, TARGETS.get(Path(name).stem))
    results["moe_over_dense"] = _dense_twins(results["configs"], all_runs)
    write_results(args.json_out, results)
    return 0


def _dense_twins(configs: dict, all_runs: dict) -> dict:
    """For each config X measured with its dense twin X-dense (same active FLOPs): step-time ratio MoE /
    dense per dtype, the ratio of medians and the median of per-round ratios (rounds ran side by side)."""
    out = {}
    for name in configs:
        twin = next((t for t in (f"{Path(name).stem}-twin", f"{Path(name).stem}-dense") if t in configs), None)
        if twin is None:
            continue
        for key, rs in all_runs[name].items():
            if key.startswith("moelab/") and key in all_runs[twin]:
                moe = [r["tokens_per_s"] for r in rs]
                dense = [r["tokens_per_s"] for r in all_runs[twin][key]]
                per_round = [d / m for m, d in zip(moe, dense, strict=False)]
                cpu_m = [r["cpu_step_s"] for r in rs]
                cpu_d = [r["cpu_step_s"] for r in all_runs[twin][key]]
                r = {
                    "step_time_ratio": statistics.median(dense) / statistics.median(moe),
                    "median_round_ratio": statistics.median(per_round),
                    "rounds": per_round,
                    "cpu_time_ratio": statistics.median(cpu_m) / statistics.median(cpu_d),
                    "cpu_rounds": [m / d for m, d in zip(cpu_m, cpu_d, strict=False)],
                }
                out[f"{name}/{key.split('/')[1]}"] = r
                cpu = r["cpu_rounds"]
                print(
                    f"{name} vs {twin} ({key.split('/')[1]}): MoE / dense step time {r['step_time_ratio']:.3f} wall "
                    f"(median of per-round ratios {r['median_round_ratio']:.3f}), {r['cpu_time_ratio']:.3f} process "
                    f"CPU time (per round {min(cpu):.3f}-{max(cpu):.3f})"
                )
    return out


def _print_profile(label: str, prof: dict) -> None:
    print(f"\n[{label}] one profiled step: {prof['wall_s'] * 1e3:.1f} ms wall", end="")
    if "device_busy_s" in prof:
        busy = prof["device_busy_s"] / prof["wall_s"]
        print(
            f", device busy {prof['device_busy_s'] * 1e3:.1f} ms ({100 * busy:.0f}%), {prof['kernels']} kernels", end=""
        )
    print(f"\n{prof['table']}", flush=True)


def _print_table(name: str, summary: dict, ratios: dict, target: float | None) -> None:
    print(f"\n{name}: median over rounds")
    print(f"  {'variant':18s} {'tokens/s':>10s} {'MFU':>6s} {'peak mem':>10s}  implementation")
    for key, s in summary.items():
        print(
            f"  {key:18s} {s['tokens_per_s']:10.0f} {100 * s['mfu']:5.1f}% {s['peak_rss_bytes'] / 2**20:7.0f} MiB  "
            f"{s['impl']}"
        )
    for dtype, r in ratios.items():
        goal = f" (target >= {target}x)" if target else ""
        print(
            f"  {dtype}: moelab / transformers speed {r['speed_moelab_over_hf']:.2f}x{goal}, "
            f"peak memory {r['rss_moelab_over_hf']:.2f}x (target <= 0.8x CPU RSS, <= 0.7x GPU)"
        )
