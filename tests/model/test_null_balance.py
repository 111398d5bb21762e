"""Null experts: the balance loss balances load among the REAL experts only (renormalised probabilities),
and a separate loss keeps the share of null slots near its target -- properties and the config default."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.config import MoEConfig
from moelab.model.dynamic_config import null_k_target
from moelab.model.dynamic_losses import null_balance
from moelab.model.losses import mean_probs, switch_load_balance
from moelab.model.routers_dynamic import TopPRouter

D = 8


def router(e: int, n: int, k: int, top_p: bool = False) -> TopPRouter:
    cfg = MoEConfig(num_experts=e, num_null_experts=n, top_k=k, router="top_p" if top_p else "softmax_topk", top_p=0.6)
    return TopPRouter(D, cfg, use_top_p=top_p)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8),
    st.integers(1, 4),
    st.integers(1, 3),
    st.floats(-6.0, 6.0),
    st.integers(0, 10_000),
    st.booleans(),
)
def test_real_balance_is_minimal_at_uniform_real_load_whatever_the_null_mass(e, n, k, null_logit, seed, top_p):
    """Uniform real load gives the balance loss its minimum (1.0) for any mass on the null slots; a skewed
    real load gives more; and the null logits get no gradient from it (the collapse mechanism is gone)."""
    g = torch.Generator().manual_seed(seed)
    r = router(e, n, min(k, e + n), top_p)
    t = 16
    x = torch.zeros(t, D)
    # uniform real logits, null logits anywhere: null mass from ~0 to ~1
    z = torch.cat([torch.zeros(t, e), torch.full((t, n), null_logit)], 1).requires_grad_(True)
    out = r.select(x, z)
    torch.testing.assert_close(out.probs, torch.full((t, e), 1.0 / e))
    lb = switch_load_balance(out.probs, out.topk_ids, out.keep)
    if out.keep.any():
        assert lb.item() == pytest.approx(1.0, abs=1e-5)
    # soft form (f = P): E * sum P_i^2 >= 1, equality only when uniform; independent of the null mass
    zr = torch.randn(t, e, generator=g) * 2
    skew = torch.cat([zr, torch.full((t, n), null_logit)], 1).requires_grad_(True)
    o2 = r.select(x, skew)
    p = mean_probs(o2.probs).detach()
    assert float(e * (p * p).sum()) >= 1.0 - 1e-5
    # what the balance loss sees does not depend on the null logits at all
    other = torch.cat([zr, torch.full((t, n), null_logit - 3.0)], 1)
    torch.testing.assert_close(r.select(x, other).probs, o2.probs)
    switch_load_balance(o2.probs, o2.topk_ids, o2.keep).backward()
    assert skew.grad is not None and float(skew.grad[:, e:].abs().max()) < 1e-6


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(0, 4), min_size=1, max_size=20), st.integers(0, 10_000))
def test_null_loss_is_zero_at_target_and_pushes_towards_it(k, counts, seed):
    counts = [min(c, k) for c in counts]
    t = len(counts)
    keep = torch.arange(k)[None, :] < torch.tensor(counts)[:, None]  # [T, K]: c kept real slots per token
    mass = torch.rand(t, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    share = 1.0 - sum(counts) / t / k
    at = null_balance(mass, keep, k, share)
    assert at.item() == pytest.approx(0.0, abs=1e-12)
    for target in (0.0, 0.5, 1.0):
        mass.grad = None
        loss = null_balance(mass, keep, k, target)
        assert loss.item() == pytest.approx((share - target) ** 2, abs=1e-6)  # the value ignores the mass
        loss.backward()
        grad = float(mass.grad.sum())  # d loss / d mean(mass) = 2 (share - target)
        assert grad == pytest.approx(2 * (share - target), abs=1e-5)


def test_null_loss_masks_padding_and_default_target():
    keep = torch.tensor([[True, True], [False, False]])
    assert float(null_balance(torch.zeros(2), keep, 2, 0.0, torch.tensor([1, 0]))) == 0.0  # padding ignored
    assert float(null_balance(torch.zeros(2), keep, 2, 0.0)) == pytest.approx(0.25)
    assert null_k_target(MoEConfig(top_k=3, num_null_experts=4)) == 2.0
    assert null_k_target(MoEConfig(top_k=3, num_null_experts=4, null_k_target=1.2)) == 1.2
