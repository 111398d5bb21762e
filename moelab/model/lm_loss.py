"""The LM head and its cross-entropy in one pass over row chunks, never holding [T, V] fp32 logits.

`linear_cross_entropy(h, weight, targets)` equals
`F.cross_entropy((h @ weight.T).float(), targets, ignore_index=-100)` (mean over targets that are not
-100), with the matmul in the autocast dtype when autocast is on, as `nn.Linear` would run it.

Why: the unfused path materialises the logits, an fp32 copy, log-softmax's output and, in backward, a
zero-filled gradient and log-softmax's gradient, each [T, V] fp32; at vocab 8192 that was ~150 ms
of a 600 ms training step here, more than the LM head's matmuls. Here each chunk's logits are
softmaxed while they are still in cache and only the gradient of the logits is kept ([T, V] in the
matmul dtype); backward is then two large matmuls (dh = G W, dW = G^T h).
"""

from __future__ import annotations

import torch

from moelab.kernels.common import compute_dtype

IGNORE_INDEX = -100
CHUNK_BYTES = 4 << 20  # fp32 logits per chunk (a few MB: measured best here, 1-8 MB tried)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype: torch.dtype, need_grad: bool):
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            n, v = hc.shape[0], wc.shape[0]
            valid = targets != IGNORE_INDEX
            count = valid.sum()
            tgt = torch.where(valid, targets, 0)
            rows = max(1, CHUNK_BYTES // (4 * v))
            grad = torch.empty(n, v, dtype=dtype, device=h.device) if need_grad else None
            nll = torch.zeros((), dtype=torch.float32, device=h.device)
            scale = valid / count.clamp_min(1)  # [N] d mean / d row loss; 0 on ignored rows
            for i in range(0, n, rows):
                j = min(n, i + rows)
                z = (hc[i:j] @ wc.t()).float()  # [c, V]
                zt = z.gather(1, tgt[i:j, None]).squeeze(1)
                if not need_grad:
                    nll += ((torch.logsumexp(z, dim=-1) - zt) * valid[i:j]).sum()
                    continue
                # one exp pass gives both the loss and d loss / d z = (softmax(z) - onehot) * scale
                m = z.amax(dim=-1)
                e = z.sub_(m[:, None]).exp_()
                total = e.sum(dim=-1)
                nll += ((m + total.log() - zt) * valid[i:j]).sum()
                e.mul_((scale[i:j] / total)[:, None])
                e.scatter_add_(1, tgt[i:j, None], -scale[i:j, None])
                assert grad is not None  # (need_grad)
                grad[i:j] = e
            ctx.save_for_backward(hc, wc, grad)
            ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
            return nll / count  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, g):
        hc, wc, grad = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("linear_cross_entropy was called without need_grad")
        with torch.autocast(g.device.type, enabled=False):
            gs = g.to(grad.dtype)
            dh = (grad @ wc).mul_(gs).to(ctx.h_dtype) if ctx.needs_input_grad[0] else None
            dw = (grad.t() @ hc).mul_(gs).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h [N, D], weight [V, D], targets [N] (IGNORE_INDEX = no loss) -> mean cross-entropy (fp32 scalar)."""
    dtype = compute_dtype(h)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, dtype, need_grad)
