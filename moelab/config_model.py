"""The model's configuration: `ModelConfig` (the decoder-only transformer) and `MoEConfig` (its MoE
feed-forward layers). Part of the typed configuration in `moelab.config`, which re-exports both; loading,
overrides and error reporting live there and in `config_build.py`."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# The router names; `model/router_registry.py` maps each to its class (a test keeps the two equal).
RouterName = Literal[
    "softmax_topk", "topk_softmax", "sigmoid", "noisy_topk", "gumbel", "expert_choice", "top_p", "hierarchical"
]
ROUTERS = typing.get_args(RouterName)
QKNorm = Literal["none", "head", "full"]
QK_NORMS = typing.get_args(QKNorm)


@dataclass
class MoEConfig:
    """The MoE feed-forward: router, experts, capacity and balancing losses."""

    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 512  # width F of each routed expert (fine-grained experts: many narrow ones)
    # Which layers are MoE: "all", "every:N" (layers N-1, 2N-1, ...), "first_dense:K" (layer >= K is
    # MoE), "none", or an explicit list of layer indices.
    layers: Any = "all"
    router: RouterName = "softmax_topk"
    normalize: bool = True  # renormalise top-k weights to sum to 1 (Mixtral yes, Qwen default no)
    routed_scaling_factor: float = 1.0  # multiplies the routed weights (DeepSeek-V3 uses 2.5)
    router_bias: bool = False  # sigmoid router: per-expert selection bias for aux-loss-free balancing
    bias_update_rate: float = 0.0  # gamma of the aux-loss-free bias update (DeepSeek-V3: 1e-3)
    router_init_std: float | None = None  # router gates start as N(0, this); None = model.init_std
    noise_std: float = 1.0  # noisy_topk: scale of the learned-softplus noise
    gumbel_tau: float = 1.0  # gumbel: initial temperature (the trainer may anneal it)
    num_shared_experts: int = 0
    shared_expert_dim: int | None = None  # default: expert_dim
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x . w) scales the shared expert output
    capacity_factor: float | None = None  # None = dropless
    eval_capacity_factor: float | None = None  # None = same as capacity_factor
    # How the routed experts run (moelab.kernels): "auto" = grouped_mm on a GPU, cpu_buckets on a CPU;
    # "reference" = the slow mask-and-loop oracle.
    expert_backend: Literal["auto", "reference", "cpu_buckets", "grouped_mm"] = "auto"
    # Auxiliary loss coefficients (0 disables a term). Each loss is computed per layer, then averaged.
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    cv_coef: float = 0.0
    variance_coef: float = 0.0
    # Dynamic and structured MoE (moelab/model/routers_dynamic.py, docs/model.md "Dynamic MoE").
    top_p: float = 0.7  # router top_p: smallest expert set whose probability mass reaches p, at most top_k
    num_null_experts: int = 0  # softmax_topk/top_p: zero experts; a slot routed to one costs nothing
    num_groups: int = 1  # router hierarchical: G groups of num_experts / G experts ...
    top_groups: int = 1  # ... of which each token's group router picks this many
    num_tasks: int = 0  # > 0: a learned task embedding (source id) is added to the router input
    group_balance_coef: float = 0.0  # hierarchical: switch-style balance over groups
    task_balance_coef: float = 0.0  # num_tasks > 0: load balance computed per task, then averaged
    diversity_coef: float = 0.0  # expert diversity: mean squared cosine between experts' weights
    null_balance_coef: float = 0.01  # null experts: pulls the mean real experts per token towards null_k_target
    null_k_target: float | None = None  # null experts: intended mean real experts per token; None = (1 + top_k) / 2

    @property
    def active_ffn_dim(self) -> int:
        """Width of the dense SwiGLU with this MoE's active expert parameters per token (top_k routed plus
        the shared experts): the dense twin's `ffn_dim` in comparisons of equal active compute."""
        return self.top_k * self.expert_dim + self.num_shared_experts * (self.shared_expert_dim or self.expert_dim)

    @staticmethod
    def upgrade_legacy(data: dict) -> dict:
        """Configs written before the expert backends said `expert_impl: grouped | reference`."""
        if "expert_impl" in data and "expert_backend" not in data:
            data = dict(data)
            old = data.pop("expert_impl")
            data["expert_backend"] = {"grouped": "auto"}.get(old, old)
        return data

    def validate(self, prefix: str = "moe") -> list[str]:
        p: list[str] = []
        if self.num_experts < 1:
            p.append(f"{prefix}.num_experts: expected >= 1, got {self.num_experts}")
        if self.top_k < 1:
            p.append(f"{prefix}.top_k: expected >= 1, got {self.top_k}")
        elif self.top_k > self.num_experts:
            p.append(f"{prefix}.top_k: {self.top_k} is larger than moe.num_experts={self.num_experts}")
        if self.expert_dim < 1:
            p.append(f"{prefix}.expert_dim: expected >= 1, got {self.expert_dim}")
        if self.expert_backend == "grouped_mm" and (self.expert_dim % 8 or self.expert_dim < 1):
            p.append(
                f"{prefix}.expert_backend: grouped_mm needs expert_dim a multiple of 8 (16-byte rows), "
                f"got {self.expert_dim}"
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                p.append(f"{prefix}.{name}: expected > 0 or null (dropless), got {v}")
        if self.num_shared_experts < 0:
            p.append(f"{prefix}.num_shared_experts: expected >= 0, got {self.num_shared_experts}")
        if self.router_init_std is not None and self.router_init_std < 0:
            p.append(f"{prefix}.router_init_std: expected >= 0 or null (= model.init_std), got {self.router_init_std}")
        if self.gumbel_tau <= 0:
            p.append(f"{prefix}.gumbel_tau: expected > 0, got {self.gumbel_tau}")
        if self.router_bias and self.router != "sigmoid":
            p.append(f"{prefix}.router_bias: only the sigmoid router has a selection bias, router is {self.router!r}")
        if self.router == "expert_choice" and self.capacity_factor is None:
            p.append(
                f"{prefix}.capacity_factor: expert_choice routing needs a capacity factor (tokens per "
                "expert = cf * T / E), got null"
            )
        for name in ("load_balance_coef", "z_loss_coef", "cv_coef", "variance_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                p.append(f"{prefix}.{name}: expected >= 0, got {getattr(self, name)}")
        from moelab.model.dynamic_config import validate_dynamic

        return p + validate_dynamic(self, prefix)


@dataclass
class ModelConfig:
    """The decoder-only transformer. `moe` describes its MoE layers (see `MoEConfig.layers`)."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    head_dim: int | None = None  # None = d_model // n_heads
    ffn_dim: int = 1024  # width of dense SwiGLU layers
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    # RMSNorm on queries and keys before RoPE: "none", "head" (one weight [head_dim] applied to every
    # head, Qwen3) or "full" (over the whole projection, [n_heads*head_dim] and [kv_heads*head_dim], OLMoE).
    qk_norm: QKNorm = "none"
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hdim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def moe_layer_ids(self) -> list[int]:
        """Indices of the layers whose feed-forward is an MoE layer."""
        spec, n = self.moe.layers, self.n_layers
        if isinstance(spec, list):
            return sorted(int(i) for i in spec)
        if spec == "all":
            return list(range(n))
        if spec == "none":
            return []
        kind, _, num = str(spec).partition(":")
        if kind == "every":
            return [i for i in range(n) if (i + 1) % int(num) == 0]
        if kind == "first_dense":
            return list(range(int(num), n))
        raise ValueError(spec)

    def validate(self, prefix: str = "model") -> list[str]:
        p: list[str] = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                p.append(f"{prefix}.{name}: expected >= 1, got {getattr(self, name)}")
        if p:
            return p + self.moe.validate(f"{prefix}.moe")
        if self.head_dim is None and self.d_model % self.n_heads:
            p.append(f"{prefix}.d_model: {self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            p.append(f"{prefix}.n_heads: {self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.hdim % 2:
            p.append(f"{prefix}.head_dim: RoPE needs an even head dimension, got {self.hdim}")
        p += _validate_layers(self.moe.layers, self.n_layers, f"{prefix}.moe.layers")
        if self.moe.expert_backend == "grouped_mm" and self.d_model % 8:
            p.append(
                f"{prefix}.moe.expert_backend: grouped_mm needs d_model a multiple of 8 (16-byte rows), "
                f"got {self.d_model}"
            )
        return p + self.moe.validate(f"{prefix}.moe")


def _validate_layers(spec: Any, n_layers: int, where: str) -> list[str]:
    if isinstance(spec, list):
        bad = [i for i in spec if not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            return [f"{where}: layer indices must be in [0, {n_layers}), got {bad}"]
        return []
    if spec in ("all", "none"):
        return []
    kind, _, num = str(spec).partition(":")
    if kind in ("every", "first_dense") and num.isdigit() and (kind == "first_dense" or int(num) > 0):
        return []
    return [f"{where}: expected 'all', 'none', 'every:N', 'first_dense:K' or a list of layer indices, got {spec!r}"]
