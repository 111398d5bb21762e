"""Apply data, expert and fully-sharded parallelism to a built single-device `Transformer`.

    model = Transformer(cfg.model)          # same seed on every rank -> same initial weights
    ctx = init_parallel(cfg.parallel, cfg.model)
    model = parallelize(model, ctx)

What changes, from the inside out:
- every MoE layer's balance statistics sum expert counts over all ranks (`AllRanksBatch`), so the
  load-balance loss, the logged loads and the aux-free bias update are the global batch's;
- with ep > 1 each MoE layer's experts become `ExpertParallelFFN` (E / ep experts per rank, tokens
  by all-to-all);
- FSDP2 `fully_shard`: each layer's experts over the dp ranks that hold the same expert block, then
  every transformer block and the root over all ranks (ZeRO-3: parameters, gradients and AdamW state
  sharded; `reshard_after_forward=False` keeps the gathered parameters for backward, ZeRO-2-like).
  With `fsdp: false` the same calls replicate instead (HSDP with shard groups of one = DDP).

Gradient scale: each rank's loss is the mean over its slice, and the global loss is the mean over
ranks. FSDP averages dense gradients over all W ranks. An expert block's gradient already sums the
contributions of its ep row (the all-to-all backward), and FSDP sums it down dp, so it is divided
by W rather than dp (`set_gradient_divide_factor`), as torchtitan does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moelab.model.moe import LocalBatch, MoELayer
from moelab.parallel.expert_parallel import shard_experts
from moelab.parallel.mesh import ParallelContext


class AllRanksBatch(LocalBatch):
    """Balance statistics over the global batch: expert counts summed over every rank."""

    def __init__(self, group=None):
        self.group = group

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.clone()
        dist.all_reduce(counts, group=self.group)
        return counts


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def parallelize(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """Shard `model` in place for the mesh in `ctx` and return it (moved to ctx.device). In a single
    process the model is returned as it is: the caller placed it (moving it to ctx.device here once put
    a model the trainer had moved to CUDA back on the CPU)."""
    if not ctx.distributed:
        return model
    model.to(ctx.device)
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    for layer in _moe_layers(model):
        layer.batch = AllRanksBatch()
    if ctx.ep > 1:
        shard_experts(model, ctx.mesh["ep"])
    kw = dict(
        reshard_after_forward=ctx.reshard_after_forward,
        offload_policy=CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if ctx.cpu_offload else OffloadPolicy(),
    )
    expert_mesh = ctx.mesh["dp_shard"] if ctx.fsdp else ctx.mesh["dp_rep", "dp_shard"]
    for layer in _moe_layers(model):
        fully_shard(layer.experts, mesh=expert_mesh, **kw)
        layer.experts.set_gradient_divide_factor(float(ctx.world_size))
    for block in getattr(model, "layers", []):
        fully_shard(block, mesh=ctx.dense_mesh, **kw)
    fully_shard(model, mesh=ctx.dense_mesh, **{**kw, "reshard_after_forward": False})  # backward starts here
    if dist.get_backend() == "gloo":
        # gloo has no pre-multiplied sum: reduce with SUM, then scale. Not where the expert shard group
        # is one rank: FSDP then divides while copying and again afterwards (torch 2.13 foreach_reduce).
        skip = {id(layer.experts) for layer in _moe_layers(model)} if expert_mesh["dp_shard"].size() == 1 else set()
        for module in model.modules():
            if isinstance(module, FSDPModule) and id(module) not in skip:
                module.set_force_sum_reduction_for_comms(True)
    return model
