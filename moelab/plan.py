"""Memory planning: what fits where, from a config alone (no model is built).

Per device, for training: weights, gradients, AdamW state, activations (with and without activation
checkpointing), FSDP's gathered working set, and the peak of one optimizer step; for inference:
weights, the KV cache and the expert cache under offload. Then the largest micro-batch that fits.

The activation model counts what autograd keeps for backward in moelab's own modules (read off the
saved tensors of `Transformer`'s graph, see docs/scale-out.md), in elements per token per layer:
- attention: RMSNorm (x, 1/rms, x_hat, output) 3D+1; q, k, v after RoPE and the output fed to o_proj
  2HDh + 2GDh; the attention log-sum-exp H;
- MoE: RMSNorm 3D+1; router probs and logits 2E (+ small K terms); per routed copy (x K): the
  gathered row D, the gate|up pre-activation 2F, silu(gate) and the activation 2F, its routing weight 1
  (the CPU kernel's saved tensors; the weighted sum back per token keeps nothing);
  shared experts 4 F_shared; a dense FFN 4 ffn_dim;
- head: final RMSNorm 3D+1, the fp32 log-softmax V, and the logits V (alive until the step ends).
Backward is walked layer by layer: activations of layers not yet reached stay, gradients of layers
done accumulate, the block being differentiated holds gradient temporaries (`BACKWARD_WORKSPACE`, the
one measured constant), and the LM head's [T, V] gradients come first. The peak is the largest of
those moments (and of the optimizer step). The estimate is checked against measured peak memory on CPU in
tests/test_plan.py; it describes moelab's trainer (fp32 master weights, AdamW), not other stacks.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from moelab.config import ModelConfig
from moelab.errors import UserError
from moelab.model.counting import DTYPE_BYTES, count_params

OFFLOADS = ("none", "optimizer", "experts")
BACKWARD_WORKSPACE = 0.75  # gradient temporaries of the block in backward, as a fraction of its activations
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'80GiB', '24 GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--device-memory: expected a size like 80GiB, 24GB or 512MiB, got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise UserError(f"--device-memory: expected a positive size, got {text!r}")
    return int(value)


@dataclass
class LayerShapes:
    """Per-layer parameter counts (whole model, unsharded) the plan needs."""

    dense_params: list[int]  # per layer, everything but routed experts
    expert_params: list[int]  # per layer, all routed experts (0 for dense layers)
    head_params: int  # final norm + LM head (0 for the head when tied)
    embed_params: int


def layer_shapes(cfg: ModelConfig) -> LayerShapes:
    pc = count_params(cfg)
    moe = set(cfg.moe_layer_ids())
    n_moe, n_dense = len(moe), cfg.n_layers - len(moe)
    attn = pc.attention // cfg.n_layers + (pc.norms - cfg.d_model) // cfg.n_layers  # + its two norms
    moe_extra = (pc.shared_experts + pc.routers) // max(1, n_moe)
    dense_ffn = pc.dense_ffn // max(1, n_dense)
    per_expert_layer = pc.routed_experts // max(1, n_moe)
    dense = [attn + (moe_extra if i in moe else dense_ffn) for i in range(cfg.n_layers)]
    experts = [per_expert_layer if i in moe else 0 for i in range(cfg.n_layers)]
    return LayerShapes(dense, experts, pc.lm_head + cfg.d_model, pc.embedding)


def activation_elements(cfg: ModelConfig) -> tuple[list[float], float]:
    """(elements saved per token for each layer, elements per token for the head incl. logits)."""
    d, h, g, dh, m = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hdim, cfg.moe
    attn = 3 * d + 1 + 2 * h * dh + 2 * g * dh + h
    if cfg.qk_norm != "none":  # the pre-norm projections and their normalised copies
        attn += 2 * (h + g) * dh
    k = m.top_k
    moe = 3 * d + 1 + k * (d + 4 * m.expert_dim + 1) + 11 * k + 2 * m.num_experts + 3
    if m.num_shared_experts:
        moe += 4 * (m.shared_expert_dim or m.expert_dim) * m.num_shared_experts
        if m.shared_expert_gate:
            moe += d + 2
    dense = 3 * d + 1 + 4 * cfg.ffn_dim
    ids = set(cfg.moe_layer_ids())
    layers = [attn + (moe if i in ids else dense) for i in range(cfg.n_layers)]
    head = 3 * d + 1 + 2 * cfg.vocab_size  # final norm; fp32 log-softmax; the logits themselves
    return layers, head


@dataclass
class TrainMemory:
    """Bytes per device for one training step."""

    micro_batch: int  # sequences per device per micro-batch
    weights: int
    grads: int
    optimizer: int
    activations: int  # everything saved for backward, whole model, this micro-batch
    activations_checkpointed: int  # with activation checkpointing (block inputs + one block recomputed)
    fsdp_working_set: int  # gathered parameters/gradients of the blocks in flight (0 on one device)
    peak: int  # the largest moment of the step, for the chosen checkpointing setting
    host: int  # bytes kept in host memory by offload


@dataclass
class InferenceMemory:
    weights: int  # resident on the device
    expert_cache: int  # experts kept on the device when experts are offloaded
    kv_cache_per_token: int  # bytes per token of context, per sequence
    kv_cache: int  # for `batch` sequences of `context` tokens
    activations: int
    total: int
    host_or_disk: int  # expert bytes left in host memory or memory-mapped from disk
    batch: int
    context: int


@dataclass
class Plan:
    devices: int
    dp: int
    ep: int
    device_memory: int
    dtype: str
    offload: str
    activation_checkpointing: bool
    seq_len: int
    params_total: int
    params_active: int
    train: TrainMemory
    train_fits: bool
    max_micro_batch: int  # largest sequences per device per micro-batch that fit (0 = none)
    max_micro_batch_checkpointed: int
    inference: InferenceMemory
    inference_fits: bool
    max_context: int  # longest context for `batch` sequences that fits at inference (0 = none)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def train_memory(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    *,
    dtype: str = "float32",
    devices: int = 1,
    ep: int = 1,
    offload: str = "none",
    activation_checkpointing: bool = False,
    grad_accum: int = 1,
) -> TrainMemory:
    b = DTYPE_BYTES[dtype]
    opt_per_param = 8 + (4 if b < 4 else 0)  # two fp32 moments, + fp32 master weights for 16-bit training
    shapes = layer_shapes(cfg)
    n = devices
    total = count_params(cfg).total
    expert_total = sum(shapes.expert_params)
    dense_total = total - expert_total
    # FSDP shards everything over all ranks (experts: E/ep per ep rank, split again over dp).
    weights_dev, grads_dev, opt_dev = total * b / n, total * b / n, total * opt_per_param / n
    host = 0.0
    if offload == "optimizer":
        host += opt_dev
        opt_dev = 0.0
    elif offload == "experts":
        moved = expert_total / n
        host += moved * (2 * b + opt_per_param)
        weights_dev, grads_dev, opt_dev = dense_total * b / n, dense_total * b / n, dense_total * opt_per_param / n

    t = micro_batch * seq_len
    ab = b  # activations in the compute dtype; the fp32 log-softmax and its gradients at 4 bytes below
    layer_elems, head_elems = activation_elements(cfg)
    acts = [e * t * ab for e in layer_elems]
    logits = t * cfg.vocab_size * ab
    head_act = (head_elems - 2 * cfg.vocab_size) * t * ab + t * cfg.vocab_size * 4 + logits
    head_bwd = 2 * t * cfg.vocab_size * 4  # grads of the fp32 log-softmax and of the logits
    ckpt_acts = [cfg.d_model * t * ab] * cfg.n_layers  # each block keeps only its input
    one_block = max(acts, default=0.0)

    # Parameters/gradients gathered for the blocks in flight: current + prefetched block, and the
    # current block's unsharded gradient before its reduce-scatter (FSDP, or experts streamed from the
    # host). A layer's experts are E/ep per device.
    if n > 1:
        per_layer = [dp_ + ex / ep for dp_, ex in zip(shapes.dense_params, shapes.expert_params, strict=True)]
    else:
        per_layer = [ex if offload == "experts" else 0 for ex in shapes.expert_params]
    working = 3 * max(per_layer, default=0) * b

    persistent = weights_dev + opt_dev
    grad_layers = [(dp_ + ex) * b / n for dp_, ex in zip(shapes.dense_params, shapes.expert_params, strict=True)]
    if offload == "experts":
        grad_layers = [dp_ * b / n for dp_ in shapes.dense_params]
    grad_head = shapes.head_params * b / n
    grad_embed = shapes.embed_params * b / n
    held_grads = grads_dev if grad_accum > 1 else 0.0  # accumulated over micro-batches

    def peak_for(saved: list[float], checkpointed: bool) -> float:
        # Walk backward from the head: layers above `i` are done (their grads exist), layers at or
        # below `i` still hold their saved activations. The block being differentiated also holds its
        # gradient temporaries, about 3/4 of its saved activations (measured on the CPU test configs),
        # and under checkpointing its recomputed activations.
        moments = [sum(saved) + head_act + head_bwd + grad_head]
        done = grad_head
        for i in reversed(range(len(saved))):
            done += grad_layers[i]
            block = (1.0 + BACKWARD_WORKSPACE) * acts[i] if checkpointed else BACKWARD_WORKSPACE * acts[i]
            moments.append(sum(saved[: i + 1]) + block + logits + done)
        moments.append(logits + done + grad_embed)  # end of backward: every gradient exists
        return persistent + held_grads + working + max(moments)

    peak_plain = peak_for(acts, False)
    peak_ckpt = peak_for(ckpt_acts, True)
    step = persistent + grads_dev  # optimizer step: weights, state and all gradients
    peak = max(peak_ckpt if activation_checkpointing else peak_plain, step)
    return TrainMemory(
        micro_batch,
        int(weights_dev),
        int(grads_dev),
        int(opt_dev),
        int(sum(acts) + head_act),
        int(sum(ckpt_acts) + one_block + head_act),
        int(working),
        int(peak),
        int(host),
    )


def inference_memory(
    cfg: ModelConfig,
    *,
    dtype: str = "bfloat16",
    batch: int = 1,
    context: int | None = None,
    offload: str = "none",
    expert_cache: int | None = None,
) -> InferenceMemory:
    b = DTYPE_BYTES[dtype]
    context = context or cfg.max_seq_len
    shapes = layer_shapes(cfg)
    total = count_params(cfg).total
    expert_total = sum(shapes.expert_params)
    per_expert = 3 * cfg.d_model * cfg.moe.expert_dim if cfg.moe_layer_ids() else 0
    kv_tok = 2 * cfg.n_layers * cfg.kv_heads * cfg.hdim * b
    acts = batch * (cfg.d_model * 4 + cfg.vocab_size * 4)  # one decode step: hidden state and fp32 logits
    if offload == "experts" and expert_total:
        cache_n = expert_cache if expert_cache is not None else cfg.moe.num_experts
        cache = min(cache_n * per_expert, expert_total) * b
        weights = (total - expert_total) * b
        host = expert_total * b
    else:
        cache, weights, host = 0, total * b, 0
    kv = kv_tok * batch * context
    return InferenceMemory(
        int(weights),
        int(cache),
        int(kv_tok),
        int(kv),
        int(acts),
        int(weights + cache + kv + acts),
        int(host),
        batch,
        context,
    )


def _largest(fits, hi: int = 1 << 20) -> int:
    """Largest n in [1, hi] with fits(n) (monotone), 0 if none."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi and fits(min(hi, lo * 2)):
        lo = min(hi, lo * 2)
    step_hi = min(hi, lo * 2)
    while lo < step_hi - 1:
        mid = (lo + step_hi) // 2
        if fits(mid):
            lo = mid
        else:
            step_hi = mid
    return lo


def plan(
    cfg: ModelConfig,
    *,
    devices: int = 1,
    device_memory: int,
    dtype: str = "bfloat16",
    offload: str = "none",
    activation_checkpointing: bool = False,
    micro_batch: int = 1,
    seq_len: int | None = None,
    ep: int = 1,
    grad_accum: int = 1,
    batch: int = 1,
    context: int | None = None,
    expert_cache: int | None = None,
) -> Plan:
    if dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype: expected one of float32, bfloat16, float16, got {dtype!r}")
    if offload not in OFFLOADS:
        raise UserError(f"--offload: expected one of {', '.join(OFFLOADS)}, got {offload!r}")
    if devices < 1:
        raise UserError(f"--devices: expected >= 1, got {devices}")
    if devices % ep:
        raise UserError(f"--ep: {ep} does not divide --devices {devices}")
    if cfg.moe_layer_ids() and cfg.moe.num_experts % ep:
        raise UserError(f"--ep: {ep} does not divide model.moe.num_experts={cfg.moe.num_experts}")
    seq_len = seq_len or cfg.max_seq_len
    kw = dict(dtype=dtype, devices=devices, ep=ep, offload=offload, grad_accum=grad_accum)
    tm = train_memory(cfg, micro_batch, seq_len, activation_checkpointing=activation_checkpointing, **kw)
    pc = count_params(cfg)
    fits = lambda mb, ck: train_memory(cfg, mb, seq_len, activation_checkpointing=ck, **kw).peak <= device_memory  # noqa: E731
    im = inference_memory(cfg, dtype=dtype, batch=batch, context=context, offload=offload, expert_cache=expert_cache)

    def ctx_fits(c: int) -> bool:
        mem = inference_memory(cfg, dtype=dtype, batch=batch, context=c, offload=offload, expert_cache=expert_cache)
        return mem.total <= device_memory

    notes = []
    if offload == "experts":
        notes.append(
            "experts offloaded: training streams each layer's experts (and their gradients and AdamW "
            "state) from host memory; inference reads them lazily from memory-mapped safetensors, "
            "so host_or_disk may live on disk"
        )
    if offload == "optimizer":
        notes.append(
            "optimizer offloaded: AdamW state (and fp32 master weights) in host memory; the update runs on the host"
        )
    return Plan(
        devices,
        devices // ep,
        ep,
        device_memory,
        dtype,
        offload,
        activation_checkpointing,
        seq_len,
        pc.total,
        pc.active,
        tm,
        tm.peak <= device_memory,
        _largest(lambda mb: fits(mb, False)),
        _largest(lambda mb: fits(mb, True)),
        im,
        im.total <= device_memory,
        _largest(ctx_fits, hi=1 << 24),
        notes,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
