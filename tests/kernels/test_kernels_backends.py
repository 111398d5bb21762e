"""Expert backends against the mask-and-loop oracle; mostly `grouped_mm` (device-planned,
torch._grouped_mm), with `cpu_buckets` through the same forward/gradient checks in fp32 and bf16.

`torch._grouped_mm` runs in CPU builds too, so everything but speed is checked here: forward and
gradients in fp32 and bf16, dropped assignments, idle experts, one expert taking every token, odd
sizes, alignment padding, no host reads on the path, and a whole MoE layer under torch.compile.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.config import ROUTERS, MoEConfig
from moelab.kernels import AutoBackend, CpuBucketsBackend, GroupedMMBackend, backend_name, build_expert_backend
from moelab.kernels.grouped_mm import plan_on_device
from moelab.kernels.reference import reference_moe
from moelab.model.moe import MoELayer


def routing(t, e, k, seed, drop, one_expert=False):
    g = torch.Generator().manual_seed(seed)
    if one_expert:  # every token's first choice is expert 0
        ids = torch.stack(
            [
                torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(e - 1, generator=g)[: k - 1] + 1])
                for _ in range(t)
            ]
        )
    else:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    keep = torch.rand(t, k, generator=g) > 0.3 if drop else None
    w = torch.rand(t, k, generator=g)
    if keep is not None:
        w = w * keep
    return ids, keep, w, g


def grads_of(fn, x, gate_up, down, w, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_up, down, w)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


BACKENDS = {
    "grouped_mm": lambda: GroupedMMBackend(1),
    "grouped_mm-align8": lambda: GroupedMMBackend(8),
    "cpu_buckets": CpuBucketsBackend,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name_", list(BACKENDS))
@pytest.mark.parametrize("case", ["plain", "drop", "idle", "one_expert", "odd"])
def test_backend_equals_reference_forward_and_grads(dtype, backend_name_, case):
    t, e, k, d, f = {"odd": (37, 7, 3, 24, 40), "idle": (3, 16, 2, 16, 8)}.get(case, (29, 6, 2, 16, 24))
    ids, keep, w, g = routing(
        t, e, k, seed=len(case) * 7 + len(backend_name_), drop=case == "drop", one_expert=case == "one_expert"
    )
    x = torch.randn(t, d, generator=g).to(dtype)
    gate_up = (torch.randn(e, 2 * f, d, generator=g) * 0.3).to(dtype)
    down = (torch.randn(e, d, f, generator=g) * 0.3).to(dtype)
    backend = BACKENDS[backend_name_]()
    grad_out = torch.randn(t, d, generator=g)
    fast, g_fast = grads_of(lambda *a: backend.moe(*a[:3], ids, a[3], keep), x, gate_up, down, w, grad_out)
    ref, g_ref = grads_of(lambda *a: reference_moe(*a[:3], ids, a[3]), x, gate_up, down, w, grad_out)
    if keep is not None:  # a dropped assignment is not computed: its weight (0 in a layer) gets no gradient
        assert torch.all(g_fast[3][~keep] == 0)
        g_fast[3], g_ref[3] = g_fast[3] * keep, g_ref[3] * keep
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert fast.dtype == torch.float32
    if dtype == torch.bfloat16:
        assert (fast - ref).norm() / ref.norm() < 1e-2
    else:
        torch.testing.assert_close(fast, ref, **tol)
    for name, a, b in zip(("x", "gate_up", "down", "weights"), g_fast, g_ref, strict=True):
        if dtype == torch.bfloat16:  # relative error of the whole tensor, as bf16 rounding is per element
            err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
            assert err < 2e-2, (name, float(err))
        else:
            torch.testing.assert_close(a, b, **tol, msg=name)
    if case == "idle":  # experts nobody picked get exactly zero gradient
        idle = sorted(set(range(e)) - set(ids.reshape(-1).tolist()))
        assert idle and torch.all(g_fast[1][idle] == 0) and torch.all(g_fast[2][idle] == 0)


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 40),
    e=st.integers(1, 9),
    k=st.integers(1, 4),
    align=st.sampled_from([1, 4, 8]),
    drop=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_device_plan_invariants(t, e, k, align, drop, seed):
    k = min(k, e)
    ids, keep, _, _ = routing(t, e, k, seed, drop)
    plan = plan_on_device(ids, keep, e, align)
    n = t * k + e * (align - 1)
    kept = keep if keep is not None else torch.ones_like(ids, dtype=torch.bool)
    assert plan.src.shape == (n,) and plan.tok.shape == (n,) and plan.assignment.shape == (n,)
    offs = plan.offs.tolist()
    assert plan.offs.dtype == torch.int32 and offs == sorted(offs) and offs[-1] == n
    starts = [0] + offs[:-1]
    assert all(s % align == 0 for s in starts)  # every group starts aligned
    assert plan.pos.flatten().unique().numel() == t * k  # one row per assignment
    for ti in range(t):
        for j in range(k):
            row, ex = int(plan.pos[ti, j]), int(ids[ti, j])
            if kept[ti, j]:
                assert starts[ex] <= row < (offs[ex] if ex < e - 1 else offs[-1])  # inside its expert's group
                assert int(plan.assignment[row]) == ti * k + j and int(plan.tok[row]) == ti == int(plan.src[row])
            else:  # dropped: weight 0, adds to no token
                assert int(plan.assignment[row]) == t * k and int(plan.tok[row]) == t
    # kept rows per expert group equal the kept assignments per expert
    for ex in range(e):
        end = offs[ex] if ex < e - 1 else starts[ex] + ((ids == ex) & kept).sum()
        rows = plan.assignment[starts[ex] : int(end)]
        assert int((rows < t * k).sum()) == int(((ids == ex) & kept).sum())


def test_no_host_reads_on_the_grouped_mm_path(run_without_host_reads):
    """Routing -> dispatch -> experts -> combine, forward and backward, never reads a tensor on the host
    (on a GPU each such read would stall the stream)."""
    layer = MoELayer(
        16, MoEConfig(num_experts=4, top_k=2, expert_dim=8, expert_backend="grouped_mm", capacity_factor=1.0)
    )
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 9, 16, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    run_without_host_reads(layer, x, mask)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("router", [r for r in ROUTERS if r != "expert_choice"])
def test_every_router_bf16_layer_matches_reference(router):
    """The bf16 autocast path of a whole layer against the reference layer in bf16 (forward and grads)."""
    outs = []
    for backend in ("grouped_mm", "reference"):
        torch.manual_seed(0)
        layer = MoELayer(16, MoEConfig(num_experts=8, top_k=2, expert_dim=16, router=router, expert_backend=backend))
        for p in layer.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
        x = torch.randn(3, 10, 16, requires_grad=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = layer(x)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        outs.append((y.detach(), x.grad, layer.experts.gate_up.grad, layer.router.weight.grad))
    for a, b in zip(*outs, strict=True):
        err = (a - b).norm() / b.norm()
        assert err < 2e-2, float(err)


def test_compiled_layer_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    layer = MoELayer(32, MoEConfig(num_experts=4, top_k=2, expert_dim=16, expert_backend="grouped_mm"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 8, 32)
    compiled = torch.compile(layer, fullgraph=True)  # fullgraph: any graph break is an error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, _ = layer(x)
        y_comp, stats = compiled(x)
    y_comp.sum().backward()
    assert (y_comp - y_eager).norm() / y_eager.norm() < 2e-2
    assert layer.experts.gate_up.grad is not None and int(stats.tokens_per_expert.sum()) == 2 * 8 * 2


def test_auto_picks_by_device_and_dtype_and_explicit_choices_validate(gpu_capability):
    auto = build_expert_backend("auto", 16, 8)
    assert isinstance(auto, AutoBackend)
    assert backend_name(auto, "cpu", torch.bfloat16) == "cpu_buckets"
    assert backend_name(auto, "cuda", torch.bfloat16) == "grouped_mm"  # an sm90 GPU (the fixture)
    assert backend_name(auto, "cuda", torch.float32) == "cpu_buckets"  # grouped_mm's fast kernel is bf16
    assert backend_name(build_expert_backend("auto", 16, 12), "cuda", torch.bfloat16) == "cpu_buckets"  # widths
    gpu_capability((8, 0))  # an A100: torch's grouped matmul is a host-synced loop there
    assert backend_name(build_expert_backend("auto", 16, 8), "cuda", torch.bfloat16) == "cpu_buckets"
    with pytest.raises(ValueError, match="multiples of 8"):
        build_expert_backend("grouped_mm", 16, 12)
    with pytest.raises(ValueError, match="expected one of"):
        build_expert_backend("cutlass", 16, 8)


@pytest.mark.parametrize(
    "capability, version, fused",
    [
        ((9, 0), "2.8.0", True),  # H100 / H200
        ((10, 0), "2.11.0+cu130", True),  # B200 from torch 2.9
        ((10, 0), "2.8.0", False),  # torch 2.8's kernel is Hopper-only
        ((8, 0), "2.11.0", False),  # A100: a loop of matmuls after a host read
        ((8, 9), "2.11.0", False),  # consumer Ada
        ((12, 0), "2.11.0", False),  # consumer Blackwell
    ],
)
def test_fused_grouped_mm_by_capability_and_torch_version(capability, version, fused):
    from moelab.kernels.grouped_mm import fused_on

    assert fused_on(capability, version) is fused


def test_no_fused_grouped_mm_off_cuda():
    from moelab.kernels import fused_grouped_mm

    assert not fused_grouped_mm("cpu") and not fused_grouped_mm(torch.device("meta"))
