"""config.json <-> `ModelConfig` for the architectures in `hf_maps.ARCHS`.

Reading follows transformers' own defaults (5.23 class defaults, checked by a test) and refuses every
setting moelab cannot express (sliding windows, RoPE scaling, qkv clipping, other activations).
Writing emits the fields both transformers 4.x and 5.x read: `rope_theta` next to
`rope_parameters`, `num_experts` next to `num_local_experts`, `torch_dtype` next to `dtype`
(docs/interop.md).
"""

from __future__ import annotations

from typing import Any

from moelab.config import ModelConfig, MoEConfig
from moelab.errors import UserError
from moelab.interop.hf_maps import ARCHS, MOE_ARCHS, ArchSpec

# transformers 5.23 class defaults for the optional fields moelab reads.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 131072},
    "qwen2_moe": {
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e4,
        "max_position_embeddings": 32768,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e4,
        "max_position_embeddings": 32768,
        "norm_topk_prob": False,
    },
    "olmoe": {
        "num_key_value_heads": None,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e4,
        "max_position_embeddings": 4096,
        "norm_topk_prob": False,
        "router_aux_loss_coef": 0.01,
    },
    "llama": {"num_key_value_heads": None, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "max_position_embeddings": 2048},
    "qwen2": {"num_key_value_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "max_position_embeddings": 32768},
}
COMMON = {"tie_word_embeddings": False, "initializer_range": 0.02, "hidden_act": "silu", "router_aux_loss_coef": 0.001}

# (field, what moelab needs it for); a missing one is an error, not a silent default.
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
REQUIRED_BY_ARCH = {
    "mixtral": ("intermediate_size", "num_local_experts|num_experts", "num_experts_per_tok"),
    "qwen2_moe": (
        "moe_intermediate_size",
        "num_experts|num_local_experts",
        "num_experts_per_tok",
        "shared_expert_intermediate_size",
    ),
    "qwen3_moe": ("moe_intermediate_size", "num_experts|num_local_experts", "num_experts_per_tok"),
    "olmoe": ("intermediate_size", "num_experts|num_local_experts", "num_experts_per_tok"),
    "llama": ("intermediate_size",),
    "qwen2": ("intermediate_size",),
}


class _Fields:
    """Typed access to config.json with one-line errors naming the file and field."""

    def __init__(self, data: dict, source: str, arch: str):
        self.data, self.source, self.defaults = data, source, {**COMMON, **HF_DEFAULTS[arch]}

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, kind: type = int):
        names = key.split("|")
        for name in names:
            if name in self.data and self.data[name] is not None:
                return self._check(name, self.data[name], kind)
        if names[0] in self.defaults:
            return self.defaults[names[0]]
        raise UserError(
            f"{self.source}: missing field {names[0]!r}" + (f" (or {names[1]!r})" if len(names) > 1 else "")
        )

    def _check(self, name: str, value, kind: type):
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise UserError(f"{self.source}: field {name!r} must be >= 0, got {value}")
            return value
        if kind in (bool, str, list) and isinstance(value, kind):
            return value
        raise UserError(f"{self.source}: field {name!r} expected {kind.__name__}, got {type(value).__name__} {value!r}")


def detect_arch(data: dict, source: str) -> ArchSpec:
    model_type = data.get("model_type")
    if model_type is None:
        raise UserError(f"{source}: missing field 'model_type' (expected one of {', '.join(ARCHS)})")
    if model_type not in ARCHS:
        raise UserError(
            f"{source}: unsupported architecture model_type={model_type!r}; expected one of {', '.join(ARCHS)}"
        )
    return ARCHS[model_type]


def from_hf_config(data: dict, source: str) -> tuple[ModelConfig, ArchSpec, list[str]]:
    """(model config, architecture, notes) from a parsed config.json. Raises UserError for a missing
    or ill-typed field and for any feature moelab cannot express."""
    spec = detect_arch(data, source)
    f = _Fields(data, source, spec.model_type)
    for key in REQUIRED + REQUIRED_BY_ARCH[spec.model_type]:
        f.get(key)
    notes: list[str] = []
    refuse = _unsupported(data, f, spec, source)
    if refuse:
        raise UserError("\n".join(refuse))

    d, n_heads, n_layers = f.get("hidden_size"), f.get("num_attention_heads"), f.get("num_hidden_layers")
    kv = f.get("num_key_value_heads") or n_heads
    head_dim = f.get("head_dim") if f.has("head_dim") else None
    if head_dim == d // max(1, n_heads):
        head_dim = None
    moe = MoEConfig(layers="none")
    ffn_dim = f.get("intermediate_size") if f.has("intermediate_size") else 1
    if spec.moe:
        num_experts = (
            f.get("num_experts|num_local_experts")
            if spec.model_type != "mixtral"
            else f.get("num_local_experts|num_experts")
        )
        top_k = f.get("num_experts_per_tok")
        expert_dim = f.get("moe_intermediate_size" if spec.model_type.startswith("qwen") else "intermediate_size")
        ids = moe_layer_ids(data, f, spec, n_layers, num_experts)
        layers: Any = "all" if ids == list(range(n_layers)) else ("none" if not ids else ids)
        if spec.dense_layers and len(ids) < n_layers:
            ffn_dim = f.get("intermediate_size")
        normalize = True if spec.model_type == "mixtral" else f.get("norm_topk_prob", bool)
        shared = f.get("shared_expert_intermediate_size") if spec.shared_expert else 0
        moe = MoEConfig(
            num_experts=max(1, num_experts),
            top_k=top_k,
            expert_dim=expert_dim,
            layers=layers,
            router="softmax_topk",
            normalize=normalize,
            num_shared_experts=1 if shared else 0,
            shared_expert_dim=shared or None,
            shared_expert_gate=bool(shared),
            # HF's aux loss counts top-k assignments (balanced = k); moelab's is balanced = 1.
            load_balance_coef=f.get("router_aux_loss_coef", float) * top_k,
        )
        if spec.model_type == "mixtral" and f.has("router_jitter_noise") and f.get("router_jitter_noise", float):
            notes.append(
                f"router_jitter_noise={data['router_jitter_noise']} (training-only input jitter) is not carried over"
            )
    cfg = ModelConfig(
        vocab_size=f.get("vocab_size"),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        ffn_dim=max(1, ffn_dim),
        max_seq_len=f.get("max_position_embeddings"),
        rope_theta=rope_theta(data, f),
        norm_eps=f.get("rms_norm_eps", float),
        tie_embeddings=f.get("tie_word_embeddings", bool),
        qkv_bias=hf_has_qkv_bias(data, f, spec),
        qk_norm=spec.qk_norm,
        init_std=f.get("initializer_range", float),
        moe=moe,
    )
    problems = cfg.validate()
    if problems:
        raise UserError("\n".join(f"{source}: gives an invalid moelab model: {p}" for p in problems))
    return cfg, spec, notes


def moe_layer_ids(data: dict, f: _Fields, spec: ArchSpec, n_layers: int, num_experts: int) -> list[int]:
    """Qwen: layer i is MoE iff i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0."""
    if not spec.dense_layers:
        return list(range(n_layers))
    step = f.get("decoder_sparse_step") if f.has("decoder_sparse_step") else 1
    only = f.get("mlp_only_layers", list) if f.has("mlp_only_layers") else []
    if step < 1:
        raise UserError(f"{f.source}: field 'decoder_sparse_step' must be >= 1, got {step}")
    return [i for i in range(n_layers) if i not in only and num_experts > 0 and (i + 1) % step == 0]


def hf_has_qkv_bias(data: dict, f: _Fields, spec: ArchSpec) -> bool:
    if spec.attn_bias == "none":
        return False
    if spec.model_type == "qwen2":
        return True  # Qwen2 always has q/k/v biases
    if spec.model_type == "qwen2_moe":
        return f.get("qkv_bias", bool) if f.has("qkv_bias") else True  # 4.x: always, 5.x: qkv_bias
    return f.get("attention_bias", bool) if f.has("attention_bias") else False


def rope_theta(data: dict, f: _Fields) -> float:
    params = data.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return f.get("rope_theta", float)


def _unsupported(data: dict, f: _Fields, spec: ArchSpec, source: str) -> list[str]:
    """One line per config.json setting moelab's model cannot reproduce."""
    out = []
    act = data.get("hidden_act", "silu")
    if act != "silu":
        out.append(f"{source}: hidden_act={act!r} is not supported (moelab's SwiGLU uses silu)")
    for key in ("rope_parameters", "rope_scaling"):
        rp = data.get(key)
        if isinstance(rp, dict):
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                out.append(f"{source}: {key} type {kind!r} is not supported (moelab has plain RoPE only)")
                break
    window = data.get("sliding_window")
    uses_window = data.get("use_sliding_window", spec.model_type == "mixtral")
    if uses_window and window and window < f.get("max_position_embeddings"):
        out.append(f"{source}: sliding_window={window} is not supported (moelab attends to the full context)")
    kinds = set(data.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        out.append(f"{source}: layer_types {sorted(kinds)} are not supported (full attention only)")
    if data.get("clip_qkv") is not None:
        out.append(f"{source}: clip_qkv={data['clip_qkv']} is not supported (no q/k/v clamping in moelab)")
    if data.get("mlp_bias"):
        out.append(f"{source}: mlp_bias=true is not supported (moelab's FFNs have no biases)")
    n_heads, d = data.get("num_attention_heads"), data.get("hidden_size")
    if spec.model_type in ("olmoe", "qwen2_moe", "qwen2") and data.get("head_dim") not in (None, d // max(1, n_heads)):
        out.append(
            f"{source}: head_dim={data['head_dim']} differs from hidden_size/num_attention_heads, "
            f"which {spec.model_type} requires"
        )
    if spec.shared_expert and data.get("shared_expert_intermediate_size") == 0:
        out.append(f"{source}: shared_expert_intermediate_size=0 (an empty shared expert) is not supported")
    return out


# ----------------------------------------------------------------------------------------------------
# Export


def routed_normalized(cfg: ModelConfig) -> bool:
    """Whether the router's top-k weights sum to 1 (topk_softmax always renormalises)."""
    return cfg.moe.normalize or cfg.moe.router == "topk_softmax"


def export_problems(cfg: ModelConfig, spec: ArchSpec) -> list[str]:
    """Why `cfg` cannot be written as `spec` (empty when it can)."""
    m, name, p = cfg.moe, spec.model_type, []
    moe_ids = cfg.moe_layer_ids()
    if not spec.moe:
        if moe_ids:
            p.append(f"{name} is a dense architecture but the model has MoE layers {moe_ids}")
    elif moe_ids:
        if m.router not in ("softmax_topk", "topk_softmax"):
            p.append(f"router {m.router!r} cannot be expressed as {name} (softmax top-k routing only)")
        if m.routed_scaling_factor != 1.0:
            p.append(f"moe.routed_scaling_factor={m.routed_scaling_factor} cannot be expressed as {name}")
        if m.capacity_factor is not None or m.eval_capacity_factor is not None:
            p.append(
                f"capacity limits (moe.capacity_factor={m.capacity_factor}) cannot be expressed: "
                f"{name} in transformers is dropless"
            )
        if name == "mixtral" and not routed_normalized(cfg):
            p.append("mixtral always renormalises the top-k weights but moe.normalize=false")
        if spec.shared_expert and not (m.num_shared_experts and m.shared_expert_gate):
            p.append(
                f"{name} needs a sigmoid-gated shared expert (moe.num_shared_experts>0, moe.shared_expert_gate=true)"
            )
        if not spec.shared_expert and m.num_shared_experts:
            p.append(f"{name} has no shared experts but moe.num_shared_experts={m.num_shared_experts}")
    if spec.moe and not spec.dense_layers and len(moe_ids) != cfg.n_layers:
        dense = sorted(set(range(cfg.n_layers)) - set(moe_ids))
        p.append(f"every {name} layer is MoE but layers {dense} are dense")
    if cfg.qk_norm != spec.qk_norm:
        p.append(f"qk_norm={cfg.qk_norm!r} cannot be expressed as {name} (which has qk_norm={spec.qk_norm!r})")
    if cfg.qkv_bias and spec.attn_bias == "none":
        p.append(f"qkv_bias=true cannot be expressed as {name} (no attention biases)")
    if cfg.head_dim not in (None, cfg.d_model // cfg.n_heads) and name in ("olmoe", "qwen2_moe", "qwen2"):
        p.append(f"head_dim={cfg.head_dim} != d_model/n_heads cannot be expressed as {name}")
    return p


def choose_arch(cfg: ModelConfig) -> ArchSpec:
    """The first architecture that expresses `cfg` exactly, else an error with every reason."""
    order = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe") if cfg.moe_layer_ids() else ("llama",)
    reasons = []
    for name in order:
        problems = export_problems(cfg, ARCHS[name])
        if not problems:
            return ARCHS[name]
        reasons.append(f"{name}: {'; '.join(problems)}")
    raise UserError("no Hugging Face architecture expresses this model:\n" + "\n".join(reasons))


def to_hf_config(cfg: ModelConfig, spec: ArchSpec, dtype: str, special: dict[str, int | None]) -> dict:
    """config.json for `cfg` written as `spec`; `special` holds bos/eos/pad token ids (or None)."""
    m = cfg.moe
    out: dict[str, Any] = {
        "architectures": [spec.hf_class],
        "model_type": spec.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.hdim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "attention_dropout": 0.0,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "dtype": dtype,
        "torch_dtype": dtype,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
    }
    dense = sorted(set(range(cfg.n_layers)) - set(cfg.moe_layer_ids()))
    if spec.moe:
        out.update(
            {
                "num_experts": m.num_experts,
                "num_local_experts": m.num_experts,
                "num_experts_per_tok": m.top_k,
                "output_router_logits": False,
                "router_aux_loss_coef": m.load_balance_coef / m.top_k,
            }
        )
    if spec.model_type == "mixtral":
        out.update({"intermediate_size": m.expert_dim, "sliding_window": None, "router_jitter_noise": 0.0})
    elif spec.model_type in ("qwen2_moe", "qwen3_moe"):
        out.update(
            {
                "intermediate_size": cfg.ffn_dim,
                "moe_intermediate_size": m.expert_dim,
                "norm_topk_prob": routed_normalized(cfg),
                "decoder_sparse_step": 1,
                "mlp_only_layers": dense,
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": cfg.n_layers,
            }
        )
        if spec.model_type == "qwen2_moe":
            width = (m.shared_expert_dim or m.expert_dim) * m.num_shared_experts
            out.update({"shared_expert_intermediate_size": width, "qkv_bias": True})
        else:
            out["attention_bias"] = cfg.qkv_bias
    elif spec.model_type == "olmoe":
        out.update(
            {
                "intermediate_size": m.expert_dim,
                "norm_topk_prob": routed_normalized(cfg),
                "attention_bias": cfg.qkv_bias,
                "clip_qkv": None,
            }
        )
    elif spec.model_type == "llama":
        out.update({"intermediate_size": cfg.ffn_dim, "attention_bias": cfg.qkv_bias, "mlp_bias": False})
    elif spec.model_type == "qwen2":
        out.update(
            {
                "intermediate_size": cfg.ffn_dim,
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": cfg.n_layers,
            }
        )
    return out


__all__ = ["MOE_ARCHS", "choose_arch", "export_problems", "from_hf_config", "to_hf_config"]
