"""Expert parallelism: each MoE layer's experts split on dim 0 over the ep ranks, tokens moved by
all-to-all.

`ExpertParallelFFN` replaces a built layer's `ExpertFFN` and keeps its contract
`(x [T, D], topk_ids, weights, keep) -> [T, D] fp32`, so `MoELayer` routes exactly as on one device;
only the expert computation travels. Steps (torchtitan's all-to-all dispatcher):
1. rows are sorted by global expert on this rank (the host-planned sort dispatch: the all-to-all
   splits are host integers anyway); experts are contiguous blocks of L = E / ep per rank, so the
   rows for ep rank j are one contiguous run;
2. one all-to-all of the per-expert counts tells each rank what it will receive (one host sync);
3. `all_to_all_single` with uneven splits sends the rows; they arrive source-major and are permuted
   to expert-major for the grouped kernel;
4. the received rows run through the layer's expert backend (`sorted_experts`: grouped_mm on a GPU,
   the bucketed CPU kernel on a CPU), with the layer's LoRA deltas when it has them;
5. outputs are permuted back and returned by the reverse all-to-all, so the routing weights are
   applied and summed on the sender.
Gradients take the same path backwards (`_AllToAll.backward` swaps the splits).

LoRA on the experts (`ExpertFFN.lora`, per-expert A [E, r, D] / B [E, F, r]) is sharded on dim 0 like
the base weights, so each rank runs its own experts' adapters on the rows it receives. Every expert
parameter keeps the `requires_grad` the fine-tuning mode gave it: a frozen base stays frozen.

Legend: E global experts, L local experts, P ep ranks, N rows sent, M rows received, D width.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moelab.kernels.common import compute_dtype
from moelab.kernels.sort_dispatch import combine, dispatch, plan_dispatch
from moelab.model.experts import ExpertFFN


class _AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` with uneven splits; the gradient goes back with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows: send in_splits[j] rows to rank j, receive out_splits[j]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def source_to_expert_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """Permutation taking rows laid out source-major ([P, L] blocks of sizes recv_counts) to
    expert-major (all rows of local expert 0 from every source, then expert 1, ...)."""
    p, l = recv_counts.shape
    block = torch.repeat_interleave(torch.arange(p * l, device=recv_counts.device), recv_counts.reshape(-1))
    key = (block % l) * p + block // l  # expert-major rank of each row's (source, expert) block
    return torch.argsort(key, stable=True)


class ExpertParallelFFN(nn.Module):
    """This rank's E / ep experts (DTensor `Shard(0)` parameters on the ep mesh) behind the
    `ExpertFFN` call contract. Parameter names are unchanged, so checkpoints are unchanged."""

    def __init__(self, experts: ExpertFFN, ep_mesh):
        super().__init__()
        self.num_experts = experts.num_experts
        self.ep = ep_mesh.size()
        if self.num_experts % self.ep:
            raise ValueError(f"ep={self.ep} does not divide num_experts={self.num_experts}")
        self.group = ep_mesh.get_group()
        self.backend = experts.backend
        # Every rank built the same full experts from the same seed; each keeps its block of E / ep.
        self.gate_up = _shard(experts.gate_up, ep_mesh)
        self.down = _shard(experts.down, ep_mesh)
        self.lora = experts.lora  # same module, same parameter names (checkpoints and adapter keys unchanged)
        if self.lora is not None:
            if self.lora.gu_a.ndim != 3:
                raise ValueError("stacked (multi-adapter serving) expert LoRA does not run under expert parallelism")
            for name, p in list(self.lora.named_parameters(recurse=False)):
                setattr(self.lora, name, _shard(p, ep_mesh))

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.to_local() if isinstance(p, DTensor) else p

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        plan = plan_dispatch(topk_ids, keep, self.num_experts)
        lora = None
        if self.lora is not None:  # this rank's experts' deltas, as local tensors for the backend
            d = self.lora.deltas(x)
            lora = dataclasses.replace(
                d,
                gu_a=self._local(d.gu_a),
                gu_b=self._local(d.gu_b),
                dn_a=self._local(d.dn_a),
                dn_b=self._local(d.dn_b),
            )
        y_sorted = self._exchange_and_run(dispatch(x, plan, compute_dtype(x)), plan.counts, lora)
        return combine(y_sorted, weights, plan)

    def _exchange_and_run(self, x_sorted: torch.Tensor, counts: list[int], lora=None) -> torch.Tensor:
        p, l = self.ep, self.num_experts // self.ep
        send = torch.tensor(counts, dtype=torch.int64, device=x_sorted.device).view(p, l)  # [P, L]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[s, l]: rows source s sends to my expert l
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()  # the one host sync
        x_recv = all_to_all(x_sorted, out_splits, in_splits, self.group)  # [M, D] source-major
        order = source_to_expert_order(recv)
        y = self.backend.sorted_experts(
            x_recv[order], self._local(self.gate_up), self._local(self.down), recv.sum(0), lora=lora
        )  # [M, D] expert-major
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(y[back], in_splits, out_splits, self.group)  # [N, D] in the sender's order


def _shard(p: torch.Tensor, ep_mesh) -> nn.Parameter:
    """p's block of E / ep experts (dim 0) on this rank, trainable only if p was."""
    return nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]), requires_grad=p.requires_grad)


def shard_experts(model: nn.Module, ep_mesh) -> int:
    """Swap every MoE layer's experts for their expert-parallel shard. Returns the number swapped."""
    from moelab.model.moe import MoELayer

    n = 0
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.experts, ExpertFFN):
            module.experts = ExpertParallelFFN(module.experts, ep_mesh)
            n += 1
    return n
