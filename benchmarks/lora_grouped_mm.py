"""LoRA on the `grouped_mm` expert backend, before and after it moved onto the split gate/up SwiGLU.

before: the removed path (one [N, 2F] product for gate|up, LoRA deltas added to it, `_WeightedSwiGLU`
        over the strided halves, autograd for everything else), inlined below as it was;
after:  `grouped_mm._GroupedSwiGLU` with the deltas as grouped matmuls and a hand-written backward.
Both run through `GroupedMMBackend.moe` (the module-level `grouped_swiglu_mm` is swapped), base weights
frozen as in a LoRA run, rank 8 (the old path crashed below 4 in fp32 / 8 in bf16). Forward + backward,
median of interleaved repeats (one thread on a CPU). A measurement aid, not part of the package.
Usage: OMP_NUM_THREADS=1 python benchmarks/lora_grouped_mm.py [--reps 7] [--device cuda] [--out FILE.json]"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import moelab.kernels.grouped_mm as gm
from moelab.kernels.lora import ExpertLoRA


class _WeightedSwiGLU(torch.autograd.Function):  # as removed from grouped_mm.py
    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        f = h.shape[-1] // 2
        return F.silu(h[:, :f]) * h[:, f:] * w.to(h.dtype)[:, None]

    @staticmethod
    def backward(ctx, da):
        h, w = ctx.saved_tensors
        f = h.shape[-1] // 2
        g, u = h[:, :f], h[:, f:]
        act = F.silu(g) * u
        dw = (act * da).sum(-1, dtype=torch.float32).to(w.dtype)
        da = da * w.to(da.dtype)[:, None]
        dh = torch.cat([torch.ops.aten.silu_backward(da * u, g), da * F.silu(g)], dim=-1)
        return dh, dw


def _old_delta(x, a, b, lora, offs):
    t = torch._grouped_mm(lora.drop(x), a.transpose(1, 2), offs=offs)
    return torch._grouped_mm(t, b.transpose(1, 2), offs=offs) * lora.scale


def old_grouped_swiglu_mm(x_sorted, gate_up, down, offs, row_weights=None, lora=None, row_adapter=None):
    assert lora is not None and row_adapter is None
    h = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offs)
    h = h + _old_delta(x_sorted, lora.gu_a, lora.gu_b, lora, offs)
    a = _WeightedSwiGLU.apply(h, row_weights)
    y = torch._grouped_mm(a, down.transpose(1, 2), offs=offs)
    return y + _old_delta(a, lora.dn_a, lora.dn_b, lora, offs)


NEW = gm.grouped_swiglu_mm


def case(t, e, k, d, f, r, dtype, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(dev)
    w = torch.rand(t, k, generator=g).to(dev)
    x = torch.randn(t, d, generator=g).to(dev, dtype).requires_grad_(True)
    base = [
        (torch.randn(e, 2 * f, d, generator=g) * 0.05).to(dev, dtype),
        (torch.randn(e, d, f, generator=g) * 0.05).to(dev, dtype),
    ]
    shapes = ((e, r, d), (e, 2 * f, r), (e, r, f), (e, d, r))
    ab = [(torch.randn(*s, generator=g) * 0.05).to(dev, dtype).requires_grad_(True) for s in shapes]
    return ids, w, x, base, ab


def step(fn, ids, w, x, base, ab) -> float:
    gm.grouped_swiglu_mm = fn
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    y = gm.GroupedMMBackend(1).moe(x, *base, ids, w, None, lora=ExpertLoRA(*ab, scale=2.0))
    y.sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    for p in (x, *ab):
        p.grad = None
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    shapes = [(2048, 8, 2, 256, 512), (2048, 32, 4, 256, 128)]
    for dtype in (torch.float32, torch.bfloat16):
        for t, e, k, d, f in shapes:
            data = case(t, e, k, d, f, 8, dtype, args.device)
            for fn in (old_grouped_swiglu_mm, NEW, old_grouped_swiglu_mm, NEW):  # warm-up both
                step(fn, *data)
            times: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(args.reps):  # interleaved, so load on the machine hits both alike
                times["before"].append(step(old_grouped_swiglu_mm, *data))
                times["after"].append(step(NEW, *data))
            med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
            row = {
                "dtype": str(dtype).removeprefix("torch."),
                "T": t, "E": e, "K": k, "D": d, "F": f, "r": 8,
                "before_ms": round(med["before"], 2),
                "after_ms": round(med["after"], 2),
                "after/before": round(med["after"] / med["before"], 3),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    gm.grouped_swiglu_mm = NEW
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"reps": args.reps, "device": args.device, "threads": 1, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
