"""The `grouped_mm` backend on a GPU: the CUTLASS kernel against the oracle (bf16, empty and unaligned
groups), no host sync anywhere in a layer's forward and backward, and a compiled layer. Skipped without
CUDA; run with `pytest -m cuda tests/kernels/test_kernels_cuda.py`."""

import pytest
import torch

from moelab.config import MoEConfig
from moelab.kernels import GroupedMMBackend
from moelab.kernels.reference import reference_moe
from moelab.model.moe import MoELayer

pytestmark = pytest.mark.cuda
DEV = "cuda"


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("t, e, k, d, f", [(1000, 8, 2, 256, 512), (37, 64, 8, 128, 64), (5, 128, 2, 64, 32)])
def test_grouped_mm_on_cuda_equals_reference(align, t, e, k, d, f):
    g = torch.Generator(device=DEV).manual_seed(t + e)
    x = torch.randn(t, d, device=DEV, generator=g).bfloat16().requires_grad_(True)
    gate_up = (torch.randn(e, 2 * f, d, device=DEV, generator=g) * 0.05).bfloat16().requires_grad_(True)
    down = (torch.randn(e, d, f, device=DEV, generator=g) * 0.05).bfloat16().requires_grad_(True)
    ids = torch.rand(t, e, device=DEV, generator=g).topk(k, dim=-1).indices  # many experts idle when t is small
    w = torch.rand(t, k, device=DEV, generator=g).requires_grad_(True)
    grad = torch.randn(t, d, device=DEV, generator=g)
    out = GroupedMMBackend(align).moe(x, gate_up, down, ids, w)
    grads = torch.autograd.grad(out, (x, gate_up, down, w), grad)
    ref = reference_moe(x.float(), gate_up.float(), down.float(), ids, w)
    ref_grads = torch.autograd.grad(ref, (x, gate_up, down, w), grad)
    assert (out - ref).norm() / ref.norm() < 1e-2
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all() and (a.float() - b.float()).norm() / b.float().norm() < 2e-2


def test_layer_forward_and_backward_never_sync_with_the_host():
    torch.manual_seed(0)
    layer = MoELayer(256, MoEConfig(num_experts=16, top_k=4, expert_dim=128, capacity_factor=1.25)).to(DEV)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.05)
    x = torch.randn(4, 128, 256, device=DEV, requires_grad=True)
    mask = torch.ones(4, 128, dtype=torch.long, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x, mask)[0].sum().backward()  # warm-up: allocations, kernel choice
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, stats = layer(x, mask)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(stats.tokens_per_expert.sum()) <= 4 * 128 * 4


def test_compiled_layer_on_cuda_matches_eager():
    torch.manual_seed(0)
    layer = MoELayer(256, MoEConfig(num_experts=8, top_k=2, expert_dim=256)).to(DEV)
    for p in layer.parameters():  # (built with torch.empty: the model's init_weights is not run here)
        torch.nn.init.normal_(p, 0.0, 0.05)
    x = torch.randn(2, 256, 256, device=DEV)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, _ = layer(x)
        comp, _ = compiled(x)
    comp.sum().backward()
    assert (comp - eager).norm() / eager.norm() < 1e-2


@pytest.mark.parametrize("rank", [1, 3, 8, 16])
def test_grouped_mm_lora_on_cuda_small_ranks_equal_reference(rank):
    """LoRA deltas as grouped matmuls, bf16; ranks under 8 are padded on the device to 16-byte strides."""
    from moelab.kernels.lora import ExpertLoRA, merged_weights

    t, e, k, d, f = 300, 8, 2, 128, 64
    g = torch.Generator(device=DEV).manual_seed(rank)
    x = torch.randn(t, d, device=DEV, generator=g).bfloat16().requires_grad_(True)
    gate_up = (torch.randn(e, 2 * f, d, device=DEV, generator=g) * 0.05).bfloat16()
    down = (torch.randn(e, d, f, device=DEV, generator=g) * 0.05).bfloat16()
    shapes = ((e, rank, d), (e, 2 * f, rank), (e, rank, f), (e, d, rank))
    ab = [(torch.randn(*s, device=DEV, generator=g) * 0.2).bfloat16().requires_grad_(True) for s in shapes]
    ids = torch.rand(t, e, device=DEV, generator=g).topk(k, dim=-1).indices
    w = torch.rand(t, k, device=DEV, generator=g)
    grad = torch.randn(t, d, device=DEV, generator=g)
    out = GroupedMMBackend(1).moe(x, gate_up, down, ids, w, lora=ExpertLoRA(*ab, scale=2.0))
    grads = torch.autograd.grad(out, (x, *ab), grad)
    leaves = [x.float(), *(a.float() for a in ab)]
    gu, dn = merged_weights(gate_up.float(), down.float(), ExpertLoRA(*leaves[1:], scale=2.0))
    ref = reference_moe(leaves[0], gu, dn, ids, w)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    assert (out - ref).norm() / ref.norm() < 1e-2
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all() and (a.float() - b).norm() / b.norm() < 3e-2
