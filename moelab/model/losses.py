"""Balancing losses as pure functions of one layer's routing. All in fp32.

Shapes: probs [T, E] (router score distribution), logits [T, E], topk_ids [T, K], keep [T, K] bool or
None (assignments that exist), mask [T] (1 = real token, 0 = padding) or None.

Scales (per layer; the model averages layers, never pools them, because pooling hides a layer that
collapsed while another compensates):
- `switch_load_balance`: E * sum_i f_i * P_i with f_i the fraction of top-k assignments to expert i
  (sum_i f_i = 1) and P_i the mean router probability. Balanced = 1.0; all tokens on the same k
  experts = E / k (the maximum, since f_i <= 1/k). HF transformers' `load_balancing_loss_func` counts
  assignments instead (sum_i f_i = k) and pools all layers, so its balanced value is k and its
  collapsed value E: HF coefficient alpha == moelab coefficient k * alpha, layer pooling aside.
- `router_z_loss`: mean_t logsumexp(z_t)^2 (ST-MoE, arXiv 2202.08906). 0 only when logsumexp = 0.
- `load_cv`: std/mean of the soft expert load sum_t p_ti (differentiable; the coefficient-of-variation
  loss of Shazeer et al. 2017, arXiv 1701.06538). Balanced = 0; one expert takes everything =
  sqrt(E - 1) (population std).
- `usage_variance`: population variance of the mean usage P_i. Balanced = 0; one expert
  takes everything = (E - 1) / E^2.
"""

from __future__ import annotations

import torch


def _weights(mask: torch.Tensor | None, t: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(t, device=device)
    return mask.reshape(-1).float()


def expert_counts(
    topk_ids: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Assignments per expert [E] (fp32), counting only kept assignments of real tokens."""
    w = _weights(mask, topk_ids.shape[0], topk_ids.device)[:, None].expand(topk_ids.shape)
    if keep is not None:
        w = w * keep
    return torch.zeros(num_experts, device=topk_ids.device).index_add_(0, topk_ids.reshape(-1), w.reshape(-1))


def hard_load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation of the expert counts (population std / mean), a metric, not a loss:
    0 = balanced, sqrt(E - 1) = one expert takes everything. Logged in training as `moe/<i>/load_cv`
    and reported by `moelab analyze` under the same name; the differentiable `cv` aux loss
    (`load_cv` below) is its soft counterpart over router probabilities."""
    c = counts.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def mean_probs(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """P_i: mean router probability per expert over real tokens [E]."""
    if mask is None:  # (also keeps a ones-weighted reduction out of compiled graphs: Triton 3.6 failed on it)
        return probs.float().mean(0)
    w = _weights(mask, probs.shape[0], probs.device)
    return (probs.float() * w[:, None]).sum(0) / w.sum().clamp_min(1.0)


def switch_load_balance(probs, topk_ids, keep=None, mask=None, counts=None) -> torch.Tensor:
    """`counts` [E]: assignments per expert when already known, e.g. summed over data-parallel ranks so
    that f_i is the global batch's (global-batch balance, arXiv 2501.11873); P_i stays this rank's."""
    e = probs.shape[-1]
    if counts is None:
        counts = expert_counts(topk_ids, e, keep, mask)
    f = counts / counts.sum().clamp_min(1.0)
    return e * (f * mean_probs(probs, mask)).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    lse = torch.logsumexp(logits.float(), dim=-1)
    if mask is None:
        return lse.square().mean()
    w = _weights(mask, logits.shape[0], logits.device)
    return (lse.square() * w).sum() / w.sum().clamp_min(1.0)


def load_cv(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    load = mean_probs(probs, mask)
    return load.std(unbiased=False) / load.mean().clamp_min(1e-20)


def usage_variance(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return mean_probs(probs, mask).var(unbiased=False)


def router_entropy(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token entropy of the router distribution, in nats (log E = uniform)."""
    p = probs.float()
    ent = -(p * p.clamp_min(1e-20).log()).sum(-1)
    if mask is None:
        return ent.mean()
    w = _weights(mask, p.shape[0], p.device)
    return (ent * w).sum() / w.sum().clamp_min(1.0)


# name -> (function of (routing, mask, counts=None), MoEConfig coefficient attribute); `counts` [E] are the
# batch's routed assignments per expert (see `switch_load_balance`), ignored by the other losses.
AUX_LOSSES = {
    "load_balance": (
        lambda r, m, counts=None: switch_load_balance(r.probs, r.topk_ids, r.keep, m, counts),
        "load_balance_coef",
    ),
    "z_loss": (lambda r, m, counts=None: router_z_loss(r.logits, m), "z_loss_coef"),
    "cv": (lambda r, m, counts=None: load_cv(r.probs, m), "cv_coef"),
    "variance": (lambda r, m, counts=None: usage_variance(r.probs, m), "variance_coef"),
}
