"""Sampling: top-k / top-p keep the right tokens, seeded draws repeat, greedy is argmax."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moelab.errors import UserError
from moelab.infer.sampling import SamplingParams, logits_to_probs, next_tokens, sample

# Distinct logits at least 0.01 apart: which of two tied tokens survives a cut is arbitrary.
logit_rows = st.lists(st.integers(-2000, 2000), min_size=2, max_size=40, unique=True).map(
    lambda xs: [x / 100 for x in xs]
)


def assert_keeps(probs, logits, kept, temperature=1.0):
    """probs is zero outside `kept` and the renormalised tempered softmax inside it."""
    assert (probs[~kept] == 0).all()
    expected = (logits[kept] / temperature).softmax(-1)
    torch.testing.assert_close(probs[kept], expected, atol=1e-6, rtol=1e-4)


@settings(max_examples=80, deadline=None)
@given(row=logit_rows, k=st.integers(1, 50), temperature=st.floats(0.05, 5.0))
def test_top_k_keeps_exactly_the_k_largest(row, k, temperature):
    logits = torch.tensor(row)
    probs = logits_to_probs(logits[None], temperature, top_k=k)[0]
    kept = torch.zeros(len(row), dtype=torch.bool)
    kept[logits.topk(min(k, len(row))).indices] = True
    assert_keeps(probs, logits, kept, temperature)


@settings(max_examples=80, deadline=None)
@given(row=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(row, p):
    logits = torch.tensor(row)
    full = logits.softmax(-1)
    order = full.argsort(descending=True)
    mass_before = full[order].cumsum(0) - full[order]  # the definition, token by token
    assume(bool(((mass_before - p).abs() > 1e-5).all()))  # a cut within rounding error goes either way
    n = int((mass_before < p).sum())
    kept = torch.zeros(len(row), dtype=torch.bool)
    kept[order[: max(n, 1)]] = True
    assert_keeps(logits_to_probs(logits[None], 1.0, top_p=p)[0], logits, kept)


def test_per_row_settings_and_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 3)
    probs = logits_to_probs(logits, [1.0, 1.0, 0.5], top_k=[1, None, None], top_p=[None, 0.7, None])
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (probs[1] > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(probs[2], (logits[2] / 0.5).softmax(-1))


def test_seeded_sampling_repeats_and_seeds_differ():
    logits = torch.randn(4, 100)
    gens = lambda s: [torch.Generator().manual_seed(s + i) for i in range(4)]  # noqa: E731
    probs = logits_to_probs(logits, 1.5)
    a = [sample(probs, gens(7)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)
    draws = torch.stack([sample(probs, gens(s)) for s in range(20)])
    assert len({tuple(r) for r in draws.tolist()}) > 1


def test_next_tokens_mixes_greedy_and_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 9.0], [4.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0)]
    assert next_tokens(logits, params, [None, torch.Generator().manual_seed(0), None]).tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", 0), ("temperature", -1.0), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5), ("stop", [""])],
)
def test_bad_params_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: value}).validate()
