"""Balancing losses on hand-computed cases (balanced and fully collapsed routing)."""

import math

import pytest
import torch

from moelab.model import losses

E, K, T = 4, 2, 8


def balanced():
    # every expert gets exactly T*K/E assignments and uniform probabilities
    ids = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    probs = torch.full((T, E), 1.0 / E)
    return probs, ids


def collapsed():
    ids = torch.tensor([[0, 1]] * T)
    probs = torch.zeros(T, E)
    probs[:, 0] = 1.0
    return probs, ids


def test_switch_load_balance_balanced_is_one():
    probs, ids = balanced()
    assert losses.switch_load_balance(probs, ids).item() == pytest.approx(1.0)


def test_switch_load_balance_collapsed_is_e_over_k():
    probs, ids = collapsed()
    assert losses.switch_load_balance(probs, ids).item() == pytest.approx(E / K)
    # top-1 collapse reaches E
    assert losses.switch_load_balance(probs, ids[:, :1]).item() == pytest.approx(E)


def test_switch_load_balance_mask_excludes_padding():
    probs, ids = balanced()
    cprobs, cids = collapsed()
    mixed_p = torch.cat([probs, cprobs])
    mixed_i = torch.cat([ids, cids])
    mask = torch.cat([torch.ones(T), torch.zeros(T)])
    assert losses.switch_load_balance(mixed_p, mixed_i, mask=mask).item() == pytest.approx(1.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert losses.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_cv_and_variance_zero_when_balanced_and_max_when_collapsed():
    probs, _ = balanced()
    assert losses.load_cv(probs).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.usage_variance(probs).item() == pytest.approx(0.0, abs=1e-9)
    probs, _ = collapsed()
    assert losses.load_cv(probs).item() == pytest.approx(math.sqrt(E - 1))
    assert losses.usage_variance(probs).item() == pytest.approx((E - 1) / E**2)


def test_entropy_uniform_is_log_e():
    probs, _ = balanced()
    assert losses.router_entropy(probs).item() == pytest.approx(math.log(E))


def test_losses_are_differentiable_wrt_logits():
    z = torch.randn(T, E, requires_grad=True)
    p = z.softmax(-1)
    ids = p.topk(K, -1).indices
    total = sum(fn(losses_routing(z, p, ids), None) for fn, _ in losses.AUX_LOSSES.values())
    total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def losses_routing(z, p, ids):
    from moelab.model.router import Routing

    return Routing(ids, p.gather(-1, ids), z, p)
