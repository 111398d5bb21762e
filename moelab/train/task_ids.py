"""Task ids for multi-task routing (`moe.num_tasks`): each token's task is the `moelab prepare --input`
its source came from (the per-source token ranges in meta.json), numbered in first-seen order. A
dataset source gets `tasks(device)`: the task ids [B, S] of the windows its last batch cut."""

from __future__ import annotations

import numpy as np
import torch

from moelab.errors import UserError


def task_names(meta: dict) -> list[str]:
    return list(dict.fromkeys(str(s.get("input", "?")) for s in meta.get("sources") or []))


def token_tasks(meta: dict, split: str, num_tokens: int) -> np.ndarray:
    """[N] int64 task id of every token of `split` (0 where no source range covers it)."""
    names = task_names(meta)
    out = np.zeros(num_tokens, dtype=np.int64)
    for s in meta.get("sources") or []:
        r = s.get(split)
        if isinstance(r, dict) and r.get("tokens", 0) > 0:
            out[r["offset"] : r["offset"] + r["tokens"]] = names.index(str(s.get("input", "?")))
    return out


def attach_tasks(source, num_tasks: int) -> None:
    """Wrap a `DatasetSource`'s datasets so each batch's task ids are kept (`source.tasks(device)`)."""
    meta = source.train.meta
    n = len(task_names(meta))
    if n > num_tasks:
        raise UserError(f"model.moe.num_tasks: the dataset has {n} inputs (tasks) but num_tasks={num_tasks}")
    last: dict = {}
    for split, ds in (("train", source.train), ("val", source.val)):
        if ds is None:
            continue
        tasks = token_tasks(meta, split, len(ds.tokens))
        cut = ds._windows

        def windows(starts, cut=cut, tasks=tasks, ds=ds):
            last["ids"] = torch.from_numpy(tasks[np.asarray(starts)[:, None] + np.arange(ds.seq_len)])
            return cut(starts)

        ds._windows = windows
    source.tasks = lambda device: last["ids"].to(device)
