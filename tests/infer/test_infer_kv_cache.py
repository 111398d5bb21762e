"""Decoding with the KV cache equals a full forward pass, in every way the cache is driven."""

import pytest
import torch

from moelab.infer.decoding import decode_layout, decoding
from moelab.infer.kv_cache import KVCache

ATOL = 2e-5


def full_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("moe", [{}, {"num_shared_experts": 1, "shared_expert_gate": True}, {"router": "sigmoid"}])
def test_prefill_then_decode_equals_full_forward_batched_left_padded(make_model, moe):
    model = make_model(**moe)
    torch.manual_seed(1)
    lens, extra = [5, 11, 2], 7
    seqs = [torch.randint(0, 256, (n + extra,)).tolist() for n in lens]
    ref = [full_logits(model, s) for s in seqs]
    cache = KVCache.for_model(model, max_batch=3, max_len=32)
    longest = max(lens)
    pad = [longest - n for n in lens]
    idx = torch.tensor([[0] * p + s[:n] for p, s, n in zip(pad, seqs, lens, strict=True)])
    mask = torch.tensor([[0] * p + [1] * n for p, n in zip(pad, lens, strict=True)])
    with torch.no_grad(), decoding(model):
        pos, am = cache.prefill(slice(0, 3), pad, longest)
        out = model(idx, mask=mask, positions=pos, cache=cache, attn_mask=am).logits
        for i, n in enumerate(lens):
            torch.testing.assert_close(out[i, pad[i] :], ref[i][:n], atol=ATOL, rtol=0)
        for t in range(extra):
            tok = torch.tensor([[s[n + t]] for s, n in zip(seqs, lens, strict=True)])
            pos, am = cache.extend(slice(0, 3))
            out = model(tok, positions=pos, cache=cache, attn_mask=am).logits
            for i, n in enumerate(lens):
                torch.testing.assert_close(out[i, 0], ref[i][n + t], atol=ATOL, rtol=0)


def test_rows_at_different_lengths_and_row_moves(model):
    """Continuous batching: rows prefilled at different times decode together (one slot per row), and
    a row moved into a freed slot continues exactly."""
    torch.manual_seed(2)
    seqs = [torch.randint(0, 256, (20,)).tolist() for _ in range(3)]
    ref = [full_logits(model, s) for s in seqs]
    cache = KVCache.for_model(model, max_batch=3, max_len=32)
    lens = [3, 8, 5]
    with torch.no_grad(), decoding(model):
        for r, n in enumerate(lens):  # separate prefills, no padding
            pos, am = cache.prefill(slice(r, r + 1), [0], n)
            model(torch.tensor([seqs[r][:n]]), positions=pos, cache=cache, attn_mask=am)
        rows = [0, 1, 2]
        for step in range(6):
            if step == 3:  # retire row 0: move row 2 into it
                cache.move_row(2, 0)
                rows = [2, 1]
            b = len(rows)
            tok = torch.tensor([[seqs[r][lens[r] + step]] for r in rows])
            pos, am = cache.extend(slice(0, b))
            assert am is not None  # unequal lengths need a mask
            out = model(tok, positions=pos, cache=cache, attn_mask=am).logits
            for i, r in enumerate(rows):
                torch.testing.assert_close(out[i, 0], ref[r][lens[r] + step], atol=ATOL, rtol=0)


def test_decode_layout_keeps_values_and_outputs(model):
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        before = model(x).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert decode_layout(model) > 0
        after = model(x).logits
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.layers[0].attn.q_proj.weight.t().is_contiguous()
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


def test_overflow_is_an_error(model):
    cache = KVCache.for_model(model, max_batch=1, max_len=4)
    cache.prefill(slice(0, 1), [0], 4)
    with pytest.raises(ValueError, match="overflow"):
        cache.extend(slice(0, 1))


def test_row_slot_steps_with_a_kv_bucket_equal_full_forward(model):
    """A graph-replayed decode step attends over the cache rounded up to `kv_bucket` slots (the mask
    hides the rest, including slots a previous sequence left behind): logits are unchanged, and the
    attended length takes one value per bucket instead of one per step."""
    torch.manual_seed(3)
    seqs = [torch.randint(0, 256, (24,)).tolist() for _ in range(2)]
    ref = [full_logits(model, s) for s in seqs]
    cache = KVCache.for_model(model, max_batch=2, max_len=22)
    cache.row_slots, cache.kv_bucket = True, 8
    cache.k.normal_()  # stale values in every slot, as after earlier requests
    cache.v.normal_()
    lens = [3, 6]
    seen = set()
    with torch.no_grad(), decoding(model):
        for r, n in enumerate(lens):
            pos, am = cache.prefill(slice(r, r + 1), [0], n)
            model(torch.tensor([seqs[r][:n]]), positions=pos, cache=cache, attn_mask=am)
        for step in range(15):
            tok = torch.tensor([[s[n + step]] for s, n in zip(seqs, lens, strict=True)])
            pos, am = cache.extend(slice(0, 2))
            seen.add(am.shape[-1])
            out = model(tok, positions=pos, cache=cache, attn_mask=am).logits
            for i, n in enumerate(lens):
                torch.testing.assert_close(out[i, 0], ref[i][n + step], atol=ATOL, rtol=0)
    assert seen == {8, 16, 22}  # rows reach slot 21: buckets of 8, the last capped at max_len


def test_kv_bucket_is_validated(model, tokenizer):
    from moelab.errors import UserError
    from moelab.infer.scheduler import Engine

    for bad in (0, -4, 2.5, True):
        with pytest.raises(UserError, match="kv_bucket: expected an integer >= 1"):
            Engine(model, tokenizer, kv_bucket=bad)


def test_idle_rows_ride_along_without_touching_real_rows(model):
    """A graph-replayed step pads the batch with idle rows: real rows' logits are unchanged, idle rows
    keep their lengths (even a row a finished request left full, which must not overflow)."""
    torch.manual_seed(4)
    seqs = [torch.randint(0, 256, (20,)).tolist() for _ in range(2)]
    ref = [full_logits(model, s) for s in seqs]
    cache = KVCache.for_model(model, max_batch=4, max_len=16)
    cache.row_slots = True
    lens = [2, 5]
    with torch.no_grad(), decoding(model):
        for r, n in enumerate(lens):
            pos, am = cache.prefill(slice(r, r + 1), [0], n)
            model(torch.tensor([seqs[r][:n]]), positions=pos, cache=cache, attn_mask=am)
        cache.start[2], cache.length[2] = 0, 16  # left full by a finished request
        for step in range(8):
            tok = torch.tensor([[s[n + step]] for s, n in zip(seqs, lens, strict=True)] + [[0], [0]])
            pos, am = cache.extend(slice(0, 2), idle=2)
            assert pos.shape == (4, 1) and am.shape[0] == 4
            out = model(tok, positions=pos, cache=cache, attn_mask=am).logits
            assert torch.isfinite(out).all()
            for i, n in enumerate(lens):
                torch.testing.assert_close(out[i, 0], ref[i][n + step], atol=ATOL, rtol=0)
    assert cache.length == [10, 13, 16, 0]
    with pytest.raises(ValueError, match="5 rows needed, the cache has 4"):
        cache.extend(slice(0, 2), idle=3)
    cache.row_slots = False
    with pytest.raises(ValueError, match="idle rows ride along only in row-slot decode steps"):
        cache.extend(slice(0, 2), idle=1)
