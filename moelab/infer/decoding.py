"""Getting a built model ready for decoding, from outside the model code.

- `decoding(model, num_experts_per_tok)`: eval mode, no routing statistics (a decode step never
  reads them), and optionally fewer (or more) routed experts per token than the model was trained
  with -- quality traded for speed. Restores everything on exit.
- `decode_layout(model)`: on CPU, stores every weight matrix input-major (the transpose is made
  contiguous and the parameter becomes its transposed view, so values, shapes and names are
  unchanged). Decoding is a chain of matrix-vector products whose weights stream from DRAM; MKL's
  kernel streams [in, out] weights at about twice the bandwidth of [out, in] ones (measured here:
  15 vs 7 GB/s), and prefill-sized matmuls run at the same speed either way.
"""

from __future__ import annotations

import contextlib

import torch

from moelab.errors import UserError


def check_experts_per_tok(model, k: int | None) -> None:
    if k is None:
        return
    moe = model.moe_layers
    if not moe:
        raise UserError(f"num_experts_per_tok: the model has no MoE layers, got {k}")
    e = min(layer.cfg.num_experts for layer in moe.values())
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= e:
        raise UserError(f"num_experts_per_tok: expected an integer in [1, {e}] (the number of experts), got {k!r}")


def enter_decoding(model, num_experts_per_tok: int | None = None):
    """Apply the decoding settings; returns a function that undoes them."""
    check_experts_per_tok(model, num_experts_per_tok)
    was_training = model.training
    saved = [(layer, layer.record_stats, layer.router.top_k) for layer in model.moe_layers.values()]
    model.eval()
    for layer, _, _ in saved:
        layer.record_stats = False
        if num_experts_per_tok is not None:
            layer.router.top_k = num_experts_per_tok

    def restore() -> None:
        for layer, stats, top_k in saved:
            layer.record_stats, layer.router.top_k = stats, top_k
        model.train(was_training)

    return restore


@contextlib.contextmanager
def decoding(model, num_experts_per_tok: int | None = None):
    restore = enter_decoding(model, num_experts_per_tok)
    try:
        yield model
    finally:
        restore()


@torch.no_grad()
def decode_layout(model) -> int:
    """Re-lay out weight matrices input-major on CPU (see the module doc). Returns how many changed."""
    changed = 0
    for name, p in model.named_parameters():
        if p.device.type != "cpu" or name == "embed.weight" and not model.cfg.tie_embeddings:
            continue  # other devices' matmuls do not care; an untied embedding is only gathered from
        if p.dim() == 2 and p.shape[0] > 1 and p.stride(-1) == 1:
            p.data = p.data.t().contiguous().t()
            changed += 1
        elif p.dim() == 3 and p.stride(-1) == 1:  # stacked experts [E, out, in]
            p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
            changed += 1
    return changed
