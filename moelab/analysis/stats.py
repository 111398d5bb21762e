"""Routing statistics as pure functions of routing tensors. No model, no I/O.

Legend: N tokens, K experts per token, E experts, M domains (source files), V vocabulary.
Inputs: topk_ids [N, K] int (column 0 is the router's first choice: every token-choice router
returns its top-k sorted), keep [N, K] bool or None (None = every assignment kept), domain_ids [N]
int, token_ids [N] int. Counts are over *kept* assignments unless a name says otherwise, so a token
dropped by capacity is not credited to the expert that refused it. Information quantities are in bits.
"""

from __future__ import annotations

import math

import torch

from moelab.model.losses import hard_load_cv


def _kept(topk_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[N, K] float weights: 1 for a kept assignment, 0 for a dropped one."""
    if keep is None:
        return torch.ones(topk_ids.shape, dtype=torch.float64, device=topk_ids.device)
    return keep.to(torch.float64)


# ----------------------------------------------------------------------------------------------------
# Balance


def expert_counts(topk_ids: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Kept assignments per expert [E] (float64)."""
    w = _kept(topk_ids, keep)
    return torch.zeros(num_experts, dtype=torch.float64, device=topk_ids.device).index_add_(
        0, topk_ids.reshape(-1).long(), w.reshape(-1)
    )


def load_fractions(counts: torch.Tensor) -> torch.Tensor:
    """Share of all kept assignments each expert received [E]; sums to 1 (all zeros if nothing routed)."""
    total = counts.sum()
    return counts / total if total > 0 else torch.zeros_like(counts)


def utilisation(counts: torch.Tensor) -> torch.Tensor:
    """Load relative to a fair share [E]: E * fraction, so 1.0 = exactly 1/E of the assignments,
    0 = dead, E = takes everything."""
    return load_fractions(counts) * counts.numel()


load_cv = hard_load_cv  # (the one definition, shared with the training metric `moe/<i>/load_cv`)


def dead_experts(counts: torch.Tensor) -> list[int]:
    """Experts that received no kept assignment."""
    return [int(i) for i in torch.nonzero(counts == 0).flatten()]


def entropy_bits(p: torch.Tensor) -> float:
    """Shannon entropy of a distribution (any shape, normalised here) in bits; 0 log 0 = 0."""
    p = p.double().flatten()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    nz = p[p > 0]
    return max(0.0, float(-(nz * nz.log2()).sum()))  # max: a point mass gives -0.0


def dropped_fraction(keep: torch.Tensor | None) -> float:
    """Share of routed assignments dropped by capacity (0 when dropless)."""
    if keep is None or keep.numel() == 0:
        return 0.0
    return 1.0 - float(keep.double().mean())


def coactivation(topk_ids: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[E, E] share of tokens whose kept expert set contains both i and j; the diagonal is the share of
    tokens that use expert i. Symmetric. With K = 1 the off-diagonal is zero."""
    n = topk_ids.shape[0]
    onehot = torch.zeros(n, num_experts, dtype=torch.float64, device=topk_ids.device)  # [N, E]
    onehot.scatter_add_(1, topk_ids.long(), _kept(topk_ids, keep))
    onehot.clamp_(max=1.0)  # a router never repeats an expert for a token; guard anyway
    return onehot.T @ onehot / max(1, n)


# ----------------------------------------------------------------------------------------------------
# Specialisation


def joint_counts(
    a: torch.Tensor, b: torch.Tensor, num_a: int, num_b: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """[num_a, num_b] (weighted) counts of the pairs (a[n], b[n])."""
    w = torch.ones(a.numel(), dtype=torch.float64, device=a.device) if weights is None else weights.double().flatten()
    flat = a.reshape(-1).long() * num_b + b.reshape(-1).long()
    return torch.zeros(num_a * num_b, dtype=torch.float64, device=a.device).index_add_(0, flat, w).view(num_a, num_b)


def domain_expert_counts(
    topk_ids: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    num_experts: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, E] kept assignments of each domain's tokens to each expert."""
    dom = domain_ids.reshape(-1, 1).expand_as(topk_ids)
    return joint_counts(dom, topk_ids, num_domains, num_experts, _kept(topk_ids, keep))


def row_distribution(counts: torch.Tensor) -> torch.Tensor:
    """Normalise each row to sum to 1 (rows without counts stay zero): P(expert | domain)."""
    totals = counts.sum(-1, keepdim=True)
    return torch.where(totals > 0, counts / totals.clamp_min(1e-300), torch.zeros_like(counts))


def mutual_information(joint: torch.Tensor) -> float:
    """I(A; B) in bits from a [A, B] table of (weighted) counts: 0 when rows and columns are
    independent, H(A) when every column belongs to one row (B determines A)."""
    p = joint.double()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    pa, pb = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pa @ pb)[nz]).log2()).sum()
    return max(0.0, float(mi))  # rounding can leave -1e-16 for independent tables


def shuffled_mutual_information(
    topk_ids: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    num_experts: int,
    keep: torch.Tensor | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> float:
    """Mean I(domain; expert) after randomly permuting the tokens' domain labels: the value a finite
    sample shows when routing ignores the domain (the plug-in estimate is biased upwards by about
    (M-1)(E-1) / (2 N ln 2) bits), i.e. the chance level the measured value should be read against."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(repeats):
        perm = torch.randperm(domain_ids.numel(), generator=g).to(domain_ids.device)
        vals.append(
            mutual_information(
                domain_expert_counts(topk_ids, domain_ids.reshape(-1)[perm], num_domains, num_experts, keep)
            )
        )
    return sum(vals) / len(vals)


def token_conditioned_mutual_information(
    topk_ids: torch.Tensor,
    domain_ids: torch.Tensor,
    token_ids: torch.Tensor,
    num_domains: int,
    num_experts: int,
    keep: torch.Tensor | None = None,
    repeats: int = 5,
    seed: int = 0,
) -> float:
    """Mean I(domain; expert) after permuting the domain labels only among occurrences of the same token.
    Experts follow token identity even untrained, and domains differ in their tokens, so a plain shuffle
    (`shuffled_mutual_information`) credits the router with specialisation that is only token frequency:
    this null keeps each token's domain mix and removes everything else, so MI above it is what routing
    knows about the domain beyond the token itself (context)."""
    g = torch.Generator().manual_seed(seed)
    dom, tok = domain_ids.reshape(-1), token_ids.reshape(-1).long()
    by_token = torch.argsort(tok, stable=True)  # positions grouped by token, in stream order
    vals = []
    for _ in range(repeats):
        shuffled = torch.randperm(tok.numel(), generator=g).to(tok.device)
        mixed = shuffled[torch.argsort(tok[shuffled], stable=True)]  # grouped by token, random within a group
        new = torch.empty_like(dom)
        new[by_token] = dom[mixed]  # each position gets the domain of a random occurrence of its own token
        vals.append(mutual_information(domain_expert_counts(topk_ids, new, num_domains, num_experts, keep)))
    return sum(vals) / len(vals)


def token_expert_counts(
    token_ids: torch.Tensor, topk_ids: torch.Tensor, vocab_size: int, num_experts: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """[V, E] kept assignments of each vocabulary token to each expert."""
    tok = token_ids.reshape(-1, 1).expand_as(topk_ids)
    return joint_counts(tok, topk_ids, vocab_size, num_experts, _kept(topk_ids, keep))


def top_tokens(tok_exp: torch.Tensor, n: int = 10, min_count: int = 5) -> dict[str, list[list[dict]]]:
    """Per expert, from the [V, E] token-expert counts:
    - `frequent`: the n tokens it received most often, with `count` and `share` (the fraction of that
      token's kept assignments that went to this expert);
    - `distinctive`: the n tokens (seen >= min_count times) with the highest lift P(e | token) / P(e),
      i.e. what this expert sees far more than the average expert does.
    Each entry: {"id", "count", "share", "lift"}."""
    tok_exp = tok_exp.double()
    tok_total = tok_exp.sum(1)  # [V]
    exp_share = load_fractions(tok_exp.sum(0))  # [E] P(e)
    share = tok_exp / tok_total.clamp_min(1e-300)[:, None]  # [V, E] P(e | token)
    lift = share / exp_share.clamp_min(1e-300)[None, :]
    frequent, distinctive = [], []
    for e in range(tok_exp.shape[1]):
        col = tok_exp[:, e]

        def entries(ids, col=col, e=e):
            return [
                {"id": int(i), "count": int(col[i]), "share": float(share[i, e]), "lift": float(lift[i, e])}
                for i in ids
                if col[i] > 0
            ]

        k = min(n, col.numel())
        frequent.append(entries(torch.topk(col, k).indices.tolist()))
        eligible = torch.where((tok_total >= min_count) & (col > 0), lift[:, e], torch.full_like(col, -1.0))
        distinctive.append(entries([i for i in torch.topk(eligible, k).indices.tolist() if eligible[i] >= 0]))
    return {"frequent": frequent, "distinctive": distinctive}


# ----------------------------------------------------------------------------------------------------
# Layer to layer


def conditional_entropy(joint: torch.Tensor) -> float:
    """H(B | A) in bits from a [A, B] table of counts: H(A, B) - H(A)."""
    return max(0.0, entropy_bits(joint) - entropy_bits(joint.sum(1)))


def predict_accuracy(fit: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Accuracy of predicting b from a with the most frequent b for each a in the [A, B] table `fit`
    (ties to the lowest index; an a never seen in `fit` predicts the overall most frequent b)."""
    if a.numel() == 0:
        return 0.0
    guess = fit.argmax(1)
    unseen = fit.sum(1) == 0
    guess = torch.where(unseen, fit.sum(0).argmax(), guess)
    return float((guess[a.long()] == b.long()).double().mean())


def transition_stats(first_a: torch.Tensor, first_b: torch.Tensor, num_experts: int) -> dict:
    """How well a token's first-choice expert in layer l (`first_a` [N]) predicts its first choice in
    layer l+1 (`first_b` [N]).

    - `cond_entropy` H(b | a) against `entropy` H(b), and their difference `mutual_information`;
    - `accuracy`: predicting b as the most frequent l+1 expert for the token's layer-l expert, fitted
      on half the tokens and scored on the other half (even/odd positions, both ways, averaged), so a
      table with more cells than tokens cannot score by memorising; `baseline`: the same with the
      overall most frequent b, ignoring a;
    - `transition` [E, E]: P(b | a), rows without tokens all zero."""
    joint = joint_counts(first_a, first_b, num_experts, num_experts)
    h_b = entropy_bits(joint.sum(0))
    h_b_given_a = conditional_entropy(joint)
    acc, base = [], []
    for fit_part, eval_part in ((0, 1), (1, 0)):
        fa, fb = first_a[fit_part::2], first_b[fit_part::2]
        ea, eb = first_a[eval_part::2], first_b[eval_part::2]
        fit = joint_counts(fa, fb, num_experts, num_experts)
        acc.append(predict_accuracy(fit, ea, eb))
        base.append(predict_accuracy(fit.sum(0, keepdim=True), torch.zeros_like(ea), eb))
    return {
        "entropy": h_b,
        "cond_entropy": h_b_given_a,
        "mutual_information": max(0.0, h_b - h_b_given_a),
        "accuracy": sum(acc) / 2,
        "baseline": sum(base) / 2,
        "transition": row_distribution(joint),
    }


def layer_balance(topk_ids: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None) -> dict:
    """The balance numbers of one layer: counts, fraction, utilisation, CV, max/min utilisation, dead
    experts, load entropy (bits, log2 E = balanced) and dropped fraction."""
    counts = expert_counts(topk_ids, num_experts, keep)
    util = utilisation(counts)
    return {
        "counts": counts,
        "fraction": load_fractions(counts),
        "utilisation": util,
        "load_cv": hard_load_cv(counts),
        "max_utilisation": float(util.max()),
        "min_utilisation": float(util.min()),
        "dead": dead_experts(counts),
        "load_entropy": entropy_bits(counts),
        "max_load_entropy": math.log2(num_experts),
        "dropped_fraction": dropped_fraction(keep),
    }
