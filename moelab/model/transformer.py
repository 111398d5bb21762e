"""The decoder-only MoE language model, readable top to bottom.

embedding -> N x [x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x))] -> RMSNorm -> LM head, where each
block's FFN is a dense SwiGLU or an MoE layer as `ModelConfig.moe.layers` says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import Config, ModelConfig
from moelab.model.dynamic_losses import config_coefs, total_loss
from moelab.model.layers import RMSNorm, SwiGLU, build_attention, rope_cache
from moelab.model.lm_loss import IGNORE_INDEX, linear_cross_entropy
from moelab.model.moe import MoELayer, RoutingStats
from moelab.model.router import SigmoidRouter


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, V]; None when forward(..., return_logits=False)
    loss: torch.Tensor | None = None  # ce_loss + sum_name coef_name * aux_losses[name] (`total_loss`)
    ce_loss: torch.Tensor | None = None  # token-mean cross-entropy over targets != -100
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # mean over MoE layers, unweighted
    routing: dict[int, RoutingStats] = field(default_factory=dict)  # layer index -> what its router did


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, is_moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoELayer(cfg.d_model, cfg.moe) if is_moe else SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask=None, cache=None, attn_mask=None, forced=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, attn_mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            y, stats = self.ffn(h, mask) if forced is None else self.ffn(h, mask, forced)
            return x + y, stats
        return x + self.ffn(h), None


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # [max_seq_len, head_dim] buffers made by init_buffers
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig | Config):
        super().__init__()
        cfg = cfg.model if isinstance(cfg, Config) else cfg
        self.cfg = cfg
        moe_ids = set(cfg.moe_layer_ids())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_buffers()
        self.init_weights()

    @property
    def moe_layers(self) -> dict[int, MoELayer]:
        return {i: b.ffn for i, b in enumerate(self.layers) if isinstance(b.ffn, MoELayer)}

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one place every tensor's initial value is decided:
        - embeddings, attention q/k/v, dense and shared-expert gate/up, routed expert gate_up, router
          gates: N(0, init_std);
        - projections that write into the residual stream (attention o_proj, every down projection):
          N(0, init_std / sqrt(2 * n_layers)), so the residual variance does not grow with depth
          (GPT-2);
        - the noisy router's noise gate and the shared-expert gate: zeros (noise scale softplus(0),
          gate 0.5 at start); linear biases and the sigmoid router's selection bias: zeros;
        - router gates (and a hierarchical router's group gate) N(0, moe.router_init_std) when it is set;
        - RMSNorm weights: ones; LM head: N(0, init_std) unless tied to the embedding."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith((".bias", "noise_weight", "shared_gate.weight")):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        router_std = self.cfg.moe.router_init_std
        for layer in self.moe_layers.values():
            if isinstance(layer.router, SigmoidRouter):
                layer.router.bias.zero_()
            if router_std is not None:  # re-drawn after the loop above, so every other tensor's draw is unchanged
                for gate in (layer.router.weight, getattr(layer.router, "group_weight", None)):
                    if gate is not None:
                        nn.init.normal_(gate, 0.0, router_std)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)make the buffers no checkpoint holds: the RoPE tables, and the routers' selection biases
        when they are not persistent (`moe.router_bias` off). A model built on the meta device and loaded
        with `load_state_dict(..., assign=True)` gets its real ones here (`checkpoint.build_model`)."""
        cfg = self.cfg
        device = torch.device(device) if device is not None else self.embed.weight.device
        cos, sin = rope_cache(cfg.max_seq_len, cfg.hdim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        for layer in self.moe_layers.values():
            router = layer.router
            if "bias" in router._buffers and "bias" in router._non_persistent_buffers_set:
                router.register_buffer("bias", torch.zeros(router.num_experts, device=device), persistent=False)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache=None,
        attn_mask: torch.Tensor | None = None,
        last_only: bool = False,
        return_logits: bool = True,
        routing: torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
        tasks: torch.Tensor | None = None,
        aux_coefs: dict[str, float] | None = None,
    ) -> ModelOutput:
        """idx [B, S] token ids; targets [B, S] (-100 = ignore); mask [B, S] (1 = real token, used to
        keep padding out of routing and its losses); positions [B, S] for RoPE (default 0..S-1);
        cache / attn_mask for incremental decoding (see `Attention`); last_only: logits [B, 1, V] of
        the last position only (a generation prefill needs no more, and the LM head over every
        prompt position is a sizeable share of its FLOPs); return_logits=False with targets: only the
        losses, from the fused LM head + cross-entropy (`lm_loss.py`), and `logits` is None.
        routing [B, S, L, K] int (L = MoE layers in layer order; a dropped assignment as -1 - expert,
        see `moe.RoutingRecord`) replays a recorded routing instead of choosing top-k; its gate weights
        are the router's rule at those experts (the router still learns) unless `routing_weights`
        [B, S, L, K] fixes them (docs/rl.md, "Routing replay"). tasks [B, S] int: each token's task
        (source) id for multi-task routers (`moe.num_tasks`); None = no task embedding. aux_coefs: the
        aux losses' coefficients in `loss` (default: the config's; the trainer passes its scheduled ones)."""
        b, s = idx.shape
        if self.cfg.moe.num_tasks:
            for layer in self.moe_layers.values():
                layer.router.task_ids = tasks
        forced = None if routing is None else check_routing(self, idx, routing, routing_weights)
        if positions is None:
            cos, sin = self.rope_cos[:s][None, None], self.rope_sin[:s][None, None]
        else:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        x = self.embed(idx)
        layer_stats: dict[int, RoutingStats] = {}
        for i, block in enumerate(self.layers):
            if forced is not None and i in forced:
                x, stats = block(x, cos, sin, mask, cache, attn_mask, forced[i])
            else:
                x, stats = block(x, cos, sin, mask, cache, attn_mask)
            if stats is not None:
                layer_stats[i] = stats
        if last_only:
            if targets is not None:
                raise ValueError("last_only=True gives no logits to compute a loss over every target with")
            x = x[:, -1:]
        h = self.norm(x)
        out = ModelOutput(logits=None, routing=layer_stats)
        if layer_stats:  # layers compute the losses with a non-zero coefficient (the same in every layer)
            out.aux_losses = {
                name: torch.stack([r.aux_losses[name] for r in layer_stats.values()]).mean()
                for name in next(iter(layer_stats.values())).aux_losses
            }
        if targets is None or return_logits:
            out.logits = self.lm_head(h)
        if targets is not None:
            if out.logits is not None:
                out.ce_loss = F.cross_entropy(
                    out.logits.float().view(-1, out.logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
                )
            else:
                out.ce_loss = linear_cross_entropy(h.reshape(b * s, -1), self.lm_head.weight, targets.reshape(-1))
            coefs = aux_coefs if aux_coefs is not None else config_coefs(self.cfg.moe, out.aux_losses)
            out.loss = total_loss(out.ce_loss, out.aux_losses, coefs)
        return out

    def set_router_attr(self, name: str, value) -> None:
        """Change a run-time router setting (e.g. `tau` for Gumbel, `top_k`) on every MoE layer."""
        for layer in self.moe_layers.values():
            if hasattr(layer.router, name):
                setattr(layer.router, name, value)


def check_routing(
    model: Transformer, idx: torch.Tensor, routing: torch.Tensor, weights: torch.Tensor | None
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """A forced routing -> {layer index: (ids [B, S, K], weights or None)}; UserError (one line) when it
    does not fit the model and the batch."""
    from moelab.errors import UserError

    moe = model.moe_layers
    b, s = idx.shape
    if not moe:
        raise UserError("routing: the model has no MoE layers to replay a routing into")
    e = min(layer.cfg.num_experts for layer in moe.values())
    if (
        not isinstance(routing, torch.Tensor)
        or routing.dim() != 4
        or tuple(routing.shape[:3]) != (b, s, len(moe))
        or not 1 <= routing.shape[3] <= e
    ):
        got = tuple(routing.shape) if isinstance(routing, torch.Tensor) else type(routing).__name__
        raise UserError(
            f"routing: expected expert ids of shape [batch={b}, seq={s}, moe_layers={len(moe)}, k in 1..{e}], got {got}"
        )
    if routing.dtype.is_floating_point or routing.dtype == torch.bool:
        raise UserError(f"routing: expected integer expert ids, got {routing.dtype}")
    if bool(((routing < -e) | (routing >= e)).any()):
        raise UserError(f"routing: expert ids must be in [0, {e}) (or -1 - id for a dropped assignment)")
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != routing.shape):
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise UserError(f"routing_weights: expected the routing's shape {tuple(routing.shape)}, got {got}")
    routing = routing.to(device=idx.device, dtype=torch.long)
    return {
        i: (routing[:, :, j], None if weights is None else weights[:, :, j].to(idx.device)) for j, i in enumerate(moe)
    }
