"""How a built model computes, applied next to `parallel.sharding.parallelize` (torchtitan's layout:
activation checkpointing and compile are transformations of a built model, like sharding)."""

from __future__ import annotations

import functools

import torch
from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations during backward instead of keeping them (less memory, about
    one more forward of compute). Wraps the block's forward in place, so parameter names do not change.
    Non-reentrant checkpointing restores the RNG state, so Gumbel/noisy routers recompute the same draw."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """torch.compile in place (names unchanged). A block whose MoE layer runs a backend with static
    shapes and no host sync (`grouped_mm`: on a GPU in bf16) is compiled whole, router and experts
    included; elsewhere only attention and dense feed-forwards are, since a host-planned dispatch has
    data-dependent shapes (tokens per expert change every step) that would recompile or break the
    graph at every layer. Returns the number of blocks compiled whole."""
    from moelab.model.experts import sync_free_experts
    from moelab.model.moe import MoELayer

    whole = 0
    for block in model.layers:
        ffn = block.ffn
        if not isinstance(ffn, MoELayer) or sync_free_experts(ffn.experts, device, dtype):
            block.compile(dynamic=False)
            whole += 1
        else:
            block.attn.compile(dynamic=False)
    return whole
