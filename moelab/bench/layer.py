"""`moelab bench layer`: forward+backward of one MoE layer vs a dense SwiGLU of equal active FLOPs.

The dense baseline has width K x expert width, so both do the same matmul FLOPs per token; the ratio
moe/dense is the price of routing + dispatch. transformers' MixtralSparseMoeBlock of the same sizes
is timed in the same loop, once per expert implementation. Variants are interleaved within each
repeat so machine noise hits all of them alike; medians are reported.
"""

from __future__ import annotations

import statistics
import time

from moelab.bench import write_results


def add_arguments(p):
    p.add_argument("--tokens", type=int, default=8192, help="tokens per forward (default 8192)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--expert-dim", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128], help="numbers of experts")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median reported)")
    p.add_argument("--hf", nargs="*", default=["grouped_mm", "eager"],
                   help="transformers expert implementations to time (none: --hf with no value)")
    p.add_argument("--hf-max-seconds", type=float, default=20.0,
                   help="skip further repeats of an HF variant whose single run exceeds this")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", dest="json_out", default="benchmarks/layer.json", help="where to write results")


HF_EAGER_BF16_MAX_EXPERTS = 32
HF_EAGER_BF16_SKIP = (f"transformers' eager expert loop under bf16 autocast above {HF_EAGER_BF16_MAX_EXPERTS} experts: "
                      "its memory grew past 22 GB at E = 128 here and the process was OOM-killed")


def _skip(name: str, dtype: str) -> bool:
    if not name.startswith("hf_eager_E") or dtype != "bfloat16":
        return False
    return int(name.rsplit("_E", 1)[1]) > HF_EAGER_BF16_MAX_EXPERTS


def _time_fwd_bwd(module, x, grad, dtype) -> float:
    import torch

    for p in module.parameters():
        p.grad = None
    xx = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        y = module(xx)
        y = y[0] if isinstance(y, tuple) else y
    y.backward(grad)
    elapsed = time.perf_counter() - t0
    for p in module.parameters():  # free now, as an optimizer's zero_grad would before the next step
        p.grad = None
    return elapsed


def _hf_block(e, d, f, k, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        p.data.normal_(0.0, 0.02)
    return block


def run(args) -> int:
    import torch

    from moelab.config import MoEConfig
    from moelab.model.layers import SwiGLU
    from moelab.model.moe import MoELayer

    if args.threads:
        torch.set_num_threads(args.threads)
    t, d, f, k = args.tokens, args.d_model, args.expert_dim, args.top_k
    try:
        import transformers  # noqa: F401

        hf_impls = list(args.hf)
    except ImportError:
        hf_impls = []
    torch.manual_seed(0)
    x = torch.randn(1, t, d)
    grad = torch.randn(1, t, d)
    variants: dict[str, torch.nn.Module] = {"dense": SwiGLU(d, k * f)}
    for p in variants["dense"].parameters():
        p.data.normal_(0.0, 0.02)
    for e in args.experts:
        moe = MoELayer(d, MoEConfig(num_experts=e, top_k=k, expert_dim=f))
        for p in moe.parameters():
            p.data.normal_(0.0, 0.02)
        variants[f"moelab_E{e}"] = moe
        for impl in hf_impls:
            variants[f"hf_{impl}_E{e}"] = _hf_block(e, d, f, k, impl)

    results = {"config": {"tokens": t, "d_model": d, "expert_dim": f, "top_k": k, "experts": args.experts,
                          "repeats": args.repeats, "threads": torch.get_num_threads(),
                          "torch": torch.__version__}, "median_s": {}, "ratio_to_dense": {}}
    for dtype in args.dtypes:
        runs = {name: mod for name, mod in variants.items() if not _skip(name, dtype)}
        for name in variants.keys() - runs.keys():
            results.setdefault("skipped", {}).setdefault(dtype, {})[name] = HF_EAGER_BF16_SKIP
        times: dict[str, list[float]] = {name: [] for name in runs}
        for name, mod in runs.items():  # warm-up, and measure slow variants once
            times[name].append(_time_fwd_bwd(mod, x, grad, dtype))
        for rep in range(args.repeats - 1):
            for name, mod in runs.items():
                if name.startswith("hf_") and times[name][0] > args.hf_max_seconds:
                    continue
                times[name].append(_time_fwd_bwd(mod, x, grad, dtype))
            print(f"[{dtype}] repeat {rep + 2}/{args.repeats} done", flush=True)
        med = {name: statistics.median(ts[1:] if len(ts) > 1 else ts) for name, ts in times.items()}
        results["median_s"][dtype] = med
        results["ratio_to_dense"][dtype] = {name: m / med["dense"] for name, m in med.items()}
        results.setdefault("samples", {})[dtype] = {name: len(ts) for name, ts in times.items()}
        _print_table(dtype, med, args.experts, hf_impls)
    e_lo, e_hi = min(args.experts), max(args.experts)
    results["targets"] = {
        dtype: {
            f"moe/dense at E={e_lo} <= 1.2": results["ratio_to_dense"][dtype][f"moelab_E{e_lo}"],
            f"time(E={e_hi})/time(E={e_lo}) <= 1.25":
                results["median_s"][dtype][f"moelab_E{e_hi}"] / results["median_s"][dtype][f"moelab_E{e_lo}"],
        } for dtype in args.dtypes
    }
    write_results(args.json_out, results)
    return 0


def _print_table(dtype, med, experts, hf_impls):
    print(f"\n{dtype}: median fwd+bwd seconds (ratio to dense {med['dense']:.3f}s)")
    cols = ["moelab", *(f"hf_{i}" for i in hf_impls)]
    print("  E     " + "".join(f"{c:>22}" for c in cols))
    for e in experts:
        cells = []
        for c in cols:
            m = med.get(f"{c}_E{e}")
            cells.append(f"{m:9.3f}s ({m / med['dense']:5.2f}x)" if m is not None else "-")
        print(f"  {e:<6}" + "".join(f"{c:>22}" for c in cells))
