"""Process-group and DeviceMesh setup from the torchrun environment.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT); multi-node flags are torchrun's
own. The mesh has two parallel degrees, dp and ep, with world size = dp * ep: every rank takes a
different slice of the batch, so all dp * ep ranks are data-parallel for the dense parameters, while
each MoE layer's experts are split over the ep ranks of a row and replicated (FSDP-sharded) down dp.
Every size is checked against the environment before a process group exists, so a mismatch is one
clear error rather than a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moelab.config import ModelConfig, ParallelConfig
from moelab.errors import UserError


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun exported them; (0, 1, 0) outside torchrun."""
    try:
        return (
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as e:
        raise UserError(f"torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from None


def resolve_sizes(pcfg: ParallelConfig, world_size: int, model_cfg: ModelConfig | None = None) -> tuple[int, int]:
    """(dp, ep) for this world size, or a UserError naming the field that does not fit."""
    ep = pcfg.ep
    if world_size % ep:
        raise UserError(
            f"parallel.ep={ep} does not divide the world size {world_size} "
            f"(launch with torchrun --nproc-per-node a multiple of {ep})"
        )
    dp = pcfg.dp if pcfg.dp is not None else world_size // ep
    if dp * ep != world_size:
        raise UserError(
            f"parallel.dp * parallel.ep = {dp} * {ep} = {dp * ep} processes, but the world size is "
            f"{world_size} (torchrun --nproc-per-node * nodes must equal dp * ep)"
        )
    if model_cfg is not None and model_cfg.moe_layer_ids() and model_cfg.moe.num_experts % ep:
        raise UserError(f"parallel.ep={ep} does not divide model.moe.num_experts={model_cfg.moe.num_experts}")
    if model_cfg is not None and ep > 1 and model_cfg.moe.expert_backend == "reference":
        raise UserError(
            "model.moe.expert_backend: 'reference' runs every expert locally; expert parallelism "
            "(parallel.ep > 1) needs auto, cpu_buckets or grouped_mm"
        )
    return dp, ep


@dataclass
class ParallelContext:
    """Where this process sits: rank, sizes, device and (when distributed) the ("dp", "ep") mesh."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp: int = 1
    ep: int = 1
    device: torch.device = torch.device("cpu")
    # DeviceMeshes, None in a single process. `mesh` is ("dp_rep", "dp_shard", "ep") with dp on dp_shard
    # under FSDP and on dp_rep when replicating; `dense_mesh` spans every rank for the non-expert params.
    mesh: object | None = None
    dense_mesh: object | None = None
    fsdp: bool = True
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, global_batch: int, what: str = "train.batch_size") -> slice:
        """Rows of a global batch this rank takes. Every rank draws the same global batch and keeps its
        slice, so the run sees the same data whatever the number of processes (and resumes across them)."""
        if global_batch % self.world_size:
            raise UserError(
                f"{what}={global_batch} (the global batch) is not divisible by the world size {self.world_size}"
            )
        n = global_batch // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def mean(self, value: torch.Tensor | float) -> float:
        """Mean over ranks (equal-sized slices make it the global-batch mean); for logging."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach().clone()
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world_size
        return float(t)

    def mean_tensors(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor averaged over ranks in one all-reduce (per-rank step metrics -> global batch)."""
        if not self.distributed or not values:
            return values
        import torch.distributed as dist

        flat = torch.cat([v.detach().reshape(-1).to(self.device, torch.float64) for v in values.values()])
        dist.all_reduce(flat)
        flat /= self.world_size
        out, i = {}, 0
        for k, v in values.items():
            out[k] = flat[i : i + v.numel()].view(v.shape).to(v.dtype)
            i += v.numel()
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over every rank (identity in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self, finished: bool = True) -> None:
        """Tear the process groups down. `finished`: every rank got here normally, so wait for all of them
        first (a rank that exits first closes sockets a slower peer's gloo threads may still read, and that
        peer then died in std::terminate, SIGABRT, at exit: ~1 run in 10 here, after its work was done).
        After an error the peers may never arrive, so the failing rank does not wait."""
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _pick_device(backend: str, local_rank: int, requested: str) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if requested not in ("auto", "cpu"):
        raise UserError(
            f"train.device={requested!r} with the gloo backend: gloo runs on cpu (use parallel.backend=nccl for CUDA)"
        )
    return torch.device("cpu")


def init_parallel(pcfg: ParallelConfig, model_cfg: ModelConfig | None = None, device: str = "auto") -> ParallelContext:
    """Validate sizes against the torchrun environment, then create the process group and mesh.
    In a single process nothing is initialised and the context describes one rank."""
    rank, world, local_rank = world_from_env()
    dp, ep = resolve_sizes(pcfg, world, model_cfg)
    backend = pcfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("parallel.backend=nccl needs CUDA, which is not available (use gloo)")
    common = dict(fsdp=pcfg.fsdp, reshard_after_forward=pcfg.reshard_after_forward, cpu_offload=pcfg.cpu_offload)
    if world == 1:
        from moelab.device import resolve_device

        return ParallelContext(device=resolve_device(device), **common)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dev = _pick_device(backend, local_rank, device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    # Replication is FSDP2's HSDP with shard groups of one, so both modes are one code path.
    shape, dense_shape = ((1, dp, ep), (world,)) if pcfg.fsdp else ((dp, 1, ep), (world, 1))
    mesh = init_device_mesh(dev.type, shape, mesh_dim_names=("dp_rep", "dp_shard", "ep"))
    dense_mesh = init_device_mesh(
        dev.type, dense_shape, mesh_dim_names=("shard",) if pcfg.fsdp else ("replicate", "shard")
    )
    return ParallelContext(rank, world, local_rank, dp, ep, dev, mesh, dense_mesh, **common)
