"""`moelab bench layer`: forward+backward of one MoE layer vs a dense SwiGLU of equal active FLOPs.

The dense baseline has width K x expert width, so both do the same matmul FLOPs per token; the ratio
moe/dense is the price of routing + dispatch. transformers' MixtralSparseMoeBlock of the same sizes
is timed in the same loop, once per expert implementation. Variants are interleaved within each
repeat so machine noise hits all of them alike; medians are reported. On CUDA each forward+backward
is timed with CUDA events, after `--warmup` untimed runs, and its peak memory is
`torch.cuda.max_memory_allocated` above what was allocated before it.
"""

from __future__ import annotations

import statistics
import time

from moelab.bench import write_results

# The GPU issue's table: T=16384, D=2048, K*F=4096, bf16 (E:K:F).
PRESETS = {
    "cpu": dict(tokens=8192, d_model=512, shapes=None, dtypes=["float32", "bfloat16"], repeats=5),
    "h200": dict(
        tokens=16384, d_model=2048, shapes=["8:2:2048", "64:8:512", "128:8:512"], dtypes=["bfloat16"], repeats=8
    ),
}


def add_arguments(p):
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="shapes and dtypes of a recorded table (h200: the GPU issue's T=16384, D=2048, K*F=4096 "
        "shapes in bf16); explicit flags override it",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per forward (default 8192)")
    p.add_argument("--d-model", type=int, default=None, help="model width (default 512)")
    p.add_argument("--expert-dim", type=int, default=1024, help="expert width F with --experts (default 1024)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token with --experts (default 2)")
    p.add_argument(
        "--experts",
        type=int,
        nargs="+",
        default=[8, 32, 128],
        help="numbers of experts, each with --top-k and --expert-dim",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        metavar="E:K:F",
        help="MoE shapes as experts:top_k:expert_dim (instead of --experts)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=["auto"],
        help="moelab expert backends to time (auto, cpu_buckets, grouped_mm, reference)",
    )
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=None, help="timed interleaved repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first (default 1)")
    p.add_argument(
        "--hf",
        nargs="*",
        default=["grouped_mm", "eager"],
        help="transformers expert implementations to time (none: --hf with no value)",
    )
    p.add_argument(
        "--hf-max-seconds",
        type=float,
        default=20.0,
        help="skip further repeats of an HF variant whose single run exceeds this",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one forward+backward of each moelab variant (torch.profiler) and "
        "print its top kernels; the tables go into the JSON too",
    )
    p.add_argument("--json", dest="json_out", default="benchmarks/layer.json", help="where to write results")


HF_EAGER_BF16_MAX_EXPERTS = 32
HF_EAGER_BF16_SKIP = (
    f"transformers' eager expert loop under bf16 autocast above {HF_EAGER_BF16_MAX_EXPERTS} experts: "
    "its memory grew past 22 GB at E = 128 here and the process was OOM-killed"
)


def _skip(name: str, dtype: str, device) -> bool:
    if not name.startswith("hf_eager_E") or dtype != "bfloat16" or device.type != "cpu":
        return False
    return int(name.split("_E", 1)[1].split("_")[0]) > HF_EAGER_BF16_MAX_EXPERTS


class Timer:
    """Seconds and peak bytes of one forward+backward: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device):
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        self.torch = torch

    def __call__(self, fn) -> tuple[float, int]:
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0, 0
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated(self.device) - base


def _fwd_bwd(module, x, grad, dtype, device):
    import torch

    def step():
        for p in module.parameters():
            p.grad = None
        xx = x.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            y = module(xx)
            y = y[0] if isinstance(y, tuple) else y
        y.backward(grad)
        for p in module.parameters():  # free now, as an optimizer's zero_grad would before the next step
            p.grad = None

    return step


def _hf_block(e, d, f, k, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        p.data.normal_(0.0, 0.02)
    return block


def _shapes(args) -> list[tuple[int, int, int]]:
    if args.shapes:
        try:
            return [tuple(int(v) for v in s.split(":")) for s in args.shapes]  # type: ignore[misc]
        except ValueError:
            from moelab.errors import UserError

            raise UserError(f"--shapes: expected E:K:F integers like 64:8:512, got {args.shapes}") from None
    return [(e, args.top_k, args.expert_dim) for e in args.experts]


def _resolve(args) -> None:
    preset = PRESETS[args.preset or "cpu"]
    args.tokens = args.tokens or preset["tokens"]
    args.d_model = args.d_model or preset["d_model"]
    args.dtypes = args.dtypes or preset["dtypes"]
    args.repeats = args.repeats or preset["repeats"]
    if args.shapes is None and preset["shapes"] is not None:
        args.shapes = preset["shapes"]


def run(args) -> int:
    import torch

    from moelab.config import MoEConfig
    from moelab.device import resolve_device
    from moelab.model.layers import SwiGLU
    from moelab.model.moe import MoELayer
    from moelab.train.telemetry import measure_matmul_peak

    _resolve(args)
    device = resolve_device(args.device, "--device")
    if args.threads:
        torch.set_num_threads(args.threads)
    t, d = args.tokens, args.d_model
    shapes = _shapes(args)
    try:
        import transformers  # noqa: F401

        hf_impls = list(args.hf)
    except ImportError:
        hf_impls = []
    torch.manual_seed(0)
    x = torch.randn(1, t, d, device=device)
    grad = torch.randn(1, t, d, device=device)
    variants: dict[str, torch.nn.Module] = {}
    dense_of: dict[str, str] = {}
    flops: dict[str, float] = {}  # matmul FLOPs of one forward+backward
    multi = len({k * f for _, k, f in shapes}) > 1
    for e, k, f in shapes:
        dense = f"dense_W{k * f}" if multi else "dense"
        if dense not in variants:
            variants[dense] = SwiGLU(d, k * f)
            flops[dense] = 3 * 2 * t * 3 * d * k * f
        tag = f"E{e}" if not args.shapes else f"E{e}_K{k}_F{f}"
        for backend in args.backends:
            name = f"moelab_{tag}" if args.backends == ["auto"] else f"moelab-{backend}_{tag}"
            variants[name] = MoELayer(d, MoEConfig(num_experts=e, top_k=k, expert_dim=f, expert_backend=backend))
        for impl in hf_impls:
            variants[f"hf_{impl}_{tag}"] = _hf_block(e, d, f, k, impl)
        for name in variants:
            if name not in dense_of and not name.startswith("dense"):
                dense_of[name], flops[name] = dense, flops[dense]
    for mod in variants.values():
        mod.to(device)
        for p in mod.parameters():
            p.data.normal_(0.0, 0.02)

    timer = Timer(device)
    results = {
        "config": {
            "tokens": t,
            "d_model": d,
            "shapes": [list(s) for s in shapes],
            "repeats": args.repeats,
            "warmup": args.warmup,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "method": __doc__.strip().splitlines()[0],
        "median_s": {},
        "ratio_to_dense": {},
        "peak_bytes": {},
        "dense_of": dense_of,
    }
    for dtype in args.dtypes:
        runs = {name: mod for name, mod in variants.items() if not _skip(name, dtype, device)}
        for name in variants.keys() - runs.keys():
            results.setdefault("skipped", {}).setdefault(dtype, {})[name] = HF_EAGER_BF16_SKIP
        times: dict[str, list[float]] = {name: [] for name in runs}
        peaks: dict[str, int] = {name: 0 for name in runs}
        first: dict[str, float] = {}
        for name, mod in runs.items():  # warm-up; a slow variant's first run decides whether it repeats
            for _ in range(args.warmup):
                first[name] = timer(_fwd_bwd(mod, x, grad, dtype, device))[0]
        for rep in range(args.repeats):
            for name, mod in runs.items():
                if name.startswith("hf_") and first[name] > args.hf_max_seconds and times[name]:
                    continue
                s, peak = timer(_fwd_bwd(mod, x, grad, dtype, device))
                times[name].append(s)
                peaks[name] = max(peaks[name], peak)
            print(f"[{dtype}] repeat {rep + 1}/{args.repeats} done", flush=True)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        results["median_s"][dtype] = med
        results["ratio_to_dense"][dtype] = {n: m / med[dense_of.get(n, n)] for n, m in med.items()}
        results["peak_bytes"][dtype] = peaks
        results.setdefault("samples", {})[dtype] = {name: len(ts) for name, ts in times.items()}
        peak = measure_matmul_peak(dtype, str(device), 1.0, n=8192 if device.type == "cuda" else 2048)
        results.setdefault("peak_matmul_flops", {})[dtype] = peak
        results.setdefault("achieved_flops", {})[dtype] = {n: flops[n] / m for n, m in med.items()}
        _print_table(dtype, results, shapes, args, hf_impls)
    results["targets"] = _targets(results, shapes, args, device)
    if args.profile:
        results["profiles"] = {
            name: _profile(mod, x, grad, args.dtypes[-1], device)
            for name, mod in variants.items()
            if name.startswith(("moelab", "dense"))
        }
    write_results(args.json_out, results)
    return 0


def _profile(module, x, grad, dtype, device, rows: int = 18) -> str:
    """torch.profiler's table of one forward+backward, sorted by device (or CPU) time."""
    from moelab.bench.profiling import profile_call

    step = _fwd_bwd(module, x, grad, dtype, device)
    step()
    table = profile_call(step, device, rows)["table"]
    print(table, flush=True)
    return table


GPU_TARGETS = {8: 1.3, 64: 1.6, 128: 2.0}  # moe/dense on one H200 in bf16 (the GPU issue)


def _targets(results, shapes, args, device) -> dict:
    out = {}
    for dtype in args.dtypes:
        ratio, med = results["ratio_to_dense"][dtype], results["median_s"][dtype]
        moe = {n: r for n, r in ratio.items() if n.startswith("moelab")}
        if device.type == "cuda":
            out[dtype] = {
                f"{n}: moe/dense <= {GPU_TARGETS[e]}": r
                for n, r in moe.items()
                for e in [int(n.split("_E", 1)[1].split("_")[0])]
                if e in GPU_TARGETS
            }
        elif not args.shapes:
            e_lo, e_hi = min(args.experts), max(args.experts)
            name = "moelab" if args.backends == ["auto"] else f"moelab-{args.backends[0]}"
            out[dtype] = {
                f"moe/dense at E={e_lo} <= 1.2": ratio[f"{name}_E{e_lo}"],
                f"time(E={e_hi})/time(E={e_lo}) <= 1.25": med[f"{name}_E{e_hi}"] / med[f"{name}_E{e_lo}"],
            }
    return out


def _print_table(dtype, results, shapes, args, hf_impls):
    med, ratio = results["median_s"][dtype], results["ratio_to_dense"][dtype]
    peak, achieved = results["peak_matmul_flops"][dtype], results["achieved_flops"][dtype]
    print(
        f"\n{dtype}: median fwd+bwd ms, ratio to the dense SwiGLU of equal active FLOPs, % of the measured "
        f"{peak / 1e12:.1f} TFLOP/s matmul peak"
    )
    for name in med:
        mem = results["peak_bytes"][dtype].get(name, 0)
        mem_s = f"  {mem / 2**30:6.2f} GiB" if mem else ""
        pct = 100 * achieved[name] / peak
        print(f"  {name:34s} {1e3 * med[name]:9.2f} ms  {ratio[name]:5.2f}x  {pct:5.1f}%{mem_s}")
