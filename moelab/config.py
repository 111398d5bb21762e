"""Typed configuration: dataclasses nested by concern, loaded from YAML with dotted overrides.

Precedence: dataclass defaults < YAML file < `--set a.b=c` overrides. Every problem (unknown key with
the nearest valid name, wrong type, inconsistent values) is collected and reported one line each as a
`ConfigError`, so the user fixes them all in one go.

Overrides may omit the `model.` prefix for the model's own sub-sections: `--set moe.top_k=2` is
`model.moe.top_k=2`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moelab.config_build import from_dict, parse_override, read_yaml
from moelab.config_model import QK_NORMS, ROUTERS, ModelConfig, MoEConfig, QKNorm, RouterName  # noqa: F401
from moelab.errors import ConfigError
from moelab.finetune.config import FinetuneConfig

__all__ = [
    "Config",
    "ModelConfig",
    "MoEConfig",
    "DataConfig",
    "TrainConfig",
    "ScheduleConfig",
    "EvalConfig",
    "CheckpointConfig",
    "LogConfig",
    "ParallelConfig",
    "load_config",
    "save_config",
    "from_dict",
    "read_yaml",
    "apply_overrides",
    "parse_override",
]


@dataclass
class DataConfig:
    """Where training tokens come from and how windows are cut."""

    path: str | None = None  # a directory written by `moelab prepare`
    seq_len: int = 256
    stride: int | None = None  # None = random windows; an int = deterministic sliding-window epochs

    def validate(self, prefix: str = "data") -> list[str]:
        p = []
        if self.seq_len < 1:
            p.append(f"{prefix}.seq_len: expected >= 1, got {self.seq_len}")
        if self.stride is not None and self.stride < 1:
            p.append(f"{prefix}.stride: expected >= 1 or null, got {self.stride}")
        return p


@dataclass
class TrainConfig:
    """Optimisation and the training loop."""

    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    router_lr_scale: float = 1.0  # the router gates' LR is lr x this (optimizer group "router", optim.py)
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float16 needs CUDA
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    compile: bool = False  # torch.compile attention and dense FFNs (MoE layers stay eager); slow first steps
    peak_flops: float | None = None  # device matmul FLOP/s for MFU; None = measured once at start; 0 = no MFU
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row (each one is skipped)
    max_seconds: float | None = None  # stop (and checkpoint) once training has run this long; None = no limit
    # A time-budgeted run: stop after this many seconds of training or train.steps, whichever comes first,
    # with the LR schedule decaying over whichever is ahead (it ends with the run). None = steps only.
    budget_seconds: float | None = None
    deterministic: bool = False  # bit-reproducible run to run (moelab/determinism.py; docs/rl.md)

    def validate(self, prefix: str = "train") -> list[str]:
        p = []
        for name in ("steps", "batch_size", "grad_accum", "max_bad_steps"):
            if getattr(self, name) < 1:
                p.append(f"{prefix}.{name}: expected >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            p.append(f"{prefix}.lr: expected > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            p.append(f"{prefix}.min_lr: expected 0 <= min_lr <= lr={self.lr}, got {self.min_lr}")
        if self.grad_clip < 0:
            p.append(f"{prefix}.grad_clip: expected >= 0 (0 = no clipping), got {self.grad_clip}")
        if self.weight_decay < 0:
            p.append(f"{prefix}.weight_decay: expected >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                p.append(f"{prefix}.{name}: expected 0 <= {name} < 1, got {getattr(self, name)}")
        if self.peak_flops is not None and self.peak_flops < 0:
            p.append(f"{prefix}.peak_flops: expected >= 0 (0 = no MFU) or null, got {self.peak_flops}")
        for name in ("max_seconds", "budget_seconds"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                p.append(f"{prefix}.{name}: expected > 0 or null, got {getattr(self, name)}")
        if self.router_lr_scale <= 0:
            p.append(f"{prefix}.router_lr_scale: expected > 0, got {self.router_lr_scale}")
        if self.warmup_steps < 0:
            p.append(f"{prefix}.warmup_steps: expected >= 0, got {self.warmup_steps}")
        return p


@dataclass
class ScheduleConfig:
    """Routing knobs that change with the optimizer step (see docs/training.md). Each anneals from a
    start value to the model config's value; the defaults keep everything constant."""

    gumbel_tau_end: float | None = None  # gumbel router: anneal moe.gumbel_tau -> this; None = constant
    gumbel_tau_steps: int | None = None  # over this many steps; None = the whole run
    gumbel_tau_shape: Literal["exponential", "linear", "cosine"] = "exponential"
    aux_coef_start: float = 1.0  # multiplier on every moe.*_coef at step 0, linearly reaching 1.0 ...
    aux_coef_steps: int = 0  # ... after this many steps (0 = always 1.0)
    top_k_start: int | None = None  # dense-to-sparse: experts per token at step 0; None = moe.top_k
    top_k_steps: int | None = None  # reaches moe.top_k (linearly, rounded) at this step; None = half the run
    grow_at: list[int] = field(default_factory=list)  # optimizer steps at which every MoE layer doubles its experts
    grow_anneal_steps: int = 50  # after growing, k runs at 2k (loss-continuous) and anneals back to k over these
    grow_noise: float = 0.01  # noise on the copies, relative to each tensor's std (moelab/grow.py)
    grow_router_noise: float | None = None  # opposite offsets on copied router rows; None = grow_noise
    grow_split_noise: float = 0.0  # opposite noise on the two halves' expert weights (the halves diverge)

    def validate(self, prefix: str = "schedule") -> list[str]:
        p = []
        if self.gumbel_tau_end is not None and self.gumbel_tau_end <= 0:
            p.append(f"{prefix}.gumbel_tau_end: expected > 0 or null, got {self.gumbel_tau_end}")
        if self.aux_coef_start < 0:
            p.append(f"{prefix}.aux_coef_start: expected >= 0, got {self.aux_coef_start}")
        for name in ("gumbel_tau_steps", "aux_coef_steps", "top_k_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                p.append(f"{prefix}.{name}: expected >= 0, got {getattr(self, name)}")
        if isinstance(self.grow_at, list) and not all(isinstance(s, int) and s > 0 for s in self.grow_at):
            p.append(f"{prefix}.grow_at: expected a list of positive optimizer steps, got {self.grow_at!r}")
        if self.grow_router_noise is not None and self.grow_router_noise < 0:
            p.append(f"{prefix}.grow_router_noise: expected >= 0 or null (= grow_noise), got {self.grow_router_noise}")
        if self.grow_split_noise < 0:
            p.append(f"{prefix}.grow_split_noise: expected >= 0, got {self.grow_split_noise}")
        if self.grow_anneal_steps < 0 or self.grow_noise < 0:
            p.append(
                f"{prefix}.grow_anneal_steps / grow_noise: expected >= 0, got {self.grow_anneal_steps} / "
                f"{self.grow_noise}"
            )
        return p

    def check_model(self, model: ModelConfig, prefix: str = "schedule") -> list[str]:
        p = []
        moe = model.moe
        if self.gumbel_tau_end is not None and moe.router != "gumbel":
            p.append(
                f"{prefix}.gumbel_tau_end: temperature annealing needs model.moe.router=gumbel, "
                f"router is {moe.router!r}"
            )
        if self.grow_at and moe.router in ("hierarchical", "expert_choice"):
            p.append(f"{prefix}.grow_at: growing experts does not support router {moe.router!r}")
        if self.top_k_start is not None:
            if moe.router == "expert_choice":
                p.append(f"{prefix}.top_k_start: expert_choice routing has no per-token top-k to anneal")
            elif not moe.top_k <= self.top_k_start <= moe.num_experts:
                p.append(
                    f"{prefix}.top_k_start: expected between model.moe.top_k={moe.top_k} and "
                    f"model.moe.num_experts={moe.num_experts}, got {self.top_k_start}"
                )
        return p


@dataclass
class EvalConfig:
    """Validation loss and bits-per-byte on the dataset's val split."""

    every: int = 100  # optimizer steps between evaluations (also at the end); 0 = only at the end
    batches: int = 20  # val batches per evaluation (the same ones every time)
    batch_size: int | None = None  # None = train.batch_size

    def validate(self, prefix: str = "eval") -> list[str]:
        p = []
        if self.every < 0:
            p.append(f"{prefix}.every: expected >= 0, got {self.every}")
        if self.batches < 1:
            p.append(f"{prefix}.batches: expected >= 1, got {self.batches}")
        if self.batch_size is not None and self.batch_size < 1:
            p.append(f"{prefix}.batch_size: expected >= 1 or null, got {self.batch_size}")
        return p


@dataclass
class CheckpointConfig:
    """Training checkpoints under RUN/checkpoints/: the last `keep_last` plus the best by val loss."""

    every: int = 500  # optimizer steps between checkpoints (one is always written at the end); 0 = end only
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the lowest val loss (RUN/checkpoints/best)

    def validate(self, prefix: str = "checkpoint") -> list[str]:
        p = []
        if self.every < 0:
            p.append(f"{prefix}.every: expected >= 0, got {self.every}")
        if self.keep_last < 1:
            p.append(f"{prefix}.keep_last: expected >= 1, got {self.keep_last}")
        return p


@dataclass
class LogConfig:
    """Telemetry: RUN/metrics.jsonl always, TensorBoard when installed, a progress bar on a terminal."""

    every: int = 10  # optimizer steps per metrics record (values are means over those steps)
    tensorboard: bool = True  # write RUN/tb/ when the tensorboard package is installed
    progress: bool = True  # live progress bar (tqdm: ETA, loss, tokens/s) on a terminal; else a line per record

    def validate(self, prefix: str = "log") -> list[str]:
        if self.every < 1:
            return [f"{prefix}.every: expected >= 1, got {self.every}"]
        return []


@dataclass
class ParallelConfig:
    """Multi-process training under torchrun (see docs/scale-out.md). World size = dp * ep; every rank
    takes its own slice of each global batch."""

    dp: int | None = None  # data-parallel degree; None = WORLD_SIZE // ep
    ep: int = 1  # expert-parallel degree: each MoE layer's experts are split on dim 0 over ep ranks
    fsdp: bool = True  # FSDP2: shard parameters, gradients and optimizer state; false = replicate them
    reshard_after_forward: bool = True  # true: ZeRO-3-like; false: keep gathered params for backward (ZeRO-2-like)
    cpu_offload: bool = False  # keep sharded params, grads and optimizer state in host memory (FSDP2)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, else gloo

    def validate(self, prefix: str = "parallel") -> list[str]:
        p = []
        if self.dp is not None and self.dp < 1:
            p.append(f"{prefix}.dp: expected >= 1 or null (WORLD_SIZE // ep), got {self.dp}")
        if self.ep < 1:
            p.append(f"{prefix}.ep: expected >= 1, got {self.ep}")
        return p


@dataclass
class Config:
    """A whole run: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> list[str]:
        p = self.model.validate() + self.data.validate() + self.train.validate() + self.parallel.validate()
        p += self.schedule.validate() + self.eval.validate() + self.checkpoint.validate() + self.log.validate()
        p += self.finetune.validate()
        if not p:
            p += self.schedule.check_model(self.model)
        if not p and self.data.seq_len > self.model.max_seq_len:
            p.append(f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if not p and self.model.moe_layer_ids() and self.model.moe.num_experts % self.parallel.ep:
            p.append(
                f"parallel.ep: {self.parallel.ep} does not divide model.moe.num_experts="
                f"{self.model.moe.num_experts} (each expert-parallel rank holds num_experts / ep experts)"
            )
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def apply_overrides(data: dict, overrides: typing.Sequence[str], cls: type = Config) -> dict:
    """Apply dotted overrides to a nested dict (in place) and return it."""
    top = {f.name for f in dataclasses.fields(cls)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for text in overrides:
        path, value = parse_override(text)
        if cls is Config and path[0] not in top and path[0] in model_fields:
            path = ["model", *path]  # `moe.top_k` is shorthand for `model.moe.top_k`
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError([f"--set {text}: {part!r} is a value, not a section"])
            node = nxt
        node[path[-1]] = value
    return data


def load_config(config: Any = None, overrides: typing.Sequence[str] = (), cls: type = Config):
    """A `Config` from a YAML path, a dict, an existing config object (copied) or None (the defaults),
    with `--set` style overrides applied on top and every problem reported at once."""
    if isinstance(config, cls):
        if not overrides:
            return config
        config = dataclasses.asdict(config)
    if isinstance(config, dict):
        data, source = copy.deepcopy(config), None  # overrides edit nested dicts in place
    elif config is None:
        data, source = {}, None
    elif isinstance(config, (str, Path)):
        data, source = read_yaml(config), str(config)
    else:
        raise TypeError(f"config must be a {cls.__name__}, a dict or a YAML path, got {type(config).__name__}")
    apply_overrides(data, overrides, cls)
    return from_dict(cls, data, source=source)


def save_config(cfg: Any, path: str | Path) -> None:
    from moelab.fileio import write_file_atomic

    write_file_atomic(Path(path), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
