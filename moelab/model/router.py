"""Routers: which experts each token goes to, and with what weight.

Every router returns a `Routing` with the same contract:
    topk_ids [T, K] int64, topk_weights [T, K] fp32, logits [T, E] fp32, probs [T, E] fp32
`probs` is the per-expert score distribution the balancing losses use. `keep` [T, K] (bool or None)
marks assignments that are real; expert-choice routing and capacity dropping set it.

Routers run in fp32 whatever the autocast dtype: the softmax/sigmoid over experts and the balancing
losses are where bf16 rounding decides which expert wins (ST-MoE "selective precision").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import MoEConfig


@dataclass
class Routing:
    topk_ids: torch.Tensor  # [T, K]
    topk_weights: torch.Tensor  # [T, K] fp32
    logits: torch.Tensor  # [T, E] fp32, raw router logits (z-loss uses these)
    probs: torch.Tensor  # [T, E] fp32, score distribution for balancing losses
    keep: torch.Tensor | None = None  # [T, K] bool; None = every assignment is kept
    extra: dict = field(default_factory=dict)  # router-specific tensors the extra aux losses read (groups, tasks)


class Router(nn.Module):
    """Base: a bias-free linear gate `weight` [E, D] computed in fp32, then a selection rule."""

    task_ids: torch.Tensor | None = None  # [B, S] tokens' task ids, set per forward by multi-task models

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k  # the trainer may change it at run time (dense-to-sparse schedule)
        self.normalize = cfg.normalize
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(self.router_input(x), self.weight.float())

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in fp32, plus the task embedding of each token when the model is multi-task
        (`moe.num_tasks`; `task_ids` [T] is set per forward by the Transformer, None = no task known)."""
        emb, tasks = getattr(self, "task_embed", None), getattr(self, "task_ids", None)
        if emb is None or tasks is None:
            return x.float()
        return x.float() + emb(tasks.reshape(-1)).float()

    def forward(self, x: torch.Tensor) -> Routing:
        z = self.logits(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.select(x, z)

    def select(self, x: torch.Tensor, z: torch.Tensor) -> Routing:
        raise NotImplementedError

    def replay(self, x: torch.Tensor, ids: torch.Tensor) -> Routing:
        """Routing replay: the experts are `ids` [T, K] (forced, e.g. recorded at rollout), the weights
        this router's own rule evaluated at those ids, differentiable through the logits (so the router
        keeps learning). Noise (noisy_topk, gumbel) is never drawn: a replayed routing reproduces the
        noise-free (eval) forward the rollout ran."""
        z = self.logits(x)
        with torch.autocast(x.device.type, enabled=False):
            w, probs = self.replay_weights(z, ids)
            return Routing(ids, w, z, probs)

    def replay_weights(self, z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, K] at the forced ids, probs [T, E] for the balancing losses). Default: the
        softmax_topk rule (softmax over all experts, gathered, then `_finish`)."""
        p = z.softmax(dim=-1)
        return self._finish(p.gather(-1, ids)), p

    def _finish(self, w: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return w * self.scale if self.scale != 1.0 else w


class SoftmaxTopKRouter(Router):
    """softmax over all experts, then top-k (Mixtral renormalises; Qwen2/3-MoE by default does not)."""

    def select(self, x, z):
        p = z.softmax(dim=-1)
        w, ids = p.topk(self.top_k, dim=-1)
        return Routing(ids, self._finish(w), z, p)


class TopKSoftmaxRouter(Router):
    """top-k of the logits, softmax over those k (equal to softmax_topk with renormalisation)."""

    def select(self, x, z):
        v, ids = z.topk(self.top_k, dim=-1)
        w = v.softmax(dim=-1) * self.scale
        return Routing(ids, w, z, z.softmax(dim=-1))

    def replay_weights(self, z, ids):
        return z.gather(-1, ids).softmax(dim=-1) * self.scale, z.softmax(dim=-1)


class SigmoidRouter(Router):
    """Sigmoid scores (DeepSeek-V3). An optional per-expert `bias` changes only which experts are
    chosen, never the weights; it is a buffer updated outside autograd from the load error
    (auxiliary-loss-free balancing, arXiv 2408.15664)."""

    bias: torch.Tensor

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.register_buffer("bias", torch.zeros(cfg.num_experts), persistent=cfg.router_bias)
        self.use_bias = cfg.router_bias

    def select(self, x, z):
        s = z.sigmoid()
        sel = s + self.bias if self.use_bias else s
        ids = sel.topk(self.top_k, dim=-1).indices
        w = s.gather(-1, ids)
        return Routing(ids, self._finish(w), z, s / s.sum(dim=-1, keepdim=True))

    def replay_weights(self, z, ids):  # the bias only ever chose experts; the weights never saw it
        s = z.sigmoid()
        return self._finish(s.gather(-1, ids)), s / s.sum(dim=-1, keepdim=True)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """b_i += rate * sign(mean load - load_i): underloaded experts become easier to pick."""
        load = tokens_per_expert.float().to(self.bias.device)
        self.bias.add_(rate * torch.sign(load.mean() - load))


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017): H = z + N(0,1) * softplus(x W_noise), noise only in
    training; weights = softmax over the kept top-k of H."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.noise_weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        self.noise_std = cfg.noise_std

    def select(self, x, z):
        h = z
        if self.training:
            noise_scale = F.softplus(F.linear(x.float(), self.noise_weight.float()))
            h = z + torch.randn_like(z) * noise_scale * self.noise_std
        v, ids = h.topk(self.top_k, dim=-1)
        return Routing(ids, v.softmax(dim=-1) * self.scale, z, z.softmax(dim=-1))

    def replay_weights(self, z, ids):  # the noise-free rule (what eval mode computes)
        return z.gather(-1, ids).softmax(dim=-1) * self.scale, z.softmax(dim=-1)


class GumbelRouter(Router):
    """Gumbel-softmax routing: y = softmax((z + g) / tau), g ~ Gumbel(0, 1) in training; top-k of y.
    `tau` is a plain attribute the trainer anneals. In eval mode no noise is drawn (deterministic)."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.tau = cfg.gumbel_tau

    def select(self, x, z):
        h = z
        if self.training:
            u = torch.rand_like(z).clamp_(1e-9, 1.0 - 1e-9)
            h = z - torch.log(-torch.log(u))
        y = (h / self.tau).softmax(dim=-1)
        w, ids = y.topk(self.top_k, dim=-1)
        return Routing(ids, self._finish(w), z, z.softmax(dim=-1))

    def replay_weights(self, z, ids):  # the noise-free rule (what eval mode computes)
        return self._finish((z / self.tau).softmax(dim=-1).gather(-1, ids)), z.softmax(dim=-1)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score, C =
    ceil(cf * T / E). Balance is perfect by construction and a token may get 0..E experts.

    It is not causal: whether token t is picked depends on the scores of every token in the batch,
    later ones included, so a decoder trained with it sees a little of the future through routing,
    and one token at a time (generation) has no batch to choose from. In eval mode this router
    therefore falls back to token choice (top-k of the same softmax, renormalised), which is causal
    and what the model does at generation time; train/eval routing differ, which is the documented
    cost of this router for language modelling."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.capacity_factor = cfg.capacity_factor

    def select(self, x, z):
        p = z.softmax(dim=-1)
        if not self.training:
            w, ids = p.topk(self.top_k, dim=-1)
            return Routing(ids, w / w.sum(-1, keepdim=True) * self.scale, z, p)
        t, e = p.shape
        c = min(t, max(1, math.ceil(self.capacity_factor * t / e)))
        chosen = p.topk(c, dim=0).indices  # [C, E]: the tokens each expert picks
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(0, chosen, True)
        ids = torch.arange(e, device=z.device).expand(t, e)
        return Routing(ids, p * keep * self.scale, z, p, keep)

    def replay_weights(self, z, ids):
        """Replay is token choice at the forced ids (the eval rule): there is no batch-wide choice to
        replay, and generation -- where rollouts come from -- routes by token choice."""
        p = z.softmax(dim=-1)
        w = p.gather(-1, ids)
        return w / w.sum(-1, keepdim=True) * self.scale, p
