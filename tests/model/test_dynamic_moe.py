"""Dynamic and structured MoE: top-p and null-expert routers, hierarchical routing, the extra aux
losses -- slow references and properties, every backend, config errors, counting, telemetry."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.config import ModelConfig, MoEConfig
from moelab.model import Transformer
from moelab.model.counting import count_params, flops_per_token
from moelab.model.dynamic_losses import expert_diversity, expert_output_similarity, group_balance, task_balance
from moelab.model.moe import MoELayer, experts_per_token_hist
from moelab.train.telemetry import k_fields, mean_experts_per_token
from tests.model.test_model_moe import D, make_layer, run

DYNAMIC = [
    dict(router="top_p", top_k=3, top_p=0.5),
    dict(router="top_p", top_k=3, top_p=0.6, num_null_experts=2),
    dict(router="softmax_topk", top_k=3, num_null_experts=3),
    dict(router="top_p", top_k=2, top_p=0.5, capacity_factor=0.75),
    dict(router="hierarchical", num_experts=8, num_groups=4, top_groups=2, top_k=3),
    dict(router="hierarchical", num_experts=8, num_groups=2, top_groups=1, top_k=2, capacity_factor=1.0),
    dict(router="softmax_topk", num_tasks=3),
]


@pytest.mark.parametrize("backend", ["cpu_buckets", "grouped_mm"])
@pytest.mark.parametrize("kw", DYNAMIC, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_dynamic_routers_equal_reference_on_every_backend(kw, backend):
    layer = make_layer(**kw)
    if kw.get("num_tasks"):
        layer.router.task_ids = torch.arange(33) % 3
    x = torch.randn(3, 11, D)
    y_fast, gx_fast, g_fast, s_fast = run(layer, x, backend)
    y_ref, gx_ref, g_ref, s_ref = run(layer, x, "reference")
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(s_fast.experts_per_token, s_ref.experts_per_token)


def slow_top_p(p: torch.Tensor, top_p: float, k_max: int) -> list[list[int]]:
    """Per token, the experts (by descending probability) until their mass reaches top_p, at most k_max."""
    out = []
    for row in p.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])
        chosen, mass = [], 0.0
        for i in order[:k_max]:
            if mass >= top_p:
                break
            chosen.append(i)
            mass += row[i]
        out.append(chosen)
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 1.0), st.integers(1, 6))
def test_top_p_picks_the_smallest_set_reaching_p(seed, top_p, k_max):
    torch.manual_seed(seed)
    layer = make_layer(router="top_p", num_experts=6, top_k=k_max, top_p=top_p)
    x = torch.randn(20, D)
    with torch.no_grad():
        z = layer.router.logits(x)
        r = layer.router.select(x, z)
    want = slow_top_p(z.softmax(-1).double(), top_p, k_max)
    for t, experts in enumerate(want):
        got = r.topk_ids[t][r.keep[t]].tolist()
        assert sorted(got) == sorted(experts)
        w = r.topk_weights[t]
        assert float(w[~r.keep[t]].abs().sum()) == 0.0
        torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_null_experts_cost_nothing_and_all_null_gives_zero():
    layer = make_layer(router="softmax_topk", num_experts=4, num_null_experts=2, top_k=2)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[4:, 0] = 50.0  # feature 0 large -> both null experts win
    x = torch.randn(1, 6, D)
    x[0, :3, 0] = 5.0
    x[0, 3:, 0] = -5.0
    y, s = layer.eval()(x)
    assert torch.equal(y[0, :3], torch.zeros(3, D))  # all-null tokens: no expert ran, zero output
    assert s.experts_per_token.tolist() == [3.0, 0.0, 3.0]
    assert float(s.tokens_per_expert.sum()) == 6.0  # only the real slots are counted


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(8, 4, 2, 3), (8, 2, 1, 2), (12, 3, 2, 4), (6, 6, 3, 3)]))
def test_hierarchical_experts_lie_in_the_chosen_groups_and_match_slow_reference(seed, shape):
    e, g, tg, k = shape
    layer = make_layer(seed=seed, router="hierarchical", num_experts=e, num_groups=g, top_groups=tg, top_k=k)
    x = torch.randn(15, D)
    with torch.no_grad():
        r = layer.router(x)
        gz = x @ layer.router.group_weight.t()
        ez = x @ layer.router.weight.t()
    m = e // g
    gp = gz.softmax(-1)
    for t in range(15):
        groups = gp[t].topk(tg).indices.tolist()
        assert sorted(r.extra["group_ids"][t].tolist()) == sorted(groups)
        scores = {
            i: float(gp[t, i // m] * ez[t, i // m * m : (i // m + 1) * m].softmax(-1)[i % m])
            for grp in groups
            for i in range(grp * m, grp * m + m)
        }
        best = sorted(scores, key=lambda i: -scores[i])[:k]
        assert sorted(r.topk_ids[t].tolist()) == sorted(best)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(15))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(0, 1000))
def test_diversity_zero_for_orthogonal_one_for_identical(e, seed):
    f, d = 4, 16  # 2F*D + D*F = 192 >= e: room for e orthogonal experts
    q, _ = torch.linalg.qr(torch.randn(3 * f * d, e, generator=torch.Generator().manual_seed(seed)))
    w = q.t()  # [E, 192] orthonormal rows
    gu, dn = w[:, : 2 * f * d].reshape(e, 2 * f, d), w[:, 2 * f * d :].reshape(e, d, f)
    assert float(expert_diversity(gu, dn)) < 1e-6  # fp32 rounding of cos ~ 1e-4
    same_gu, same_dn = gu[:1].expand(e, -1, -1) * 3.0, dn[:1].expand(e, -1, -1) * 3.0
    torch.testing.assert_close(expert_diversity(same_gu, same_dn), torch.tensor(1.0))
    rnd = expert_diversity(torch.randn(e, 2 * f, d), torch.randn(e, d, f))
    assert 0.0 <= float(rnd) <= 1.0


def test_diversity_gradient_pushes_copies_apart():
    gu = (torch.randn(1, 8, 4).expand(4, -1, -1) + 0.01 * torch.randn(4, 8, 4)).requires_grad_(True)
    dn = torch.randn(1, 4, 4).expand(4, -1, -1).clone().requires_grad_(True)
    before = float(expert_diversity(gu, dn).detach())
    expert_diversity(gu, dn).backward()
    with torch.no_grad():
        after = float(expert_diversity(gu - 1.0 * gu.grad, dn - 1.0 * dn.grad))
    assert after < before
    y = torch.randn(10, 4)
    assert expert_output_similarity(gu[:1].expand(4, -1, -1), dn[:1].expand(4, -1, -1), y) == pytest.approx(1.0)


def test_group_and_task_balance_bounds():
    gp = torch.full((10, 4), 0.25)
    ids = torch.arange(10)[:, None] % 4
    assert float(group_balance(gp, ids)) == pytest.approx(1.0)
    collapsed = torch.zeros(10, 4)
    collapsed[:, 0] = 1.0
    assert float(group_balance(collapsed, torch.zeros(10, 1, dtype=torch.long))) == pytest.approx(4.0)
    tasks = torch.tensor([0] * 5 + [1] * 5)
    # per task every token on expert 0 -> each task collapsed although the mix is too
    v = task_balance(collapsed, torch.zeros(10, 1, dtype=torch.long), None, tasks, 3)
    assert float(v) == pytest.approx(4.0)


def test_extra_losses_only_when_enabled_and_counting_matches_model():
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_dim=64)
    for kw in DYNAMIC + [dict(router="noisy_topk", num_null_experts=0, num_tasks=2)]:
        kw = {k: v for k, v in kw.items() if k != "capacity_factor"}
        cfg = ModelConfig(**base, moe=MoEConfig(**{"num_experts": 4, "expert_dim": 16, **kw}))
        model = Transformer(cfg)
        assert count_params(cfg).total == sum(p.numel() for p in model.parameters()), kw
    cfg = ModelConfig(
        **base,
        moe=MoEConfig(
            num_experts=8,
            expert_dim=16,
            router="hierarchical",
            num_groups=2,
            group_balance_coef=0.1,
            diversity_coef=0.1,
        ),
    )
    x = torch.randint(0, 64, (2, 8))
    out = Transformer(cfg)(x, x)
    assert set(out.aux_losses) == {"load_balance", "z_loss", "diversity", "group_balance"}  # (cv, variance: coef 0)
    f = [flops_per_token(cfg, 8, k)["inference"] for k in (0, 1, 2)]
    assert f[2] - f[1] == f[1] - f[0] and flops_per_token(cfg, 8) == flops_per_token(cfg, 8, 2)


def test_experts_per_token_histogram_and_fields():
    ids = torch.zeros(4, 3, dtype=torch.long)
    keep = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    h = experts_per_token_hist(ids, keep, torch.tensor([1, 1, 1, 0]))
    assert h.tolist() == [0.0, 1.0, 1.0, 1.0]
    fields = k_fields(h, "moe/0/")
    assert fields["moe/0/k_mean"] == pytest.approx(2.0) and fields["moe/0/k_dist"][0] == 0.0
    assert mean_experts_per_token(
        {"moe/0/k_hist": h, "moe/1/k_hist": torch.tensor([0.0, 3.0, 0.0, 0.0])}
    ) == pytest.approx(1.5)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(top_p=0.0), "moe.top_p: expected 0 < top_p <= 1"),
        (dict(router="sigmoid", num_null_experts=2), "moe.num_null_experts: null experts need router"),
        (dict(router="hierarchical", num_groups=3), "moe.num_groups: 3 does not divide num_experts=8"),
        (dict(router="hierarchical", num_groups=4, top_groups=5), "moe.top_groups: expected between 1"),
        (dict(router="hierarchical", num_groups=4, top_groups=1, top_k=3), "moe.top_k: 3 is more than"),
        (dict(num_groups=2), "moe.num_groups: expert groups need router hierarchical"),
        (dict(group_balance_coef=0.1), "moe.group_balance_coef: group balancing needs router hierarchical"),
        (dict(task_balance_coef=0.1), "moe.task_balance_coef: per-task balancing needs num_tasks > 0"),
        (dict(diversity_coef=-1.0), "moe.diversity_coef: expected >= 0"),
        (dict(null_balance_coef=-0.1), "moe.null_balance_coef: expected >= 0"),
        (dict(null_k_target=1.5), "moe.null_k_target: a target for real experts per token needs num_null_experts"),
        (dict(num_null_experts=2, top_k=3, null_k_target=3.5), "moe.null_k_target: expected 0 < null_k"),
        (dict(num_null_experts=2, null_k_target=0.0), "moe.null_k_target: expected 0 < null_k_target"),
    ],
)
def test_config_errors_are_one_line(kw, message):
    problems = MoEConfig(**kw).validate()
    assert len(problems) == 1 and problems[0].startswith(message) and "\n" not in problems[0]


def test_routing_top_p_override():
    from moelab.errors import UserError
    from moelab.model.routers_dynamic import set_routing_top_p

    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_dim=64)
    m = Transformer(ModelConfig(**base, moe=MoEConfig(router="top_p", top_k=4, top_p=0.9, expert_dim=16)))
    set_routing_top_p(m, 0.01)  # below any single expert's mass: one expert per token
    x = torch.randint(0, 64, (2, 8))
    assert m.eval()(x).routing[0].experts_per_token.tolist() == [0.0, 16.0, 0.0, 0.0, 0.0]
    with pytest.raises(UserError, match="--routing-top-p: the model's router is not top_p"):
        set_routing_top_p(Transformer(ModelConfig(**base, moe=MoEConfig(expert_dim=16))), 0.5)
    with pytest.raises(UserError, match="expected 0 < P <= 1"):
        set_routing_top_p(m, 1.5)


def test_info_mean_k(tmp_path, capsys):
    from moelab.cli import main
    from tests.conftest import REPO

    cfg = str(REPO / "configs" / "tiny.yaml")
    assert main(["info", cfg, "--set", "moe.router=top_p", "--set", "moe.top_k=4", "--mean-k", "1.5", "--json"]) == 0
    at = json.loads(capsys.readouterr().out)
    assert main(["info", cfg, "--set", "moe.router=top_p", "--set", "moe.top_k=4", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert at["active_k"] == 1.5 and at["flops_per_token"]["train"] < full["flops_per_token"]["train"]
    assert main(["info", cfg, "--mean-k", "9"]) == 2
    assert "--mean-k: expected 0 <= K <= moe.top_k=2" in capsys.readouterr().err


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid", "expert_choice", "top_p"])
@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_experts_per_token_shortcut_equals_the_count(router, capacity, masked):
    """Fixed top-k without drops skips the per-token count (every real token at K); with or without the
    shortcut, the histogram is the count of kept experts per real token."""
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=8,
        top_k=2,
        expert_dim=8,
        router=router,
        capacity_factor=1.0 if router == "expert_choice" else capacity,
    )
    layer = MoELayer(16, cfg)
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.long)
    if masked:
        mask[0, :3] = 0
    _, stats = layer(x, mask if masked else None)
    keep = stats.keep if stats.keep is not None else torch.ones_like(stats.topk_ids, dtype=torch.bool)
    real = mask.reshape(-1).bool()
    want = torch.bincount(keep.sum(-1)[real], minlength=keep.shape[1] + 1).float()  # (expert choice: K = E)
    assert torch.equal(stats.experts_per_token, want)
    if router == "softmax_topk" and capacity is None:
        assert stats.experts_per_token[:2].sum() == 0  # the shortcut's case: all at K
