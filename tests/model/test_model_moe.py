"""MoE layer: the fast sort-dispatch path against the mask-and-loop oracle, and its invariants."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.config import ROUTERS, MoEConfig
from moelab.kernels import build_expert_backend
from moelab.kernels.reference import reference_moe
from moelab.model.layers import SwiGLU
from moelab.model.moe import MoELayer, capacity_keep, expert_capacity

D = 16


def make_layer(seed=0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": 8, **kw})
    layer = MoELayer(D, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return layer


def run(layer, x, backend, training=True):
    layer = copy.deepcopy(layer)
    layer.experts.backend = build_expert_backend(backend, D, layer.cfg.expert_dim)
    layer.train(training)
    xx = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # same router noise for both paths
    y, stats = layer(xx)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), xx.grad, grads, stats


CASES = [dict(router=r) for r in ROUTERS if r != "expert_choice"] + [
    dict(router="expert_choice", capacity_factor=1.0),
    dict(router="softmax_topk", normalize=False),
    dict(router="sigmoid", router_bias=True, routed_scaling_factor=2.5),
    dict(router="softmax_topk", capacity_factor=0.5),
    dict(router="softmax_topk", capacity_factor=1.0, eval_capacity_factor=2.0),
    dict(router="topk_softmax", num_shared_experts=2, shared_expert_dim=4, shared_expert_gate=True),
    dict(router="softmax_topk", num_experts=16, top_k=4, expert_dim=8),
]


@pytest.mark.parametrize("backend", ["cpu_buckets", "grouped_mm"])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fast_path_equals_reference_forward_and_grads(kw, backend):
    layer = make_layer(**kw)
    x = torch.randn(3, 11, D)
    y_fast, gx_fast, g_fast, s_fast = run(layer, x, backend)
    y_ref, gx_ref, g_ref, s_ref = run(layer, x, "reference")
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-5, atol=1e-5)
    assert g_fast.keys() == g_ref.keys()
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(s_fast.tokens_per_expert, s_ref.tokens_per_expert)


@pytest.mark.parametrize("backend", ["cpu_buckets", "grouped_mm"])
def test_eval_mode_equals_reference(backend):
    layer = make_layer(router="noisy_topk", capacity_factor=1.0, eval_capacity_factor=1.5)
    x = torch.randn(2, 9, D)
    y_fast, *_ = run(layer, x, backend, training=False)
    y_ref, *_ = run(layer, x, "reference", training=False)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)


def test_one_expert_moe_equals_dense_swiglu():
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(num_experts=1, top_k=1, expert_dim=8))
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    dense = SwiGLU(D, 8)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(layer.experts.gate_up[0, :8])
        dense.up_proj.weight.copy_(layer.experts.gate_up[0, 8:])
        dense.down_proj.weight.copy_(layer.experts.down[0])
    x = torch.randn(2, 7, D)
    y, _ = layer(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_fp32_closely_and_grads_are_fp32():
    layer = make_layer(num_experts=8, top_k=2, expert_dim=32)
    x = torch.randn(4, 16, D)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = layer(x)
    assert y16.dtype == torch.float32  # the residual stream keeps the input dtype
    torch.testing.assert_close(y16, y32, rtol=0.05, atol=0.05)
    y16.sum().backward()
    assert layer.experts.gate_up.grad.dtype == torch.float32


def test_padding_mask_takes_no_expert_slot():
    layer = make_layer()
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    y, stats = layer(x, mask)
    assert stats.tokens_per_expert.sum() == 8 * 2  # 8 real tokens x top-2
    assert torch.all(y[0, 3:] == 0)


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 40),
    e=st.integers(1, 9),
    k=st.integers(1, 4),
    cf=st.floats(0.1, 3.0),
    seed=st.integers(0, 10_000),
)
def test_capacity_never_exceeded_and_drop_count_exact(t, e, k, cf, seed):
    k = min(k, e)
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(t, e, generator=g)
    w, ids = scores.topk(k, dim=-1)
    cap = expert_capacity(cf, t, k, e)
    keep = capacity_keep(ids, w, e, cap)
    per_expert = torch.bincount(ids[keep], minlength=e)
    assert int(per_expert.max()) <= cap
    # exact drop count: each expert keeps min(demand, capacity)
    demand = torch.bincount(ids.reshape(-1), minlength=e)
    assert int((~keep).sum()) == int((demand - demand.clamp(max=cap)).sum())
    # priority: every kept assignment of an expert outranks every dropped one of the same expert
    for ex in range(e):
        kept_w, drop_w = w[keep & (ids == ex)], w[~keep & (ids == ex)]
        if kept_w.numel() and drop_w.numel():
            assert kept_w.min() >= drop_w.max()


@settings(max_examples=40, deadline=None)
@given(
    router=st.sampled_from([r for r in ROUTERS if r != "expert_choice"]),
    e=st.integers(2, 8),
    k=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_routing_invariants(router, e, k, seed):
    k = min(k, e)
    layer = make_layer(seed=seed, router=router, num_experts=e, top_k=k)
    x = torch.randn(13, D, generator=torch.Generator().manual_seed(seed))
    r = layer.router(x)
    assert r.topk_ids.shape == (13, k) and r.topk_weights.shape == (13, k)
    assert r.logits.shape == (13, e) and r.logits.dtype == torch.float32
    # at most K experts per token, all distinct
    assert all(len(set(row)) == k for row in r.topk_ids.tolist())
    if router != "sigmoid" or layer.cfg.normalize:
        torch.testing.assert_close(r.topk_weights.sum(-1), torch.ones(13))
    assert torch.all(r.topk_weights >= 0)


def test_router_runs_in_fp32_under_autocast():
    layer = make_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(torch.randn(5, D))
    assert r.logits.dtype == torch.float32 and r.topk_weights.dtype == torch.float32


def test_sigmoid_bias_changes_selection_not_weights():
    layer = make_layer(router="sigmoid", router_bias=True, num_experts=4, top_k=1, normalize=False)
    x = torch.randn(6, D)
    before = layer.router(x)
    layer.router.bias[:] = torch.tensor([100.0, 0, 0, 0])
    after = layer.router(x)
    assert torch.all(after.topk_ids == 0)
    torch.testing.assert_close(after.topk_weights[:, 0], torch.sigmoid(before.logits[:, 0]))


def test_sigmoid_bias_update_moves_toward_balance():
    layer = make_layer(router="sigmoid", router_bias=True)
    layer.router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.001)
    torch.testing.assert_close(layer.router.bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))


def test_gumbel_is_deterministic_in_eval_and_tau_is_runtime():
    layer = make_layer(router="gumbel")
    x = torch.randn(8, D)
    layer.eval()
    a, b = layer.router(x), layer.router(x)
    assert torch.equal(a.topk_ids, b.topk_ids)
    layer.router.tau = 0.1
    c = layer.router(x)
    assert not torch.allclose(a.topk_weights, c.topk_weights)


def test_expert_choice_is_balanced_in_training_and_token_choice_in_eval():
    layer = make_layer(router="expert_choice", capacity_factor=1.0, num_experts=4)
    x = torch.randn(1, 12, D)
    _, stats = layer(x)
    assert torch.all(stats.tokens_per_expert == 3)  # C = 1.0 * 12 / 4
    layer.eval()
    _, stats = layer(x)
    assert stats.topk_ids.shape == (12, 2) and stats.tokens_per_expert.sum() == 24


def test_reference_moe_handles_unused_experts():
    x = torch.randn(4, D)
    gate_up, down = torch.randn(3, 8, D), torch.randn(3, D, 4)
    ids = torch.zeros(4, 1, dtype=torch.long)
    y = reference_moe(x, gate_up, down, ids, torch.ones(4, 1))
    h = x @ gate_up[0].t()
    torch.testing.assert_close(y, (torch.nn.functional.silu(h[:, :4]) * h[:, 4:]) @ down[0].t())


def test_every_router_name_has_a_class_and_every_class_a_name():
    from moelab.model.router_registry import ROUTER_CLASSES

    assert tuple(ROUTER_CLASSES) == ROUTERS
