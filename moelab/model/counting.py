"""Parameter, FLOP and memory arithmetic from a config alone (no model is built, so a 100B config
costs nothing). A test checks the parameter counts against a built model.

FLOPs follow the PaLM convention (arXiv 2204.02311, appendix B): a forward pass costs 2 FLOPs per
active matmul parameter per token, plus 2 * 2 * n_layers * seq_len * (n_heads * head_dim) for the
attention scores and weighted values (full, not causal-halved, context); training = 3 x forward.
Embedding lookups cost nothing; the LM head is a matmul and counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moelab.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2, "f32": 4, "f16": 2}


@dataclass
class ParamCount:
    total: int
    active: int  # per token: routed experts count K of E
    embedding: int
    attention: int
    dense_ffn: int
    routed_experts: int  # all E experts, all MoE layers
    active_routed_experts: int
    shared_experts: int
    routers: int
    norms: int
    lm_head: int  # 0 when tied


def count_params(cfg: ModelConfig, active_k: float | None = None) -> ParamCount:
    """`active_k`: experts per token for the active count (an adaptive router's measured mean k;
    default moe.top_k, which is k_max for those routers)."""
    d, hd, m = cfg.d_model, cfg.hdim, cfg.moe
    n_moe = len(cfg.moe_layer_ids())
    n_dense = cfg.n_layers - n_moe
    attn = d * hd * (cfg.n_heads + 2 * cfg.kv_heads) + cfg.n_heads * hd * d
    if cfg.qkv_bias:
        attn += hd * (cfg.n_heads + 2 * cfg.kv_heads)
    attention = attn * cfg.n_layers
    dense_ffn = 3 * d * cfg.ffn_dim * n_dense
    routed = 3 * d * m.expert_dim * m.num_experts * n_moe
    active_routed = round(3 * d * m.expert_dim * (m.top_k if active_k is None else active_k) * n_moe)
    shared_w = (m.shared_expert_dim or m.expert_dim) * m.num_shared_experts
    shared = (3 * d * shared_w + (d if m.shared_expert_gate and shared_w else 0)) * n_moe
    gates = (m.num_experts + m.num_null_experts) * (2 if m.router == "noisy_topk" else 1)
    gates += m.num_groups if m.router == "hierarchical" else 0  # the group gate
    router = (d * gates + d * m.num_tasks) * n_moe  # + the task embedding
    norms = d * (2 * cfg.n_layers + 1)
    if cfg.qk_norm == "head":
        norms += 2 * hd * cfg.n_layers
    elif cfg.qk_norm == "full":
        norms += hd * (cfg.n_heads + cfg.kv_heads) * cfg.n_layers
    embedding = cfg.vocab_size * d
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embedding + attention + dense_ffn + routed + shared + router + norms + lm_head
    active = total - routed + active_routed
    return ParamCount(
        total, active, embedding, attention, dense_ffn, routed, active_routed, shared, router, norms, lm_head
    )


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, active_k: float | None = None) -> dict[str, int]:
    """Forward ('inference') and training FLOPs per token at context `seq_len` (`active_k`: see
    `count_params`; the task embedding is a lookup, counted as a matmul here: negligible)."""
    s = seq_len or cfg.max_seq_len
    pc = count_params(cfg, active_k)
    matmul_params = pc.active - pc.embedding - pc.norms + (pc.embedding if cfg.tie_embeddings else 0)
    fwd = 2 * matmul_params + 4 * cfg.n_layers * s * cfg.n_heads * cfg.hdim
    return {"inference": fwd, "train": 3 * fwd}


def memory_bytes(cfg: ModelConfig, dtype: str = "float32") -> dict[str, int]:
    """Bytes for weights and gradients in `dtype` and AdamW state (two fp32 moments, plus an fp32
    master copy when training in a 16-bit dtype)."""
    n = count_params(cfg).total
    b = DTYPE_BYTES[dtype]
    adam = 8 * n + (4 * n if b < 4 else 0)
    return {"weights": n * b, "grads": n * b, "adamw_state": adam}


def summary(
    cfg: ModelConfig, dtype: str = "float32", seq_len: int | None = None, active_k: float | None = None
) -> dict:
    pc = count_params(cfg, active_k)
    return {
        "params": asdict(pc),
        "flops_per_token": flops_per_token(cfg, seq_len, active_k),
        "active_k": active_k if active_k is not None else (cfg.moe.top_k if cfg.moe_layer_ids() else 0),
        "memory_bytes": memory_bytes(cfg, dtype),
        "dtype": dtype,
        "seq_len": seq_len or cfg.max_seq_len,
        "moe_layers": cfg.moe_layer_ids(),
        "num_experts": cfg.moe.num_experts if cfg.moe_layer_ids() else 0,
        "top_k": cfg.moe.top_k if cfg.moe_layer_ids() else 0,
    }
