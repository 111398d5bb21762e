"""`grouped_mm`: the GPU expert kernel. `torch._grouped_mm` over rows sorted by expert, planned on the
device, so nothing from routing to combine waits for the host, forward or backward.

Legend: T tokens, K experts per token, A = T*K assignments, E experts, D width, F expert width,
N = A + E * (align - 1) rows of the sorted block.

Every shape is static (N depends on T, K, E and `align` only), which is what keeps the host out and
lets torch.compile and CUDA graphs take the whole layer:
- the plan is a stable sort of the assignments by expert; kept assignments of expert e fill its group,
  padded with weight-0 rows to a multiple of `align` rows when the kernel wants aligned groups;
- dropped assignments (capacity, padding tokens) and the unused tail rows go last, inside the last
  expert's group (`offs[-1] = N`): they are computed, with routing weight 0, instead of being cut off
  by a data-dependent size. Wasted rows are the dropped ones plus the alignment padding; dropless
  routing with `align = 1` wastes none;
- each token's routing weight scales its row between the two matmuls (a = silu(g) * u * w), so the
  combine is a plain sum of K gathered rows and weight-0 rows give exact zeros, gradients included.
Dispatch and combine are gathers in both directions (their backward is a gather too, never a
scatter-add), which keeps them deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.kernels.common import compute_dtype
from moelab.kernels.lora import ExpertLoRA, delta_rows


@dataclass
class DevicePlan:
    src: torch.Tensor  # [N] token each row reads (rows of weight 0 read any token)
    pos: torch.Tensor  # [T, K] row of each assignment
    tok: torch.Tensor  # [N] token each row's output adds to; T for rows of weight 0
    assignment: torch.Tensor  # [N] flat assignment t*K + k of each row; A for rows of weight 0
    offs: torch.Tensor  # [E] int32 end row of each expert's group; offs[-1] = N


def plan_on_device(topk_ids: torch.Tensor, keep: torch.Tensor | None, num_experts: int, align: int = 1) -> DevicePlan:
    """topk_ids [T, K]; keep [T, K] bool or None (False = dropped). Device ops only: no host read."""
    t, k = topk_ids.shape
    a, e, dev = t * k, num_experts, topk_ids.device
    flat = topk_ids.reshape(-1)
    if keep is not None:
        flat = torch.where(keep.reshape(-1), flat, e)  # sentinel expert: dropped sort last
    e_sorted, order = torch.sort(flat, stable=True)
    counts = torch.zeros(e + 1, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    row_sorted = torch.arange(a, device=dev)
    n = a
    if align > 1:
        padded = (counts + align - 1) // align * align
        shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)  # [E + 1]
        row_sorted = row_sorted + shift[e_sorted]
        n = a + e * (align - 1)
        counts = padded
    pos = torch.empty_like(order).scatter_(0, order, row_sorted)
    weighted = torch.where(e_sorted < e, order, a)
    assignment = torch.full((n,), a, dtype=torch.long, device=dev).scatter_(0, row_sorted, weighted)
    tok = assignment // k  # a // k == T: rows of weight 0 add to no token
    offs = torch.cumsum(counts[:e], 0).to(torch.int32)
    offs = torch.cat([offs[:-1], offs.new_full((1,), n)])  # (offs[-1] = n would copy n from the host)
    return DevicePlan(tok.clamp(max=max(t - 1, 0)), pos.view(t, k), tok, assignment, offs)


class _GatherRows(torch.autograd.Function):
    """x [T, D] -> x[src] [N, D]; backward dx[t] = sum_k g[pos[t, k]] (rows of weight 0 have zero grad)."""

    @staticmethod
    def forward(ctx, x, src, pos):
        ctx.save_for_backward(pos)
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, g):
        (pos,) = ctx.saved_tensors
        t, k = pos.shape
        return g.index_select(0, pos.reshape(-1)).view(t, k, -1).sum(1), None, None


class _SumRows(torch.autograd.Function):
    """ys [N, D] -> [T, D] fp32, y[t] = sum_k ys[pos[t, k]]; backward dys[i] = g[tok[i]] (0 when tok = T)."""

    @staticmethod
    def forward(ctx, ys, pos, tok):
        ctx.save_for_backward(tok)
        ctx.dtype = ys.dtype
        t, k = pos.shape
        return ys.index_select(0, pos.reshape(-1)).view(t, k, -1).sum(1, dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        (tok,) = ctx.saved_tensors
        g = torch.cat([g.to(ctx.dtype), g.new_zeros(1, g.shape[1], dtype=ctx.dtype)])
        return g.index_select(0, tok), None, None


class _GroupedSwiGLU(torch.autograd.Function):
    """The experts' SwiGLU over sorted rows, with optional LoRA deltas, forward and backward written out
    (the shape of `cpu_buckets._GroupedSwiGLU`, with grouped matmuls instead of buckets).

    Why by hand: gate and up come from two grouped matmuls over the halves of `gate_up` (views, no
    copy), so g, u and every elementwise step on them are contiguous -- one [N, 2F] product sliced in
    two made each silu/mul a strided, unvectorised kernel, which cost more than a third of the layer on
    an H200 (profiled: 1.8 ms of 7.2 at E=8). Saved: x, g, u and the row weights; silu(g) and the
    activations are recomputed in backward, cheaper than keeping them.

    LoRA (`kernels/lora.py`) adds grouped matmuls over the same offsets and nothing strided: the gate
    and up deltas share t = s * x A_gu^T [N, r] and use the halves of B_gu, like the base weights; the
    down delta reads the (row-weighted) activations. Saved besides: the two [N, r] products and the
    dropout mask of the activations. Gradients are computed only for inputs that need them: a LoRA or
    router-only run never pays for the weight-sized base gradients."""

    @staticmethod
    def forward(ctx, x, gate_up, down, offs, row_weights, lora_x, gu_a, gu_b, dn_a, dn_b, scale, dropout):
        f = down.shape[-1]
        g = torch._grouped_mm(x, gate_up[:, :f].transpose(1, 2), offs=offs)  # [N, F]
        u = torch._grouped_mm(x, gate_up[:, f:].transpose(1, 2), offs=offs)  # [N, F]
        t_in = t_out = mask = None
        if gu_a is not None:
            lx = x if lora_x is None else lora_x
            t_in = torch._grouped_mm(lx, gu_a.transpose(1, 2), offs=offs) * scale  # [N, r]
            g = g + torch._grouped_mm(t_in, gu_b[:, :f].transpose(1, 2), offs=offs)
            u = u + torch._grouped_mm(t_in, gu_b[:, f:].transpose(1, 2), offs=offs)
        a = F.silu(g) * u
        if row_weights is not None:
            a = a * row_weights.to(a.dtype)[:, None]
        y = torch._grouped_mm(a, down.transpose(1, 2), offs=offs)  # [N, D]
        if dn_a is not None:
            la = a
            if dropout:
                mask = torch.empty_like(a).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
                la = a * mask
            t_out = torch._grouped_mm(la, dn_a.transpose(1, 2), offs=offs) * scale  # [N, r]
            # linear in a, so the row weight already inside a scales the delta too
            y = y + torch._grouped_mm(t_out, dn_b.transpose(1, 2), offs=offs)
        ctx.save_for_backward(
            x, gate_up, down, offs, g, u, row_weights, lora_x, gu_a, gu_b, dn_a, dn_b, t_in, t_out, mask
        )
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate_up, down, offs, g, u, w, lx, gu_a, gu_b, dn_a, dn_b, t_in, t_out, mask = ctx.saved_tensors
        need, s = ctx.needs_input_grad, ctx.scale
        dy = dy.contiguous()
        sg = F.silu(g)
        act = sg * u
        a = act if w is None else act * w.to(act.dtype)[:, None]
        da = torch._grouped_mm(dy, down, offs=offs)  # [N, F]
        d_down = torch._grouped_mm(dy.t(), a, offs=offs) if need[2] else None  # [E, D, F]
        d_dn_a = d_dn_b = None
        if dn_a is not None:
            d_dn_b = torch._grouped_mm(dy.t(), t_out, offs=offs) if need[9] else None  # [E, D, r]
            dt = torch._grouped_mm(dy, dn_b, offs=offs) * s  # [N, r]
            if need[8]:
                d_dn_a = torch._grouped_mm(dt.t(), a if mask is None else a * mask, offs=offs)  # [E, r, F]
            d_la = torch._grouped_mm(dt, dn_a, offs=offs)  # [N, F]
            da = da + (d_la if mask is None else d_la * mask)
        dw = None
        if w is not None:
            dw = (act * da).sum(-1, dtype=torch.float32).to(w.dtype)
            da = da * w.to(da.dtype)[:, None]
        dh = torch.cat([torch.ops.aten.silu_backward(da * u, g), da * sg], dim=-1)  # [N, 2F]: d gate | d up
        dx = torch._grouped_mm(dh, gate_up, offs=offs) if need[0] else None  # [N, D]
        d_gate_up = torch._grouped_mm(dh.t(), x, offs=offs) if need[1] else None  # [E, 2F, D]
        d_lx = d_gu_a = d_gu_b = None
        if gu_a is not None:
            d_gu_b = torch._grouped_mm(dh.t(), t_in, offs=offs) if need[7] else None  # [E, 2F, r]
            dt = torch._grouped_mm(dh, gu_b, offs=offs) * s  # [N, r]
            d_gu_a = torch._grouped_mm(dt.t(), x if lx is None else lx, offs=offs) if need[6] else None  # [E, r, D]
            if lx is None and need[0]:  # no dropout: the adapters read x itself
                dx = dx + torch._grouped_mm(dt, gu_a, offs=offs)
            elif need[5]:
                d_lx = torch._grouped_mm(dt, gu_a, offs=offs)  # [N, D]
        return dx, d_gate_up, d_down, None, dw, d_lx, d_gu_a, d_gu_b, d_dn_a, d_dn_b, None, None


def grouped_swiglu_mm(
    x_sorted: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offs: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    lora: ExpertLoRA | None = None,
    row_adapter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each expert's SwiGLU on its group of rows (groups end at `offs`), optionally scaling each row by
    `row_weights` [N] between the matmuls. Weights [E, 2F, D] / [E, D, F] are used transposed in place.
    `lora`: low-rank expert deltas as more grouped matmuls over the same groups (`kernels/lora.py`);
    `row_adapter` [N] when serving several adapters (then rows gather their own A and B)."""
    if lora is None:
        return _GroupedSwiGLU.apply(x_sorted, gate_up, down, offs, row_weights, None, None, None, None, None, 1.0, 0.0)
    if row_adapter is not None:
        return _adapter_rows_swiglu(x_sorted, gate_up, down, offs, row_weights, lora, row_adapter)
    gu_a, gu_b, dn_a, dn_b = _rank_padded(lora, x_sorted.element_size())
    dropout = lora.dropout if torch.is_grad_enabled() else 0.0  # (as `ExpertLoRA.drop`)
    # None without dropout: the Function then reads x (one tensor passed twice breaks torch.compile)
    lora_x = lora.drop(x_sorted) if dropout else None
    return _GroupedSwiGLU.apply(
        x_sorted, gate_up, down, offs, row_weights, lora_x, gu_a, gu_b, dn_a, dn_b, lora.scale, dropout
    )


def _rank_padded(lora: ExpertLoRA, element_size: int) -> tuple[torch.Tensor, ...]:
    """A and B with the rank padded by zeros to a multiple of 16 bytes, on the device: torch._grouped_mm
    needs 16-byte strides, and the [N, r] products and transposed B halves have rank-long rows (r < 4 in
    fp32 or r < 8 in bf16 failed with "strides should be multiple of 16 bytes"). Zero rows of A give
    zero columns of x A^T, which meet zero columns of B: no result changes, and the padding's
    gradients are cut off by the pad's own backward."""
    r = lora.gu_a.shape[-2]
    per = max(1, 16 // element_size)
    pad = -r % per
    if not pad:
        return lora.gu_a, lora.gu_b, lora.dn_a, lora.dn_b
    return (
        F.pad(lora.gu_a, (0, 0, 0, pad)),
        F.pad(lora.gu_b, (0, pad)),
        F.pad(lora.dn_a, (0, 0, 0, pad)),
        F.pad(lora.dn_b, (0, pad)),
    )


def _adapter_rows_swiglu(x, gate_up, down, offs, row_weights, lora: ExpertLoRA, row_adapter) -> torch.Tensor:
    """Several adapters in one batch (serving; no hand-written backward): the base as two grouped
    matmuls, each row's own (adapter, expert) A and B gathered (`delta_rows`)."""
    f = down.shape[-1]
    rows = torch.arange(x.shape[0], device=x.device)
    expert = torch.searchsorted(offs, rows.to(offs.dtype), right=True).clamp_(max=gate_up.shape[0] - 1)
    d = delta_rows(x, lora.gu_a, lora.gu_b, lora, expert, row_adapter)  # [N, 2F]
    g = torch._grouped_mm(x, gate_up[:, :f].transpose(1, 2), offs=offs) + d[:, :f]
    u = torch._grouped_mm(x, gate_up[:, f:].transpose(1, 2), offs=offs) + d[:, f:]
    a = F.silu(g) * u
    if row_weights is not None:
        a = a * row_weights.to(a.dtype)[:, None]
    y = torch._grouped_mm(a, down.transpose(1, 2), offs=offs)
    return y + delta_rows(a, lora.dn_a, lora.dn_b, lora, expert, row_adapter)


@torch.compiler.assume_constant_result  # asked at trace time inside a compiled model: a constant, no graph break
def fused_grouped_mm(device: torch.device | str) -> bool:
    """Whether `torch._grouped_mm` runs torch's fused grouped kernel on `device`: a CUDA GPU of compute
    capability 9.x (Hopper), or 10.x (datacenter Blackwell) from torch 2.9. On other GPUs (A100, consumer
    cards) torch >= 2.9 runs a loop of matmuls that reads the group offsets on the host -- correct, but
    slow and impossible to capture in a CUDA graph -- and torch 2.8 refuses."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return fused_on(torch.cuda.get_device_capability(device), torch.__version__)


def fused_on(capability: tuple[int, int], torch_version) -> bool:
    """`fused_grouped_mm` for a compute capability and a torch version (e.g. torch.__version__)."""
    major = capability[0]
    release = tuple(int(part) for part in str(torch_version).split("+")[0].split(".")[:2])
    return major == 9 or (major == 10 and release >= (2, 9))


def aligned_for_grouped_mm(d_model: int, expert_dim: int) -> bool:
    """`torch._grouped_mm` wants 16-byte row strides: D and F multiples of 8 (bf16; fp32 needs 4)."""
    return d_model % 8 == 0 and expert_dim % 8 == 0


class GroupedMMBackend:
    """`moe.expert_backend: grouped_mm` (the default on CUDA). `align`: rows per group are padded to a
    multiple of it (1 = none; the kernel's own alignment needs, if any, are a property of the GPU)."""

    name = "grouped_mm"

    def __init__(self, align: int = 1):
        self.align = align

    def moe(self, x, gate_up, down, topk_ids, weights, keep=None, lora=None):
        """x [T, D] -> [T, D] fp32, the routed experts' weighted sum per token; `lora`: optional
        low-rank expert deltas (`kernels/lora.py`)."""
        dtype = compute_dtype(x)
        plan = plan_on_device(topk_ids, keep, gate_up.shape[0], self.align)
        with torch.autocast(x.device.type, enabled=False):
            xs = _GatherRows.apply(x.to(dtype), plan.src, plan.pos)  # [N, D]
            w = torch.cat([weights.reshape(-1).float(), weights.new_zeros(1, dtype=torch.float32)])
            lora = lora.cast(dtype) if lora is not None else None
            row_adapter = lora.token_adapter[plan.src] if lora is not None and lora.multi else None
            ys = grouped_swiglu_mm(
                xs, gate_up.to(dtype), down.to(dtype), plan.offs, w.index_select(0, plan.assignment), lora, row_adapter
            )
            return _SumRows.apply(ys, plan.pos, plan.tok)

    def sorted_experts(self, x_sorted, gate_up, down, counts: torch.Tensor, lora=None) -> torch.Tensor:
        """Rows already sorted by expert, `counts` [E] rows each, no padding -> [N, D]."""
        dtype = compute_dtype(x_sorted)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        with torch.autocast(x_sorted.device.type, enabled=False):
            lora = lora.cast(dtype) if lora is not None else None
            return grouped_swiglu_mm(x_sorted.to(dtype), gate_up.to(dtype), down.to(dtype), offs, lora=lora)
