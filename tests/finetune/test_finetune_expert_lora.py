"""LoRA on the routed experts through every expert backend: forward and gradients (x, routing weights,
A and B) equal the plain per-expert LoRA formula of the reference backend; multi-adapter rows equal
running each adapter alone."""

import pytest
import torch

from moelab.kernels import CpuBucketsBackend, GroupedMMBackend, ReferenceBackend
from moelab.kernels.lora import ExpertLoRA, merged_weights
from moelab.kernels.reference import reference_moe

BACKENDS = {
    "reference": ReferenceBackend,
    "cpu_buckets": CpuBucketsBackend,
    "grouped_mm": lambda: GroupedMMBackend(1),
    "grouped_mm-align8": lambda: GroupedMMBackend(8),
}


def setup(t=29, e=6, k=2, d=16, f=24, r=4, seed=0, drop=False, stack=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    keep = torch.rand(t, k, generator=g) > 0.3 if drop else None
    w = torch.rand(t, k, generator=g) * (keep if keep is not None else 1)
    x = torch.randn(t, d, generator=g)
    gate_up, down = torch.randn(e, 2 * f, d, generator=g) * 0.3, torch.randn(e, d, f, generator=g) * 0.3
    lead = () if stack is None else (stack,)
    ab = [
        torch.randn(*lead, e, r, d, generator=g) * 0.3,
        torch.randn(*lead, e, 2 * f, r, generator=g) * 0.3,
        torch.randn(*lead, e, r, f, generator=g) * 0.3,
        torch.randn(*lead, e, d, r, generator=g) * 0.3,
    ]
    return ids, keep, w, x, gate_up, down, ab


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("drop", [False, True])
def test_expert_lora_forward_and_grads_equal_slow_formula(name, drop):
    ids, keep, w, x, gate_up, down, ab = setup(drop=drop, seed=3 + drop)
    grad_out = torch.randn(x.shape)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, *ab)]
        lora = ExpertLoRA(*leaves[2:], scale=0.5)
        out = fn(leaves[0], leaves[1], lora)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in leaves]

    backend = BACKENDS[name]()
    fast, g_fast = run(lambda xx, ww, lora: backend.moe(xx, gate_up, down, ids, ww, keep, lora=lora))

    def slow(xx, ww, lora):  # LoRA by its definition: the reference backend on merged weights
        gu, dn = merged_weights(gate_up, down, lora)
        return reference_moe(xx, gu, dn, ids, ww)

    ref, g_ref = run(slow)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(g_fast, g_ref, strict=True)):
        if i == 1 and keep is not None:  # dropped assignments' weights get no gradient from fast paths
            a, b = a * keep, b * keep
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"grad {i}")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_multi_adapter_rows_equal_each_adapter_alone(name):
    ids, keep, w, x, gate_up, down, ab = setup(t=12, stack=3, seed=5)
    token_adapter = torch.tensor([0, 1, 2, 1] * 3)
    backend = BACKENDS[name]()
    with torch.no_grad():
        lora = ExpertLoRA(*ab, scale=2.0, token_adapter=token_adapter)
        mixed = backend.moe(x, gate_up, down, ids, w, keep, lora=lora)
        for m in range(3):
            alone = reference_moe(x, gate_up, down, ids, w, ExpertLoRA(*(t[m] for t in ab), scale=2.0))
            rows = token_adapter == m
            torch.testing.assert_close(mixed[rows], alone[rows], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32():
    ids, keep, w, x, gate_up, down, ab = setup(seed=9)
    lora = ExpertLoRA(*ab, scale=0.5)
    ref = CpuBucketsBackend().moe(x, gate_up, down, ids, w, keep, lora=lora)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = CpuBucketsBackend().moe(x, gate_up, down, ids, w, keep, lora=lora)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.15, rtol=0.05)
