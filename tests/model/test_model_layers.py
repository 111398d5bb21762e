"""Building blocks on their low-precision branches: RMSNorm on bf16 / fp16 input against the fp32 formula."""

import pytest
import torch

from moelab.model.layers import RMSNorm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_low_precision_branch_matches_fp32_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (torch.randn(5, 7, 64) * 3).to(dtype)
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).float()
    out = norm(x)
    assert out.dtype == torch.float32  # weight (fp32) * normalised x: the module's documented output
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same ops: normalise in fp32, round, then scale
    # and within the low precision's rounding of the plain fp32 computation
    exact = norm.weight * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert ((out - exact).norm() / exact.norm()) < tol
