"""`analyze_run`: a run's newest checkpoint over held-out data -> RUN/report/analysis.json + report.html.

Held-out tokens are `TokenDataset` windows of the model's training length, spread evenly over the
split so every part of the corpus is represented when only some of it is traced. Each position's
source comes from meta.json's per-source token ranges; sources are grouped into at most MAX_DOMAINS
domains (see `group_sources`), which is what per-domain routing and I(domain; expert) use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moelab.analysis.collect import HeldOut, collect_routing, span_ids
from moelab.analysis.report import REPORT_DIR, write_report
from moelab.analysis.trace import summarise
from moelab.errors import UserError
from moelab.fileio import write_file_atomic

MAX_DOMAINS = 16
GROUPINGS = ("auto", "file", "dir", "input")


def _relative_names(paths: list[str]) -> list[str]:
    """Paths relative to their common directory (a lone file keeps its name)."""
    if len(paths) == 1:
        return [Path(paths[0]).name]
    root = os.path.commonpath([str(Path(p).parent) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def group_sources(sources: list[dict], split: str, grouping: str = "auto") -> list[tuple[str, int, int]]:
    """(domain, start, end) token spans of `split` from meta.json's `sources`, one per source, named by
    the domain it belongs to: its file (`file`), its directory (`dir`), or the input argument it came
    from (`input`). `auto` takes files when there are at most MAX_DOMAINS with tokens in the split, else
    directories. If more than MAX_DOMAINS domains remain, the largest MAX_DOMAINS - 1 keep their names
    and the rest become "(other)"."""
    if grouping not in GROUPINGS:
        raise UserError(f"--domains: expected one of {', '.join(GROUPINGS)}, got {grouping!r}")
    present = [s for s in sources if isinstance(s.get(split), dict) and s[split].get("tokens", 0) > 0]
    if not present:
        return []
    rel = _relative_names([s["path"] for s in present])
    if grouping == "auto":
        grouping = "file" if len(present) <= MAX_DOMAINS else "dir"
    if grouping == "file":
        names = rel
    elif grouping == "dir":
        names = [str(Path(r).parent) if str(Path(r).parent) != "." else "(top level)" for r in rel]
    else:
        names = [str(s.get("input", "?")) for s in present]
    sizes: dict[str, int] = {}
    for name, s in zip(names, present, strict=False):
        sizes[name] = sizes.get(name, 0) + s[split]["tokens"]
    if len(sizes) > MAX_DOMAINS:
        keep = set(sorted(sizes, key=lambda k: -sizes[k])[: MAX_DOMAINS - 1])
        names = [n if n in keep else "(other)" for n in names]
    return [
        (name, s[split]["offset"], s[split]["offset"] + s[split]["tokens"])
        for name, s in zip(names, present, strict=True)
    ]


def load_held_out(
    data_dir: str | Path, split: str, seq_len: int, max_tokens: int, grouping: str = "auto"
) -> tuple[HeldOut, object]:
    """Up to `max_tokens` tokens of `split` as evenly spaced windows of `seq_len`, with each position's
    domain. Returns (HeldOut, the TokenDataset)."""
    from moelab.data import TokenDataset

    if max_tokens < seq_len:
        raise UserError(f"--tokens: expected at least one window of seq_len={seq_len} tokens, got {max_tokens}")
    ds = TokenDataset(data_dir, split, seq_len)
    total = len(ds)
    n_win = max(1, min(max_tokens // seq_len, total // seq_len))
    starts = np.linspace(0, total - seq_len, n_win).astype(np.int64)  # evenly spread, non-overlapping
    idx = (starts[:, None] + np.arange(seq_len)).reshape(-1)
    tokens = torch.from_numpy(ds.tokens[idx].astype(np.int64))
    from moelab.train.task_ids import token_tasks

    tasks = torch.from_numpy(token_tasks(ds.meta, split, total)[idx])
    spans = group_sources(ds.meta.get("sources") or [], split, grouping)
    if not spans:
        return HeldOut(tokens, task_ids=tasks), ds
    span = span_ids(total, [(lo, hi) for _, lo, hi in spans])[torch.from_numpy(idx)]  # [N]
    domain_names = list(dict.fromkeys(name for name, _, _ in spans))  # one id per name, first-seen order
    span_domain = torch.tensor([domain_names.index(name) for name, _, _ in spans])
    return HeldOut(tokens, span_domain[span], domain_names, tasks), ds


def token_labeller(tok) -> Callable[[int], str]:
    """Readable text of one token id: SentencePiece pieces as they are (▁ = word start), byte ids as
    the character or <0xNN>, special tokens by name."""
    specials = {v: k for k, v in tok.special_tokens.items()}
    if hasattr(tok, "id_to_piece"):
        return lambda i: specials.get(i) or tok.id_to_piece(i)
    if tok.kind == "byte":
        return lambda i: specials.get(i) or (chr(i) if 32 <= i < 127 or i in (9, 10) else f"<0x{i:02X}>")
    return lambda i: tok.decode([i])


def _tokenizer(ckpt: Path, run_dir: Path, ds):
    """The checkpoint's tokenizer (checked against the data's), else the dataset's."""
    from moelab.tokenizer import Tokenizer

    for d in (ckpt / "tokenizer", run_dir / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            tok = Tokenizer.load(d)
            ds.check_tokenizer(tok)
            return tok
    return ds.load_tokenizer() if (ds.tokenizer_dir / "tokenizer.json").is_file() else None


def _device(name: str | torch.device) -> torch.device:
    from moelab.device import resolve_device, use_device

    dev = resolve_device(name, "--device")
    use_device(dev)
    return dev


def analyze_run(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    tokens: int = 65536,
    split: str = "val",
    batch_size: int = 8,
    top_n: int = 10,
    device: str = "auto",
    domains: str = "auto",
    progress=None,
) -> tuple[dict, Path]:
    """Trace the newest checkpoint of `run_dir` (or the checkpoint dir itself) over held-out data, write
    RUN/report/analysis.json and RUN/report/report.html (RUN: the run that holds a checkpoint named
    directly, see `owning_run`), and return (analysis, report path)."""
    from moelab.checkpoint import load_model

    run_dir = Path(run_dir)
    if tokens < 1:  # checked before the (possibly slow) model load; the seq_len check needs the config
        raise UserError(f"--tokens: expected a positive number of tokens, got {tokens}")
    if batch_size < 1:
        raise UserError(f"--batch-size: expected >= 1, got {batch_size}")
    if top_n < 1:
        raise UserError(f"--top-tokens: expected >= 1, got {top_n}")
    dev = _device(device)
    model, cfg, ckpt = load_model(run_dir, dev)
    if not cfg.model.moe_layer_ids():
        raise UserError(
            f"{ckpt / 'config.yaml'}: model.moe.layers={cfg.model.moe.layers!r} gives no MoE layers: a "
            "dense model has no routing to analyse (`moelab report` still plots its training curves)"
        )
    data_dir = data_dir or cfg.data.path
    if not data_dir:
        raise UserError(
            f"{ckpt / 'config.yaml'}: data.path is not set; pass --data DATA_DIR (a `moelab prepare` output)"
        )
    seq_len = cfg.data.seq_len
    held, ds = load_held_out(data_dir, split, seq_len, tokens, domains)
    ds.check_vocab(cfg.model.vocab_size)
    tok = _tokenizer(ckpt, run_dir, ds)
    trace = collect_routing(model, held, seq_len, batch_size, dev, progress)
    untrained = None
    if held.domain_ids is not None and len(held.domains) > 1:  # for scale: MI from token identity alone
        untrained = collect_routing(_untrained_twin(model, cfg, dev), held, seq_len, batch_size, dev)
    analysis = {
        "run": str(run_dir.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "data": str(Path(data_dir).resolve()),
        "split": split,
        "seq_len": seq_len,
        "router": cfg.model.moe.router,
        **summarise(trace, token_labeller(tok) if tok is not None else None, top_n, untrained=untrained),
    }
    owner = owning_run(ckpt, run_dir)
    out = owner / REPORT_DIR
    write_file_atomic(out / "analysis.json", json.dumps(analysis, indent=1).encode("utf-8"))
    return analysis, write_report(owner, analysis)


def _untrained_twin(model, cfg, dev):
    """The same architecture freshly initialised with the run's seed (what training started from), in the
    trained model's dtype."""
    from moelab.model import Transformer

    torch.manual_seed(cfg.train.seed)
    dtype = next(model.parameters()).dtype
    return Transformer(cfg.model).to(device=dev, dtype=dtype).eval()


def owning_run(ckpt: Path, given: Path) -> Path:
    """Where the report goes: the run that holds the checkpoint when one was named directly
    (RUN/checkpoints/step_N), so the report sits beside the run's metrics and is not deleted with the
    checkpoint when training prunes it; else the directory given."""
    ckpt = Path(ckpt).resolve()
    named_checkpoint = Path(given).resolve() == ckpt  # also RUN/checkpoints/best, a link to one
    if named_checkpoint and ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / "config.yaml").is_file():
        return ckpt.parent.parent
    return Path(given)
