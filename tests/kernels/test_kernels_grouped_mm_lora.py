"""LoRA on the `grouped_mm` backend (the split gate/up form with the deltas as more grouped matmuls)
against the reference: every small rank (torch._grouped_mm wants 16-byte strides, so ranks 1-3 are
padded on the device), fp32 and bf16, forward and gradients; whole layers for every router and
capacity mode; a frozen base gets no gradient; no host reads; LoRA dropout's hand-written backward."""

import pytest
import torch

from moelab.config import ROUTERS, MoEConfig
from moelab.finetune.lora import ExpertLoRA as ExpertLoRAModule
from moelab.kernels import GroupedMMBackend
from moelab.kernels.lora import ExpertLoRA, merged_weights
from moelab.kernels.reference import reference_moe
from moelab.model.moe import MoELayer


def problem(r, drop, t=29, e=6, k=2, d=16, f=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    keep = torch.rand(t, k, generator=g) > 0.3 if drop else None
    w = torch.rand(t, k, generator=g) * (keep if keep is not None else 1)
    x = torch.randn(t, d, generator=g)
    base = [torch.randn(e, 2 * f, d, generator=g) * 0.3, torch.randn(e, d, f, generator=g) * 0.3]
    ab = [torch.randn(*s, generator=g) * 0.3 for s in ((e, r, d), (e, 2 * f, r), (e, r, f), (e, d, r))]
    return ids, keep, w, x, base, ab


def run(fn, tensors, grad_out):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach().float(), [t.grad.float() for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 2, 3, 8])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("align", [1, 8])
def test_small_ranks_equal_reference_forward_and_grads(dtype, rank, drop, align):
    ids, keep, w, x, base, ab = problem(rank, drop, seed=rank + 10 * drop)
    grad_out = torch.randn(x.shape)
    backend = GroupedMMBackend(align)

    def fast(xx, ww, gu, dn, *lo):
        return backend.moe(xx, gu, dn, ids, ww, keep, lora=ExpertLoRA(*lo, scale=0.5))

    def slow(xx, ww, gu, dn, *lo):  # LoRA by its definition, in fp32: the reference on merged weights
        gu, dn = merged_weights(gu, dn, ExpertLoRA(*lo, scale=0.5))
        return reference_moe(xx, gu, dn, ids, ww)

    inputs = [x, w, *base, *ab]
    got, g_got = run(fast, [t.to(dtype) if t is not w else t for t in inputs], grad_out)
    want, g_want = run(slow, [t.to(dtype).float() if t is not w else t for t in inputs], grad_out)
    names = ["x", "weights", "gate_up", "down", "gu_a", "gu_b", "dn_a", "dn_b"]
    if keep is not None:  # a dropped assignment is not computed: its weight gets no gradient
        g_got[1], g_want[1] = g_got[1] * keep, g_want[1] * keep
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for name, a, b in zip(names, g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    else:  # bf16 rounds every product: relative error of whole tensors
        assert (got - want).norm() / want.norm() < 2e-2
        for name, a, b in zip(names, g_got, g_want, strict=True):
            assert (a - b).norm() / b.norm().clamp_min(1e-6) < 3e-2, name


def layer_with_lora(router, capacity, backend, rank=3):
    cfg = MoEConfig(
        num_experts=8,
        top_k=2,
        expert_dim=16,
        router=router,
        capacity_factor=1.0 if router == "expert_choice" else capacity,
        expert_backend=backend,
    )
    torch.manual_seed(0)
    layer = MoELayer(16, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    layer.experts.lora = ExpertLoRAModule(8, 16, 16, rank, alpha=6.0, dropout=0.0)
    for p in layer.experts.lora.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)  # B = 0 at init would hide the B-side products
    return layer


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_every_router_and_capacity_layer_with_lora_matches_reference(router, capacity):
    outs = []
    for backend in ("grouped_mm", "reference"):
        layer = layer_with_lora(router, capacity, backend)
        layer.experts.gate_up.requires_grad_(False)  # as in a LoRA run: base frozen
        layer.experts.down.requires_grad_(False)
        x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, :4] = 0  # padding tokens take no expert slot
        torch.manual_seed(1)  # noisy and gumbel routers draw noise
        y, _ = layer(x, mask)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        lo = layer.experts.lora
        assert layer.experts.gate_up.grad is None and layer.experts.down.grad is None
        outs.append(
            (y.detach(), x.grad, layer.router.weight.grad, lo.gu_a.grad, lo.gu_b.grad, lo.dn_a.grad, lo.dn_b.grad)
        )
    for name, a, b in zip(("y", "x", "router", "gu_a", "gu_b", "dn_a", "dn_b"), *outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_no_host_reads_with_lora(run_without_host_reads):
    """LoRA (with a padded rank and dropout) keeps the grouped_mm path free of host reads."""
    layer = layer_with_lora("softmax_topk", 1.0, "grouped_mm", rank=3)
    layer.experts.lora.dropout = 0.1
    x = torch.randn(2, 9, 16, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    run_without_host_reads(layer, x, mask)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.experts.lora.dn_a.grad).all()


def test_lora_dropout_backward_matches_its_forward():
    """The activations' dropout mask lives inside the hand-written function. The output is linear in the
    down LoRA's A and B, so a central difference (same seed, same masks) is their exact gradient."""
    ids, keep, w, x, base, ab = problem(3, drop=True, seed=4)
    backend = GroupedMMBackend(1)
    grad_out = torch.randn(x.shape)

    def f(dn_a, dn_b):
        torch.manual_seed(7)
        lora = ExpertLoRA(ab[0], ab[1], dn_a, dn_b, scale=0.5, dropout=0.3)
        return (backend.moe(x, *base, ids, w, keep, lora=lora) * grad_out).sum()

    leaves = [ab[2].clone().requires_grad_(True), ab[3].clone().requires_grad_(True)]
    f(*leaves).backward()
    with torch.no_grad():
        plain = backend.moe(x, *base, ids, w, keep, lora=ExpertLoRA(*ab, scale=0.5))
        assert torch.equal(backend.moe(x, *base, ids, w, keep, lora=ExpertLoRA(*ab, scale=0.5, dropout=0.3)), plain)
    for i, leaf in enumerate(leaves):
        v = torch.randn(leaf.shape, generator=torch.Generator().manual_seed(i))
        args = [t.detach() for t in leaves]
        hi, lo = list(args), list(args)
        hi[i], lo[i] = args[i] + v, args[i] - v
        with torch.enable_grad():
            fd = (f(*hi) - f(*lo)) / 2
        assert float(fd) == pytest.approx(float((leaf.grad * v).sum()), rel=1e-3, abs=1e-3)
    with torch.enable_grad():
        torch.manual_seed(0)
        dropped = backend.moe(x, *base, ids, w, keep, lora=ExpertLoRA(*ab, scale=0.5, dropout=0.3))
    assert not torch.allclose(dropped, plain)  # dropout did act while training


@pytest.mark.slow  # ~45 s of inductor compilation on the 2-core CI machine
def test_compiled_layer_with_lora_has_no_graph_break_and_matches_eager():
    """A tensor passed twice to the Function (x as the adapters' input without dropout) broke the graph."""
    grads = []
    for compile_ in (False, True):
        layer = layer_with_lora("softmax_topk", None, "grouped_mm", rank=3)
        layer.experts.gate_up.requires_grad_(False)
        layer.experts.down.requires_grad_(False)
        run = torch.compile(layer, fullgraph=True) if compile_ else layer  # fullgraph: a graph break is an error
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = run(x)
        y.float().sum().backward()
        grads.append([y.detach().float()] + [p.grad.float() for p in layer.experts.lora.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a - b).norm() / b.norm() < 2e-2
