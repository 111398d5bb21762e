"""Running a model over held-out tokens and recording what every MoE layer's router did.

The held-out stream is cut into consecutive non-overlapping windows of the model's training length,
so each token is traced exactly once, with the context a window gives it. Each traced position keeps
its source file (from the per-source token offsets `moelab prepare` writes to meta.json), which is
what per-domain routing and I(source; expert) are computed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moelab.analysis.trace import LayerTrace, RoutingTrace
from moelab.errors import UserError


@dataclass
class HeldOut:
    tokens: torch.Tensor  # [N] int64 token ids in stream order
    domain_ids: torch.Tensor | None = None  # [N] index into `domains`
    domains: list[str] = field(default_factory=list)
    task_ids: torch.Tensor | None = None  # [N] multi-task models: each token's task (moelab/train/task_ids.py)


def span_ids(num_tokens: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """[N] index of the (start, end) token span (end exclusive) holding each of the first `num_tokens`
    stream positions. Positions no span covers are an error: the offsets must tile the stream."""
    ids = torch.full((num_tokens,), -1, dtype=torch.long)
    for i, (start, end) in enumerate(spans):
        ids[max(0, int(start)) : max(0, min(num_tokens, int(end)))] = i
    missing = int((ids < 0).sum())
    if missing:
        first = int(torch.nonzero(ids < 0)[0])
        raise UserError(
            f"meta.json: per-source token offsets do not cover token {first} ({missing} of {num_tokens} "
            "tokens belong to no source); re-run `moelab prepare`"
        )
    return ids


@torch.inference_mode()
def collect_routing(
    model, held: HeldOut, seq_len: int, batch_size: int = 8, device: str | torch.device = "cpu", progress=None
) -> RoutingTrace:
    """Trace every MoE layer of `model` (in eval mode) over floor(N / seq_len) windows of `held`."""
    moe = model.moe_layers
    if not moe:
        raise UserError(
            "the model has no MoE layers (model.moe.layers resolves to none); there is no routing to analyse"
        )
    n_win = held.tokens.numel() // seq_len
    if n_win < 1:
        raise UserError(f"held-out data has {held.tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    n = n_win * seq_len
    windows = held.tokens[:n].view(n_win, seq_len)  # [W, S]
    was_training = model.training
    model.eval()
    flags = {i: layer.record_stats for i, layer in moe.items()}
    for layer in moe.values():
        layer.record_stats = True
    ids: dict[int, list[torch.Tensor]] = {i: [] for i in moe}
    keeps: dict[int, list[torch.Tensor | None]] = {i: [] for i in moe}
    ent: dict[int, float] = dict.fromkeys(moe, 0.0)
    try:
        for b in range(0, n_win, batch_size):
            x = windows[b : b + batch_size].to(device)
            tasks = None
            if held.task_ids is not None and model.cfg.moe.num_tasks:
                tasks = held.task_ids[:n].view(n_win, seq_len)[b : b + batch_size].to(device)
            out = model(x, tasks=tasks)
            for i, st in out.routing.items():
                ids[i].append(st.topk_ids.cpu())
                keeps[i].append(st.keep.cpu() if st.keep is not None else None)
                ent[i] += float(st.entropy) * x.numel()
            if progress is not None:
                progress(min(n_win, b + batch_size) * seq_len, n)
    finally:
        for i, layer in moe.items():
            layer.record_stats = flags[i]
        model.train(was_training)
    layers = {}
    for i in moe:
        topk = torch.cat(ids[i])
        keep = None
        if any(k is not None for k in keeps[i]):
            keep = torch.cat(
                [
                    k if k is not None else torch.ones(t.shape, dtype=torch.bool)
                    for k, t in zip(keeps[i], ids[i], strict=False)
                ]
            )
        layers[i] = LayerTrace(topk, keep, ent[i] / n)
    first = next(iter(moe.values()))
    return RoutingTrace(
        token_ids=held.tokens[:n].clone(),
        num_experts=first.cfg.num_experts,
        top_k=int(layers[min(layers)].topk_ids.shape[1]),
        layers=layers,
        domain_ids=held.domain_ids[:n].clone() if held.domain_ids is not None else None,
        domain_names=list(held.domains),
        vocab_size=model.cfg.vocab_size,
        num_groups=first.cfg.num_groups if first.cfg.router == "hierarchical" else 1,
        task_ids=held.task_ids[:n].clone() if held.task_ids is not None and model.cfg.moe.num_tasks else None,
    )
