"""Scale-out on PyTorch's own stack: torchrun environment, DeviceMesh, FSDP2 and expert parallelism,
applied to a built single-device model (see docs/scale-out.md)."""

from moelab.parallel.expert_parallel import ExpertParallelFFN, all_to_all, shard_experts
from moelab.parallel.grads import clip_grad_norm_, grad_norm
from moelab.parallel.mesh import ParallelContext, init_parallel, resolve_sizes
from moelab.parallel.sharding import AllRanksBatch, parallelize
from moelab.parallel.state import (
    full_model_state,
    full_optimizer_state,
    gather_train_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
)

__all__ = [
    "AllRanksBatch",
    "ExpertParallelFFN",
    "ParallelContext",
    "all_to_all",
    "clip_grad_norm_",
    "full_model_state",
    "full_optimizer_state",
    "gather_train_state",
    "grad_norm",
    "init_parallel",
    "is_sharded",
    "load_full_model_state",
    "load_full_optimizer_state",
    "parallelize",
    "resolve_sizes",
    "shard_experts",
]
