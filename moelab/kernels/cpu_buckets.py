"""`cpu_buckets`: the CPU expert kernel. Host-planned sort dispatch, then active experts grouped into
buckets of similar load, each bucket one `bmm`.

Legend: T tokens, D model width, E experts, K experts per token, F expert width, N rows sent to
the experts (sorted by expert; see `sort_dispatch.py`), C rows per expert inside one bucket.

Why buckets: a CPU matmul call has a fixed cost (~50 us for a bf16 call on this project's 2-core
machine, before its first FLOP), so one call per expert and matmul was most of a fine-grained layer's
time (E = 64, 128 rows each: a loop of mm 7.2 ms, one bmm 1.7 ms); padding costs FLOPs instead, and
the bucketing (`best_runs`, from the costs in `MatmulCosts`) trades the two. The backend plans the
buckets before the sort (`plan_layout`): dispatch then writes x_sorted bucket by bucket, each expert's
block padded to its bucket's rows, so every bucket is one contiguous [E_b, C, D] run used in place and
no row is gathered twice (with gathers priced in, fine-grained experts had each run alone: 32 buckets
of 6 bmm per layer at 32 x 64 top-8, 13-16 now). Rows sorted by someone else (expert parallelism,
offload: `grouped_swiglu`) keep expert order, and buckets of unequal neighbours gather. Weight gradients
are written into one [E, ...] buffer (indexing `w[e]` under autograd would allocate a full-size zero
gradient per slice, so cost would grow with E), in the compute dtype, then cast once. Under autocast
only active experts' weights are cast, once per forward, and backward reuses the casts.

Why a row grid (`row_grid`): CPU bf16 matmuls run on oneDNN, which JIT-builds a kernel for every new
shape (counted with ONEDNN_VERBOSE: creating kernels took longer than running them when row counts
changed every step and every expert; bf16 expert matmuls ran at ~100 GFLOP/s instead of ~800).
Rounding each expert's rows up to a grid (multiples of 32 up to 1024, then coarser, see `_grid`) keeps
the kernels in oneDNN's cache; bmm batch sizes are kept to powers of two for the same reason. fp32
runs on MKL, which has no such cost, so fp32 does not pad.

Why the routing weights go in between the two matmuls (a = silu(g) * u * w, as `grouped_mm` does): the
combine is then a plain sum of each token's K rows (`sort_dispatch.sum_rows`), and d w is a dot over F
per row instead of over D on [T, K, D] fp32 products; combine forward + backward was ~9 ms of a ~50 ms
layer at 32 x 64 top-8 (2048 tokens, fp32, 1 thread).

Decoding (no autograd, at most `FEW_TOKENS` tokens) skips all of this: `few_tokens.py`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moelab.kernels.buckets import Bucket, MatmulCosts, _rows, _weights, plan_buckets, plan_layout
from moelab.kernels.common import compute_dtype, with_zero_row
from moelab.kernels.few_tokens import few_tokens_moe
from moelab.kernels.lora_buckets import lora_grouped_swiglu
from moelab.kernels.sort_dispatch import combine, dispatch, plan_dispatch, row_weights, sum_rows

# Up to this many tokens without autograd (decoding), experts run straight from their stacked weights:
# the sort dispatch's fixed cost is most of a decode step's MoE time there.
FEW_TOKENS = 8


def _grid(limit: int = 1 << 22) -> list[int]:
    # Multiples of 32 up to 1024 rows, 64 up to 2048, then steps of 2^(1/8): a training step's experts hold
    # T K / E rows each (~512 on `tiny`), where steps of 2^(1/4) padded 12-19% of the expert FLOPs; the rows
    # of a run stay in a narrow band, so oneDNN still sees a handful of shapes.
    sizes = list(range(32, 1025, 32)) + list(range(1088, 2049, 64))
    while sizes[-1] < limit:
        sizes.append(64 * math.ceil(sizes[-1] * 2**0.125 / 64))
    return sizes


_GRID = _grid()


def grid_rows(c: int) -> int:
    """The smallest grid size >= c (0 stays 0): at most 31 rows of padding up to 1024 rows, 63 up to
    2048, 9% above."""
    return _GRID[bisect.bisect_left(_GRID, c)] if c else 0


def row_grid(dtype: torch.dtype, device: torch.device) -> Callable[[int], int] | None:
    """How expert blocks are padded for this compute dtype (see the module docstring); None = not."""
    return grid_rows if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else None


def _bmm_rows(out: torch.Tensor, b: Bucket, a: torch.Tensor, w: torch.Tensor, binary: bool) -> None:
    """out [N + 1, D] (row N a dump for padding) <- a @ w ([E_b, C, D]) at this bucket's rows."""
    n = a.shape[0]
    if b.index is None:  # straight into place
        assert b.first_row is not None
        _bmm(a, w, binary, out[b.first_row : b.first_row + n * b.rows].view(n, b.rows, -1))
    else:
        out.index_copy_(0, b.index, _bmm(a, w, binary).view(n * b.rows, -1))


def _put_rows(out: torch.Tensor, b: Bucket, v: torch.Tensor) -> None:
    """out [N + 1, ...] <- v ([E_b, C, ...]) at this bucket's rows (row N a dump for padding)."""
    if b.index is None:
        assert b.first_row is not None
        out[b.first_row : b.first_row + v.shape[0] * b.rows] = v.reshape(-1, *out.shape[1:])
    else:
        out.index_copy_(0, b.index, v.reshape(-1, *out.shape[1:]))


def _bmm_weights(buf: torch.Tensor, b: Bucket, a: torch.Tensor, w: torch.Tensor, binary: bool) -> None:
    """buf [E, ...] <- a @ w at the bucket's experts: written in place when they are a contiguous range."""
    e0, e1 = b.experts[0], b.experts[-1] + 1
    if e1 - e0 == len(b.experts):
        _bmm(a, w, binary, buf[e0:e1])
    else:
        buf.index_copy_(0, torch.tensor(b.experts, device=buf.device), _bmm(a, w, binary))


def _bmm(a: torch.Tensor, b: torch.Tensor, binary: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.bmm, over power-of-two batch chunks when `binary` (see `plan_buckets`)."""
    n = a.shape[0]
    if not binary or n & (n - 1) == 0:
        return torch.bmm(a, b, out=out)
    if out is None:
        out = a.new_empty(n, a.shape[1], b.shape[2])
    start = 0
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            torch.bmm(a[start : start + (1 << bit)], b[start : start + (1 << bit)], out=out[start : start + (1 << bit)])
            start += 1 << bit
    return out


def _swiglu_grads(da: torch.Tensor, h: torch.Tensor, silu_g: torch.Tensor) -> torch.Tensor:
    """d h [..., 2F] from d a, for a = silu(g) * u with h = [g | u]: d g = silu'(g) * da * u (aten's
    fused silu_backward), d u = da * silu(g) (`silu_g`, kept from forward). Overwrites da."""
    f = h.shape[-1] // 2
    g, u = h[..., :f], h[..., f:]
    dh = torch.empty_like(h)
    torch.mul(da, silu_g, out=dh[..., f:])
    torch.ops.aten.silu_backward(da.mul_(u), g, grad_input=dh[..., :f])  # da is this bucket's own buffer
    return dh


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, buckets: list[Bucket], dtype: torch.dtype, row_w=None):
        with torch.autocast(x.device.type, enabled=False):
            return _GroupedSwiGLU._forward(ctx, x, gate_up, down, buckets, dtype, row_w)

    @staticmethod
    def _forward(ctx, x, gate_up, down, buckets, dtype, row_w):
        n, f = x.shape[0], down.shape[-1]
        binary = row_grid(dtype, x.device) is not None  # shapes from a small set (oneDNN kernel cache)
        gathered = any(b.index is not None for b in buckets)
        x_pad = with_zero_row(x) if gathered else None
        w_col = None if row_w is None else row_w.to(dtype)[:, None]  # [N, 1]
        w_pad = with_zero_row(w_col) if w_col is not None and gathered else None
        y = x.new_empty(n + 1, down.shape[1])
        saved = []
        need_x, need_gu, need_dn, _, _, need_w = ctx.needs_input_grad
        for b in buckets:
            xb = _rows(x, x_pad, b)  # [E_b, C, D]
            w_gu, w_dn = _weights(gate_up, b, dtype), _weights(down, b, dtype)
            h = _bmm(xb, w_gu.transpose(1, 2), binary)  # [E_b, C, 2F] gate|up pre-activations
            silu_g = F.silu(h[..., :f])
            a = silu_g * h[..., f:]  # [E_b, C, F]
            wb = None if w_col is None else _rows(w_col, w_pad, b)  # [E_b, C, 1] routing weights
            a_w = a if wb is None else a * wb
            _bmm_rows(y, b, a_w, w_dn.transpose(1, 2), binary)
            # keep only what backward will read: xb for d gate_up, w_gu for dx, a for d down and d w (a * w is
            # formed again in backward: keeping it too was [N, F] more, above the [T, K, D] the old combine kept
            # when F > D); frozen experts, and layer 0 of router-only tuning where x needs no gradient, free them.
            # silu(g) and a are kept, not recomputed: [N, 2F] more, as much as a dense SwiGLU of equal
            # active width keeps for its backward, and recomputing them was ~5% of a bf16 MoE layer.
            saved.append(
                (
                    xb if need_gu else None,
                    h,
                    silu_g if need_x or need_gu else None,
                    a if need_dn or need_w else None,
                    w_gu if need_x else None,
                    w_dn,
                    wb,
                )
            )
        ctx.buckets, ctx.saved, ctx.dtype, ctx.binary = buckets, saved, dtype, binary
        ctx.w_dtype = None if row_w is None else row_w.dtype
        ctx.shapes = (gate_up.shape, down.shape, gate_up.dtype, down.dtype)
        return y.resize_(n, y.shape[1])  # drop the dump row in place: a view would trip FSDP2's hooks

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _GroupedSwiGLU._backward(ctx, dy.to(ctx.dtype).contiguous())

    @staticmethod
    def _backward(ctx, dy):
        # Only the gradients autograd asks for: with frozen experts (LoRA on other weights, router-only
        # tuning) the two weight-gradient bmms per bucket were a third of the backward's FLOPs, and
        # their [E, ...] buffers as large as the weights, all thrown away.
        need_x, need_gu, need_dn = ctx.needs_input_grad[:3]
        need_w = ctx.needs_input_grad[5]
        gu_shape, dn_shape, gu_dtype, dn_dtype = ctx.shapes
        n = dy.shape[0]
        buckets = ctx.buckets
        dy_pad = with_zero_row(dy) if any(b.index is not None for b in buckets) else None
        dx = dy.new_empty(n + 1, gu_shape[-1]) if need_x else None
        d_gate_up = dy.new_empty(gu_shape) if need_gu else None
        d_down = dy.new_empty(dn_shape) if need_dn else None
        d_w = dy.new_empty(n + 1, 1, dtype=torch.float32) if need_w else None  # row N: the dump for padding
        busy = {e for b in buckets for e in b.experts}
        for e in range(gu_shape[0]):
            if e not in busy:  # idle experts get zero gradients
                for d in (d_gate_up, d_down):
                    if d is not None:
                        d[e].zero_()
        binary = ctx.binary
        for b, (xb, h, silu_g, a, w_gu, w_dn, wb) in zip(buckets, ctx.saved, strict=True):
            dyb = _rows(dy, dy_pad, b)  # [E_b, C, D]
            if d_down is not None:
                a_w = a if wb is None else a * wb
                _bmm_weights(d_down, b, dyb.transpose(1, 2), a_w, binary)  # [E_b, D, F]
                del a_w
            if dx is None and d_gate_up is None and d_w is None:
                continue
            da = _bmm(dyb, w_dn, binary)  # [E_b, C, F]: d (a * w)
            if d_w is not None:
                # d w = <d (a w), a> over F, summed in fp32 (the router's gradient; bf16 products are fine)
                _put_rows(d_w, b, (da * a).sum(-1, keepdim=True, dtype=torch.float32))
            if dx is None and d_gate_up is None:
                continue
            if wb is not None:
                da.mul_(wb)
            dh = _swiglu_grads(da, h, silu_g)
            if dx is not None:
                _bmm_rows(dx, b, dh, w_gu, binary)  # [E_b, C, D]
            if d_gate_up is not None:
                _bmm_weights(d_gate_up, b, dh.transpose(1, 2), xb, binary)  # [E_b, 2F, D]
        ctx.saved = None
        return (
            None if dx is None else dx[:n],
            None if d_gate_up is None else d_gate_up.to(gu_dtype),
            None if d_down is None else d_down.to(dn_dtype),
            None,
            None,
            None if d_w is None else d_w[:n, 0].to(ctx.w_dtype),
        )


def _costs(dtype: torch.dtype, x: torch.Tensor, down: torch.Tensor) -> tuple[float, float, float]:
    return MatmulCosts.of(dtype, x.device).in_rows(down.shape[1], down.shape[-1], torch.finfo(dtype).bits // 8)


def grouped_swiglu(
    x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """Run each expert on its contiguous block of rows; rows must be sorted by expert (`counts` rows
    each, in expert order): buckets of several experts gather their rows."""
    dtype = x_sorted.dtype
    binary = row_grid(dtype, x_sorted.device) is not None
    buckets = plan_buckets(counts, *_costs(dtype, x_sorted, down), device=x_sorted.device, binary=binary)
    return _GroupedSwiGLU.apply(x_sorted, gate_up, down, buckets, dtype, None)


def _layout(dtype: torch.dtype, x: torch.Tensor, down: torch.Tensor) -> Callable[[list[int]], list[Bucket]]:
    """`plan_dispatch(layout=...)` for the bucketed experts: row-grid rounding (bf16), then buckets laid
    out in place (`plan_layout`); the plan keeps them as `DispatchPlan.layout`."""
    grid = row_grid(dtype, x.device)
    call, gather_expert, _ = _costs(dtype, x, down)

    def layout(counts: list[int]) -> list[Bucket]:
        if grid is not None:
            counts = [grid(c) for c in counts]
        return plan_layout(counts, call, gather_expert, binary=grid is not None)

    return layout


class CpuBucketsBackend:
    """`moe.expert_backend: cpu_buckets` (the default on CPU)."""

    name = "cpu_buckets"

    def moe(self, x, gate_up, down, topk_ids, weights, keep=None, lora=None):
        """x [T, D] -> [T, D] fp32, the routed experts' weighted sum per token; `lora`: optional
        low-rank expert deltas (`kernels/lora.py`), run bucket by bucket like the base weights."""
        if lora is not None:
            return self._moe_lora(x, gate_up, down, topk_ids, weights, keep, lora)
        if not torch.is_grad_enabled() and (torch.compiler.is_compiling() or x.shape[0] <= FEW_TOKENS):
            # A compiled decode step runs it as one opaque operator, at any batch size: the sort
            # dispatch reads expert counts on the host, which would break the graph.
            run = torch.ops.moelab.few_tokens_moe if torch.compiler.is_compiling() else few_tokens_moe
            return run(x, gate_up, down, topk_ids, weights, keep)
        dtype = compute_dtype(x)
        plan = plan_dispatch(topk_ids, keep, gate_up.shape[0], layout=_layout(dtype, x, down))
        x_sorted = dispatch(x, plan, dtype)
        y = _GroupedSwiGLU.apply(x_sorted, gate_up, down, plan.layout, dtype, row_weights(weights, plan))  # [N, D]
        return sum_rows(y, plan)

    def _moe_lora(self, x, gate_up, down, topk_ids, weights, keep, lora):
        dtype = compute_dtype(x)
        plan = plan_dispatch(topk_ids, keep, gate_up.shape[0], row_grid(dtype, x.device))
        row_adapter = lora.token_adapter[plan.src] if lora.multi else None
        with torch.autocast(x.device.type, enabled=False):  # every operand is cast to `dtype` explicitly
            y = lora_grouped_swiglu(dispatch(x, plan, dtype), gate_up, down, plan.counts, lora, row_adapter)
            return combine(y, weights, plan)

    def sorted_experts(self, x_sorted, gate_up, down, counts: torch.Tensor, lora=None) -> torch.Tensor:
        """Rows already sorted by expert, `counts` [E] rows each, no padding -> [N, D]."""
        if lora is not None:
            return lora_grouped_swiglu(x_sorted.to(compute_dtype(x_sorted)), gate_up, down, counts.tolist(), lora)
        return grouped_swiglu(x_sorted, gate_up, down, counts.tolist())
