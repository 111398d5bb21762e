"""Dispatch plans, gather-only dispatch/combine, expert buckets, against slow references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moelab.kernels.cpu_buckets as experts_mod
from moelab.kernels import sort_dispatch
from moelab.kernels.buckets import plan_layout
from moelab.kernels.cpu_buckets import grid_rows, grouped_swiglu, plan_buckets
from moelab.kernels.reference import reference_moe
from moelab.kernels.sort_dispatch import combine, dispatch, plan_dispatch, row_weights, sum_rows

BLOCKS = {"none": None, "x4": lambda c: -(-c // 4) * 4, "grid": grid_rows}


def random_routing(t, e, k, seed, drop):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    keep = torch.rand(t, k, generator=g) > 0.3 if drop else None
    return ids, keep, g


@settings(max_examples=80, deadline=None)
@given(
    t=st.integers(1, 30),
    e=st.integers(1, 8),
    k=st.integers(1, 3),
    blocks=st.sampled_from(list(BLOCKS)),
    drop=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_plan_invariants(t, e, k, blocks, drop, seed):
    k = min(k, e)
    ids, keep, _ = random_routing(t, e, k, seed, drop)
    plan = plan_dispatch(ids, keep, e, BLOCKS[blocks])
    kept_mask = keep if keep is not None else torch.ones_like(ids, dtype=torch.bool)
    loads = torch.bincount(ids[kept_mask], minlength=e).tolist()
    rounded = BLOCKS[blocks] or (lambda c: c)
    assert plan.counts == [rounded(c) for c in loads]
    assert plan.rows == sum(plan.counts) and plan.kept == int(kept_mask.sum())
    starts = torch.tensor([0] + plan.counts).cumsum(0)
    pos_kept = plan.pos[kept_mask]
    assert torch.all(plan.pos[~kept_mask] == plan.rows)  # dropped read the zero row
    assert pos_kept.unique().numel() == pos_kept.numel()  # one row per kept assignment
    for ti, j in kept_mask.nonzero().tolist():
        row, ex = int(plan.pos[ti, j]), int(ids[ti, j])
        assert starts[ex] <= row < starts[ex + 1]  # inside its expert's block
        assert int(plan.src[row]) == ti and int(plan.inv[row]) == ti * k + j
    padding = torch.ones(plan.rows, dtype=torch.bool)
    padding[pos_kept] = False
    assert torch.all(plan.inv[padding] == t * k)


@settings(max_examples=80, deadline=None)
@given(
    t=st.integers(1, 30),
    e=st.integers(1, 8),
    k=st.integers(1, 3),
    drop=st.booleans(),
    seed=st.integers(0, 10_000),
    call_rows=st.sampled_from([0.0, 3.0, 1e9]),
    grid=st.booleans(),
)
def test_layout_plan_puts_every_bucket_in_one_contiguous_run(t, e, k, drop, seed, call_rows, grid):
    # plan_dispatch(layout=...) orders x_sorted bucket by bucket, each expert's block padded to its bucket's
    # rows: every assignment lands inside its expert's block, at the place the bucket says
    k = min(k, e)
    ids, keep, _ = random_routing(t, e, k, seed, drop)
    seen = {}

    def layout(counts):
        seen["counts"] = counts
        counts = [grid_rows(c) if grid else c for c in counts]
        return plan_layout(counts, call_rows, 0.0, binary=grid)

    plan = plan_dispatch(ids, keep, e, layout=layout)
    kept_mask = keep if keep is not None else torch.ones_like(ids, dtype=torch.bool)
    assert seen["counts"] == torch.bincount(ids[kept_mask], minlength=e).tolist()
    buckets = plan.layout
    assert sorted(x for b in buckets for x in b.experts) == [x for x, c in enumerate(seen["counts"]) if c]
    block = {}  # expert -> (first row, rows)
    row = 0
    for b in buckets:
        assert b.index is None and b.first_row == row
        for x in b.experts:
            assert seen["counts"][x] <= b.rows and plan.counts[x] == b.rows
            block[x] = (row, b.rows)
            row += b.rows
    assert plan.rows == row == sum(plan.counts) and plan.kept == int(kept_mask.sum())
    assert torch.all(plan.pos[~kept_mask] == plan.rows)
    for ti, j in kept_mask.nonzero().tolist():
        r, (first, rows) = int(plan.pos[ti, j]), block[int(ids[ti, j])]
        assert first <= r < first + rows
        assert int(plan.src[r]) == ti and int(plan.inv[r]) == ti * k + j
    padding = torch.ones(plan.rows, dtype=torch.bool)
    padding[plan.pos[kept_mask]] = False
    assert torch.all(plan.inv[padding] == t * k)
    if call_rows >= 1e9 and buckets and not grid:  # calls dearer than any padding: one bucket
        assert len(buckets) == 1


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("drop", [False, True])
def test_dispatch_combine_equal_autograd_gathers(blocks, drop):
    t, e, k, d = 13, 5, 2, 6
    ids, keep, g = random_routing(t, e, k, 7, drop)
    plan = plan_dispatch(ids, keep, e, BLOCKS[blocks])
    x = torch.randn(t, d, generator=g, requires_grad=True)
    w = torch.rand(t, k, generator=g)
    if keep is not None:
        w = w * keep
    w.requires_grad_(True)
    f = torch.randn(plan.rows, d, generator=g)  # a fixed per-row transform stands in for the experts
    out = combine(dispatch(x, plan) * f, w, plan)
    grad_out = torch.randn(t, d, generator=g)
    dx, dw = torch.autograd.grad(out, (x, w), grad_out)

    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    kept = keep if keep is not None else torch.ones_like(ids, dtype=torch.bool)
    ref = torch.zeros(t, d)
    for ti, j in kept.nonzero().tolist():
        ref = ref + torch.zeros(t, d).index_put((torch.tensor([ti]),), w2[ti, j] * x2[ti] * f[plan.pos[ti, j]])
    rdx, rdw = torch.autograd.grad(ref, (x2, w2), grad_out)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dw, rdw)


@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_token_row_sums_equal_a_loop(rows_dtype, drop, k):
    """Each token's K rows summed (sum_rows forward, dispatch backward) equal a plain loop's fp64 sum, 0 for
    dropped assignments, for fp32 rows and for bf16 rows summed into fp32 (never rounded to bf16)."""
    t, e, d = 17, 9, 5
    ids, keep, g = random_routing(t, e, k, 11, drop)
    plan = plan_dispatch(ids, keep, e, BLOCKS["x4"])
    rows = (torch.randn(plan.rows, d, generator=g) * 3).to(rows_dtype)
    out = sort_dispatch._sum_token_rows(rows, plan, torch.float32)
    kept = keep if keep is not None else torch.ones_like(ids, dtype=torch.bool)
    ref = torch.zeros(t, d, dtype=torch.float64)
    for ti, j in kept.nonzero().tolist():
        ref[ti] += rows[plan.pos[ti, j]].double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_computes_only_the_gradients_asked_for(dtype):
    """combine's backward with only the rows or only the weights trainable (frozen router, frozen experts)
    gives what the full backward gives for that input, in the rows' dtype."""
    t, e, k, d = 13, 5, 3, 6
    ids, keep, g = random_routing(t, e, k, 5, True)
    plan = plan_dispatch(ids, keep, e, BLOCKS["x4"])
    y = torch.randn(plan.rows, d, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g) * keep
    grad_out = torch.randn(t, d, generator=g)
    ya, wa = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
    full = torch.autograd.grad(combine(ya, wa, plan), (ya, wa), grad_out)
    yb = y.clone().requires_grad_(True)
    (only_y,) = torch.autograd.grad(combine(yb, w, plan), (yb,), grad_out)
    wc = w.clone().requires_grad_(True)
    (only_w,) = torch.autograd.grad(combine(y, wc, plan), (wc,), grad_out)
    assert only_y.dtype == dtype
    torch.testing.assert_close(only_y, full[0])
    torch.testing.assert_close(only_w, full[1])
    assert (only_w[~keep] == 0).all()  # dropped assignments get no weight gradient


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("drop", [False, True])
def test_sum_rows_of_weighted_rows_equals_combine(blocks, drop):
    """Weights applied per row before the sum (what the CPU kernel does between its matmuls) give combine's
    output and gradients, padding rows and dropped assignments included."""
    t, e, k, d = 13, 5, 3, 6
    ids, keep, g = random_routing(t, e, k, 11, drop)
    plan = plan_dispatch(ids, keep, e, BLOCKS[blocks])
    x = torch.randn(t, d, generator=g, requires_grad=True)
    w = torch.rand(t, k, generator=g)
    w = (w if keep is None else w * keep).requires_grad_(True)
    f = torch.randn(plan.rows, d, generator=g)
    rw = row_weights(w, plan)
    assert torch.all(rw[plan.inv == t * k] == 0)  # padding rows weigh nothing
    out = sum_rows(dispatch(x, plan) * f * rw[:, None], plan)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = combine(dispatch(x2, plan) * f, w2, plan)
    grad_out = torch.randn(t, d, generator=g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(
        torch.autograd.grad(out, (x, w), grad_out), torch.autograd.grad(ref, (x2, w2), grad_out), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call_flops", [0.0, 1.0], ids=["bucket-per-load", "one-bucket"])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_grouped_swiglu_row_weights_equal_combine(call_flops, blocks, monkeypatch):
    """The routing weights scaled inside the kernel, on in-place and on gathered buckets (one bucket of
    unequal loads gathers its rows), equal the experts followed by combine."""
    monkeypatch.setattr(experts_mod.MatmulCosts, "of", staticmethod(lambda dtype, device: costs(call_flops)))
    t, e, k, d, f = 40, 6, 2, 16, 12
    ids, _, g = random_routing(t, e, k, 4, False)
    ids[:25] = torch.tensor([0, 1])  # skewed loads
    plan = plan_dispatch(ids, None, e, BLOCKS[blocks])
    leaves = [
        torch.randn(t, d, generator=g),
        torch.rand(t, k, generator=g),
        torch.randn(e, 2 * f, d, generator=g),
        torch.randn(e, d, f, generator=g),
    ]
    a = [v.clone().requires_grad_(True) for v in leaves]
    b = [v.clone().requires_grad_(True) for v in leaves]
    buckets = plan_buckets(plan.counts, *experts_mod._costs(torch.float32, a[0], a[3]))
    if call_flops and blocks != "grid":  # (the grid rounds these loads to equal blocks: no gather needed)
        assert any(bk.index is not None for bk in buckets)  # the gathered path is tested
    fused = sum_rows(
        experts_mod._GroupedSwiGLU.apply(
            dispatch(a[0], plan), a[2], a[3], buckets, torch.float32, row_weights(a[1], plan)
        ),
        plan,
    )
    plain = combine(grouped_swiglu(dispatch(b[0], plan), b[2], b[3], plan.counts), b[1], plan)
    grad_out = torch.randn(t, d, generator=g)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, ga, gb in zip(
        ("x", "weights", "gate_up", "down"),
        torch.autograd.grad(fused, a, grad_out),
        torch.autograd.grad(plain, b, grad_out),
        strict=True,
    ):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("drop", [False, True])
def test_dispatch_casts_inside_and_returns_the_gradient_in_x_dtype(k, drop):
    # bf16 experts on an fp32 residual stream: rows gathered in bf16, K row gradients summed into x's fp32
    t, e, d = 11, 4, 8
    ids, keep, g = random_routing(t, e, k, 3, drop)
    plan = plan_dispatch(ids, keep, e)
    x = torch.randn(t, d, generator=g, requires_grad=True)
    xs = dispatch(x, plan, torch.bfloat16)
    assert xs.dtype == torch.bfloat16
    torch.testing.assert_close(xs, x.detach().to(torch.bfloat16)[plan.src], rtol=0, atol=0)
    gs = torch.randn(plan.rows, d, generator=g).to(torch.bfloat16)
    (dx,) = torch.autograd.grad(xs, x, gs)
    assert dx.dtype == torch.float32
    kept = keep if keep is not None else torch.ones_like(ids, dtype=torch.bool)
    ref = torch.zeros(t, d)
    for ti, j in kept.nonzero().tolist():
        ref[ti] += gs[plan.pos[ti, j]].float()
    torch.testing.assert_close(dx, ref, rtol=0, atol=0)  # bf16 rows summed exactly in fp32


@settings(max_examples=80, deadline=None)
@given(
    counts=st.lists(st.integers(0, 300), min_size=1, max_size=9),
    call_rows=st.sampled_from([0, 5, 50, 1e9]),
    gather=st.sampled_from([(0.0, 0.0), (40.0, 0.5)]),
    binary=st.booleans(),
)
def test_buckets_cover_every_active_expert_once(counts, call_rows, gather, binary):
    buckets = plan_buckets(counts, call_rows, *gather, binary=binary)
    n = sum(counts)
    starts = [sum(counts[:e]) for e in range(len(counts))]
    seen = [e for b in buckets for e in b.experts]
    assert sorted(seen) == [e for e, c in enumerate(counts) if c]  # each active expert exactly once
    for b in buckets:
        assert b.experts == sorted(b.experts) and all(counts[e] <= b.rows for e in b.experts)
        assert b.rows == max(counts[e] for e in b.experts)
        if b.index is None:  # used in place: equal, adjacent blocks
            assert all(counts[e] == b.rows for e in b.experts) and b.first_row == starts[b.experts[0]]
            assert b.experts == list(range(b.experts[0], b.experts[-1] + 1))
        else:
            idx = b.index.view(len(b.experts), b.rows)
            for i, e in enumerate(b.experts):
                assert idx[i, : counts[e]].tolist() == list(range(starts[e], starts[e] + counts[e]))
                assert torch.all(idx[i, counts[e] :] == n)  # padding reads the zero row
    if call_rows >= 1e9 and seen and not binary and gather == (0.0, 0.0):
        assert len(buckets) == 1
    if call_rows == 0 and not binary and gather == (0.0, 0.0):  # free calls: one bucket per distinct load
        assert len(buckets) <= len({c for c in counts if c})
    # the split is optimal: no other grouping of the sorted loads into runs costs less (a bucket used in
    # place gathers nothing, so it is charged no gather: equal neighbours are merged after the search)
    loads = sorted((c for c in counts if c), reverse=True)
    cost = sum(
        run_cost(len(b.experts), b.rows, call_rows, (0.0, 0.0) if b.index is None else gather, binary) for b in buckets
    )
    assert cost <= brute_force_cost(loads, call_rows, gather, binary) + 1e-6


def run_cost(n, rows, call_rows, gather, binary):
    calls = bin(n).count("1") if binary else 1
    return calls * call_rows + n * rows + (n > 1) * (n * gather[0] + gather[1] * n * rows)


def brute_force_cost(loads, call_rows, gather, binary):
    if not loads:
        return 0
    return min(
        run_cost(i, loads[0], call_rows, gather, binary) + brute_force_cost(loads[i:], call_rows, gather, binary)
        for i in range(1, len(loads) + 1)
    )


def costs(call_s):
    return experts_mod.MatmulCosts(call_s, 1e9, 1e15)  # copies ~free: only calls vs padding matter


def test_equal_neighbours_share_one_bmm_in_place():
    # a row grid makes equal loads common: adjacent experts of equal rows run as one contiguous bmm with no
    # gather, even where the cost model (which charges any multi-expert run a gather) would split them
    buckets = plan_buckets([512, 576, 512, 512, 512, 0, 512], call_rows=89.0, gather_rows=140.0, gather_frac=0.1)
    in_place = [(b.experts, b.rows, b.first_row) for b in buckets if b.index is None]
    assert ([2, 3, 4], 512, 1088) in in_place and ([6], 512, 2624) in in_place
    assert sorted(e for b in buckets for e in b.experts) == [0, 1, 2, 3, 4, 6]


@pytest.mark.parametrize("call_flops", [0.0, 1.0], ids=["bucket-per-load", "one-bucket"])
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_grouped_swiglu_equals_reference(call_flops, blocks, monkeypatch):
    monkeypatch.setattr(experts_mod.MatmulCosts, "of", staticmethod(lambda dtype, device: costs(call_flops)))
    t, e, k, d, f = 40, 6, 2, 16, 12
    ids, _, g = random_routing(t, e, k, 3, False)
    ids[:25] = torch.tensor([0, 1])  # skewed loads; some experts may go idle
    plan = plan_dispatch(ids, None, e, BLOCKS[blocks])
    x = torch.randn(t, d, generator=g, requires_grad=True)
    w = torch.rand(t, k, generator=g, requires_grad=True)
    gate_up = torch.randn(e, 2 * f, d, generator=g).requires_grad_(True)
    down = torch.randn(e, d, f, generator=g).requires_grad_(True)
    fast = combine(grouped_swiglu(dispatch(x, plan), gate_up, down, plan.counts), w, plan)
    grad_out = torch.randn(t, d, generator=g)
    got = torch.autograd.grad(fast, (x, w, gate_up, down), grad_out)
    ref = reference_moe(x, gate_up, down, ids, w)
    want = torch.autograd.grad(ref, (x, w, gate_up, down), grad_out)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(got, want, ["x", "weights", "gate_up", "down"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_bucketings_agree(monkeypatch):
    t, e, k, d, f = 64, 4, 2, 32, 16
    ids, _, g = random_routing(t, e, k, 5, False)
    x = torch.randn(t, d, generator=g).bfloat16()
    gate_up, down = torch.randn(e, 2 * f, d, generator=g) * 0.2, torch.randn(e, d, f, generator=g) * 0.2
    plan = plan_dispatch(ids, None, e, grid_rows)
    outs = []
    for call_flops in (0.0, 1.0):
        monkeypatch.setattr(experts_mod.MatmulCosts, "of", staticmethod(lambda dtype, device, c=call_flops: costs(c)))
        outs.append(grouped_swiglu(dispatch(x, plan), gate_up, down, plan.counts)[plan.pos.reshape(-1)])
    torch.testing.assert_close(outs[0], outs[1])  # same rows, same dtype: equal up to bf16 rounding


@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (True, False, True)]
)
@pytest.mark.parametrize("blocks", ["none", "grid"])
def test_backward_computes_only_the_gradients_asked_for(needs, blocks, monkeypatch):
    """Frozen experts (LoRA elsewhere, router-only tuning) get no gradient and cost no weight-gradient
    matmuls; the gradients that are asked for still equal the reference's."""
    monkeypatch.setattr(experts_mod.MatmulCosts, "of", staticmethod(lambda dtype, device: costs(0.0)))
    t, e, k, d, f = 40, 6, 2, 16, 12
    ids, _, g = random_routing(t, e, k, 11, False)
    ids[:25] = torch.tensor([0, 1])  # skewed: idle experts and several buckets
    plan = plan_dispatch(ids, None, e, BLOCKS[blocks])
    w = torch.rand(t, k, generator=g, requires_grad=True)  # the router's weights always train here
    tensors = [torch.randn(t, d, generator=g), torch.randn(e, 2 * f, d, generator=g), torch.randn(e, d, f, generator=g)]
    x, gate_up, down = (v.requires_grad_(need) for v, need in zip(tensors, needs, strict=True))
    calls = []
    real_bmm = experts_mod._bmm
    monkeypatch.setattr(experts_mod, "_bmm", lambda *a, **kw: calls.append(1) or real_bmm(*a, **kw))
    fast = combine(grouped_swiglu(dispatch(x, plan), gate_up, down, plan.counts), w, plan)
    forward_calls = len(calls)
    grad_out = torch.randn(t, d, generator=g)
    fast.backward(grad_out)
    n_buckets = forward_calls // 2
    # per bucket: d down 1 bmm; dx and d gate_up share da (1 bmm) and take one each
    want_calls = needs[2] + (needs[0] or needs[1]) + needs[0] + needs[1]
    assert len(calls) - forward_calls == n_buckets * want_calls

    refs = [v.detach().clone().requires_grad_(need) for v, need in zip(tensors, needs, strict=True)]
    w_ref = w.detach().clone().requires_grad_(True)
    reference_moe(*refs[:3], ids, w_ref).backward(grad_out)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    for got, want, need, name in zip((x, gate_up, down), refs, needs, ["x", "gate_up", "down"], strict=True):
        if need:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert got.grad is None, name
