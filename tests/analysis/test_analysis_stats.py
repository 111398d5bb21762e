"""Routing statistics against values computed by hand, and information-theory invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.analysis import stats

# 4 tokens, E = 4, K = 2. Expert sets {0,1}, {0,2}, {1,0}, {3,0}.
IDS = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 0]])
# token 0 drops expert 1, token 3 drops expert 3
KEEP = torch.tensor([[True, False], [True, True], [True, True], [False, True]])


def test_balance_by_hand():
    b = stats.layer_balance(IDS, 4)
    # counts 4, 2, 1, 1 of 8 assignments
    assert b["counts"].tolist() == [4, 2, 1, 1]
    assert b["fraction"].tolist() == [0.5, 0.25, 0.125, 0.125]
    assert b["utilisation"].tolist() == [2.0, 1.0, 0.5, 0.5]
    # mean 2, deviations 2, 0, -1, -1 -> population var 6/4
    assert b["load_cv"] == pytest.approx(math.sqrt(1.5) / 2)
    assert b["max_utilisation"] == 2.0 and b["min_utilisation"] == 0.5
    assert b["dead"] == []
    # 0.5*1 + 0.25*2 + 2 * 0.125*3 bits
    assert b["load_entropy"] == pytest.approx(1.75)
    assert b["max_load_entropy"] == pytest.approx(2.0)
    assert b["dropped_fraction"] == 0.0


def test_balance_with_drops_by_hand():
    b = stats.layer_balance(IDS, 4, KEEP)
    assert b["counts"].tolist() == [4, 1, 1, 0]  # token 3's expert 3 dropped, token 0's expert 1 dropped
    assert b["dead"] == [3]
    assert b["dropped_fraction"] == pytest.approx(2 / 8)
    assert b["utilisation"].tolist() == pytest.approx([4 * 4 / 6, 4 / 6, 4 / 6, 0.0])


def test_balanced_and_collapsed_extremes():
    e = 8
    balanced = torch.arange(e * 4).remainder(e).view(-1, 1)
    assert stats.load_cv(stats.expert_counts(balanced, e)) == 0.0
    collapsed = torch.zeros(10, 1, dtype=torch.long)
    counts = stats.expert_counts(collapsed, e)
    assert stats.load_cv(counts) == pytest.approx(math.sqrt(e - 1))
    assert stats.dead_experts(counts) == list(range(1, e))
    assert stats.entropy_bits(counts) == 0.0


def test_coactivation_by_hand():
    c = stats.coactivation(IDS, 4)
    expected = (
        torch.tensor(
            [
                [4, 2, 1, 1],
                [2, 2, 0, 0],
                [1, 0, 1, 0],
                [1, 0, 0, 1],
            ],
            dtype=torch.float64,
        )
        / 4
    )
    torch.testing.assert_close(c, expected)
    kept = stats.coactivation(IDS, 4, KEEP)  # sets {0}, {0,2}, {1,0}, {0}
    expected = (
        torch.tensor(
            [
                [4, 1, 1, 0],
                [1, 1, 0, 0],
                [1, 0, 1, 0],
                [0, 0, 0, 0],
            ],
            dtype=torch.float64,
        )
        / 4
    )
    torch.testing.assert_close(kept, expected)


def test_domain_distribution_by_hand():
    dom = torch.tensor([0, 0, 1, 1])
    counts = stats.domain_expert_counts(IDS, dom, 2, 4)
    assert counts.tolist() == [[2, 1, 1, 0], [2, 1, 0, 1]]
    dist = stats.row_distribution(counts)
    assert dist.tolist() == [[0.5, 0.25, 0.25, 0.0], [0.5, 0.25, 0.0, 0.25]]
    # I = sum p(d,e) log2 p(d,e)/(p(d)p(e)): only experts 2 and 3 carry information,
    # each cell 1/8 * log2((1/8) / (1/2 * 1/8)) = 1/8 bit, two such cells
    assert stats.mutual_information(counts) == pytest.approx(0.25)


def test_mutual_information_zero_when_routing_ignores_domain():
    # every domain routes with the same expert distribution
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]] * 3)
    dom = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    assert stats.mutual_information(stats.domain_expert_counts(ids, dom, 3, 4)) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_equals_domain_entropy_for_perfect_specialisation():
    # domain 0 (3 tokens) only uses experts {0, 1}, domain 1 (1 token) only {2, 3}
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 3]])
    dom = torch.tensor([0, 0, 0, 1])
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert stats.mutual_information(stats.domain_expert_counts(ids, dom, 2, 4)) == pytest.approx(h)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=2, max_size=5), st.lists(st.integers(1, 20), min_size=2, max_size=6))
def test_mutual_information_of_a_product_table_is_zero(row_weights, col_weights):
    joint = torch.tensor(row_weights, dtype=torch.float64)[:, None] * torch.tensor(col_weights, dtype=torch.float64)
    assert stats.mutual_information(joint) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_mutual_information_specialised_and_bounded(data):
    num_domains = data.draw(st.integers(2, 4))
    per_domain = data.draw(st.integers(1, 3))
    e = num_domains * per_domain
    n = data.draw(st.integers(num_domains, 40))
    dom = torch.tensor(data.draw(st.lists(st.integers(0, num_domains - 1), min_size=n, max_size=n)))
    # each domain owns a disjoint block of experts; tokens pick any expert of their block
    offs = torch.tensor(data.draw(st.lists(st.integers(0, per_domain - 1), min_size=n, max_size=n)))
    ids = (dom * per_domain + offs).view(-1, 1)
    joint = stats.domain_expert_counts(ids, dom, num_domains, e)
    mi = stats.mutual_information(joint)
    assert mi == pytest.approx(stats.entropy_bits(torch.bincount(dom, minlength=num_domains)), abs=1e-9)
    # any routing: 0 <= I <= min(H(domain), H(expert))
    rand = torch.tensor(data.draw(st.lists(st.integers(0, e - 1), min_size=n, max_size=n))).view(-1, 1)
    joint = stats.domain_expert_counts(rand, dom, num_domains, e)
    mi = stats.mutual_information(joint)
    assert -1e-12 <= mi <= min(stats.entropy_bits(joint.sum(1)), stats.entropy_bits(joint.sum(0))) + 1e-9


def test_shuffled_mutual_information_is_chance_level():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (4000, 2), generator=g)
    dom = torch.randint(0, 3, (4000,), generator=g)
    chance = stats.shuffled_mutual_information(ids, dom, 3, 8)
    # plug-in bias (M-1)(E-1) / (2 N ln 2) with N = 8000 assignments: ~1.3e-3 bits
    assert 0 < chance < 5e-3
    specialised = torch.stack([dom * 2, dom * 2 + 1], 1)
    assert (
        stats.shuffled_mutual_information(specialised, dom, 3, 8)
        < 0.01
        < stats.mutual_information(stats.domain_expert_counts(specialised, dom, 3, 8))
    )


def test_top_tokens_by_hand():
    # token 5 goes to expert 0 three times, token 7 to expert 0 once and expert 1 three times
    tokens = torch.tensor([5, 5, 5, 7, 7, 7, 7])
    ids = torch.tensor([[0], [0], [0], [0], [1], [1], [1]])
    te = stats.token_expert_counts(tokens, ids, 10, 2)
    assert te[5].tolist() == [3, 0] and te[7].tolist() == [1, 3]
    top = stats.top_tokens(te, n=2, min_count=1)
    assert [t["id"] for t in top["frequent"][0]] == [5, 7]
    assert top["frequent"][0][0]["count"] == 3 and top["frequent"][0][0]["share"] == 1.0
    assert top["frequent"][0][1]["share"] == 0.25
    # P(e0) = 4/7; lift of token 5 on e0 = 1 / (4/7)
    assert top["distinctive"][0][0]["id"] == 5
    assert top["distinctive"][0][0]["lift"] == pytest.approx(7 / 4)
    assert [t["id"] for t in top["frequent"][1]] == [7]  # token 5 never reached expert 1
    assert stats.top_tokens(te, n=2, min_count=5)["distinctive"][0] == []  # no token seen 5 times


def test_transition_deterministic_and_independent():
    a = torch.tensor([0, 0, 1, 1] * 4)
    b = torch.tensor([2, 2, 3, 3] * 4)  # b is a function of a
    t = stats.transition_stats(a, b, 4)
    assert t["cond_entropy"] == pytest.approx(0.0) and t["entropy"] == pytest.approx(1.0)
    assert t["mutual_information"] == pytest.approx(1.0)
    assert t["accuracy"] == 1.0 and t["baseline"] == 0.5
    assert t["transition"][0].tolist() == [0, 0, 1, 0] and t["transition"][2].tolist() == [0, 0, 0, 0]
    b = torch.tensor([0, 1] * 8)  # b alternates within each a: independent of a
    t = stats.transition_stats(a, b, 4)
    assert t["cond_entropy"] == pytest.approx(1.0) and t["mutual_information"] == pytest.approx(0.0)


def test_predict_accuracy_unseen_falls_back_to_majority():
    fit = torch.tensor([[0.0, 3.0], [0.0, 0.0]])  # a=1 never seen; overall majority b=1
    assert stats.predict_accuracy(fit, torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0])) == pytest.approx(2 / 3)
