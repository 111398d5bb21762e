"""Declarative weight maps between moelab and Hugging Face causal-LM checkpoints.

An architecture is an `ArchSpec` (a row of data). `weight_map(cfg, spec)` expands it, for one
`ModelConfig`, into a list of rules; the same rules drive both directions:
- `Rename`: one moelab tensor is one HF tensor (`alt` lists other accepted on-disk names);
- `StackExperts`: a moelab [E, ...] expert tensor is E per-expert HF tensors, each the row-wise
  concatenation of `per_expert[e]` (Mixtral's w1 ++ w3 is our gate_up), or one fused HF 3-D tensor
  (transformers 5.x `save_original_format=False`), which already is our layout;
- `ZeroTensor`: an HF tensor moelab lacks (e.g. an o_proj bias). It is written as zeros; on import
  it must be all zeros, because any other value is a feature moelab cannot express.
Exports write the legacy per-expert names: transformers 4.x reads only those and 5.x converts them
on load (docs/interop.md, "Architectures").
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.config import ModelConfig


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    hf_class: str  # config.json `architectures[0]`
    moe_block: str  # on-disk name of the MoE block ("block_sparse_moe" for Mixtral)
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) names on disk
    qk_norm: str  # the attention variant (moelab `ModelConfig.qk_norm`)
    shared_expert: bool  # a sigmoid-gated shared expert in every MoE layer (Qwen2-MoE)
    moe: bool  # False: a dense architecture (import and upcycling only)
    attn_bias: str  # "none"; "qkv" = q/k/v biases (Qwen2 family); "all" = q/k/v/o (`attention_bias`)
    dense_layers: bool  # can mix dense and MoE layers (Qwen `mlp_only_layers`)


ARCHS: dict[str, ArchSpec] = {
    "mixtral": ArchSpec(
        "mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "none", False, True, "none", False
    ),
    "qwen2_moe": ArchSpec(
        "qwen2_moe",
        "Qwen2MoeForCausalLM",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "none",
        True,
        True,
        "qkv",
        True,
    ),
    "qwen3_moe": ArchSpec(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "head",
        False,
        True,
        "all",
        True,
    ),
    "olmoe": ArchSpec(
        "olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "full", False, True, "all", False
    ),
    "llama": ArchSpec(
        "llama", "LlamaForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "none", False, False, "all", False
    ),
    "qwen2": ArchSpec(
        "qwen2", "Qwen2ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "none", False, False, "qkv", False
    ),
}
MOE_ARCHS = tuple(k for k, v in ARCHS.items() if v.moe)

# Buffers some older checkpoints carry; they are recomputed from the config, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Rename:
    ours: str
    theirs: str
    alt: tuple[str, ...] = ()


@dataclass(frozen=True)
class StackExperts:
    ours: str  # [E, rows, cols]
    per_expert: tuple[tuple[str, ...], ...]  # [e] -> HF names concatenated along rows
    fused: str  # the one-tensor 5.x name


@dataclass(frozen=True)
class ZeroTensor:
    theirs: str
    shape: tuple[int, ...]


Rule = Rename | StackExperts | ZeroTensor

# moelab name inside a block -> HF name inside `model.layers.{i}.`
ATTENTION = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
QKV_BIAS = (
    ("attn.q_proj.bias", "self_attn.q_proj.bias"),
    ("attn.k_proj.bias", "self_attn.k_proj.bias"),
    ("attn.v_proj.bias", "self_attn.v_proj.bias"),
)
QK_NORM = (("attn.q_norm.weight", "self_attn.q_norm.weight"), ("attn.k_norm.weight", "self_attn.k_norm.weight"))
DENSE_FFN = (
    ("ffn.gate_proj.weight", "mlp.gate_proj.weight"),
    ("ffn.up_proj.weight", "mlp.up_proj.weight"),
    ("ffn.down_proj.weight", "mlp.down_proj.weight"),
)
SHARED_EXPERT = (  # relative to the MoE block
    ("ffn.shared.gate_proj.weight", "shared_expert.gate_proj.weight"),
    ("ffn.shared.up_proj.weight", "shared_expert.up_proj.weight"),
    ("ffn.shared.down_proj.weight", "shared_expert.down_proj.weight"),
    ("ffn.shared_gate.weight", "shared_expert_gate.weight"),
)


def hf_bias_default(cfg: ModelConfig, spec: ArchSpec) -> bool:
    """Whether the HF side carries attention biases when writing `cfg`: the Qwen2 family always
    does (transformers 4.x has no switch), `attention_bias` architectures when moelab has them."""
    return spec.attn_bias == "qkv" or (spec.attn_bias == "all" and cfg.qkv_bias)


def weight_map(cfg: ModelConfig, spec: ArchSpec, hf_bias: bool | None = None) -> list[Rule]:
    """Every tensor of a moelab model with config `cfg`, as rules for architecture `spec`. `hf_bias`:
    the HF checkpoint has attention biases (default `hf_bias_default`); those moelab lacks are zeros."""
    hf_bias = hf_bias_default(cfg, spec) if hf_bias is None else hf_bias
    hd = cfg.hdim
    bias_shapes = {"q_proj": cfg.n_heads * hd, "k_proj": cfg.kv_heads * hd, "v_proj": cfg.kv_heads * hd}
    rules: list[Rule] = [Rename("embed.weight", "model.embed_tokens.weight")]
    moe_ids = set(cfg.moe_layer_ids())
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        pairs = list(ATTENTION)
        if cfg.qkv_bias:
            pairs += QKV_BIAS
        if cfg.qk_norm != "none":
            pairs += QK_NORM
        if i not in moe_ids:
            pairs += DENSE_FFN
        rules += [Rename(ours + a, hf + b) for a, b in pairs]
        if hf_bias and not cfg.qkv_bias:
            rules += [ZeroTensor(f"{hf}self_attn.{n}.bias", (size,)) for n, size in bias_shapes.items()]
        if hf_bias and spec.attn_bias == "all":
            rules.append(ZeroTensor(hf + "self_attn.o_proj.bias", (cfg.d_model,)))
        if i in moe_ids:
            rules += _moe_rules(cfg, spec, ours, hf)
    rules.append(Rename("norm.weight", "model.norm.weight"))
    if not cfg.tie_embeddings:
        rules.append(Rename("lm_head.weight", "lm_head.weight"))
    return rules


def _moe_rules(cfg: ModelConfig, spec: ArchSpec, ours: str, hf: str) -> list[Rule]:
    block = hf + spec.moe_block + "."
    alt_block = hf + "mlp."  # 5.x renames Mixtral's block_sparse_moe to mlp in memory and fused files
    gate, up, down = spec.expert_names
    e_range = range(cfg.moe.num_experts)
    rules: list[Rule] = [
        Rename(
            ours + "ffn.router.weight",
            block + "gate.weight",
            (alt_block + "gate.weight",) if alt_block != block else (),
        )
    ]
    rules.append(
        StackExperts(
            ours + "ffn.experts.gate_up",
            tuple((f"{block}experts.{e}.{gate}.weight", f"{block}experts.{e}.{up}.weight") for e in e_range),
            alt_block + "experts.gate_up_proj",
        )
    )
    rules.append(
        StackExperts(
            ours + "ffn.experts.down",
            tuple((f"{block}experts.{e}.{down}.weight",) for e in e_range),
            alt_block + "experts.down_proj",
        )
    )
    if cfg.moe.num_shared_experts:
        rules += [Rename(ours + a, block + b) for a, b in SHARED_EXPERT]
    return rules
