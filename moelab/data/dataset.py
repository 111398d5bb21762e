"""Training windows over a prepared dataset, memory-mapped so the corpus never has to fit in RAM.

A batch is `batch_size` windows of seq_len + 1 tokens: x = window[:-1], y = window[1:].
- Random mode (`stride=None`): window starts drawn uniformly. Batch i uses the generator seeded with
  (seed, i), so the state is one counter and a restored sampler yields the same batches.
- Stride mode (`stride=S`): the windows starting at 0, S, 2S, ... (overlapping when S < seq_len), each
  visited once per epoch in a seeded order. The order is the affine permutation i -> (a i + b) mod W with
  a coprime to W, drawn per epoch: O(1) memory whatever the number of windows W, and consecutive windows
  of a batch land far apart in the corpus. The state is (epoch, position).
- Validation (`iter_val`): the non-overlapping windows at 0, seq_len, 2 seq_len, ..., in order; with
  `spread`, a cap of max_batches takes windows evenly spaced over the whole split instead of its start
  (a split is stored source by source, so its first windows can miss whole domains).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moelab.data.preparation import FORMAT, META_FILE, SPLITS
from moelab.errors import UserError
from moelab.fileio import read_json
from moelab.tokenizer import Tokenizer

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared dataset, checked field by field (one UserError line on the first problem):
    everything training and analysis read from it, including that the per-source token ranges tile each
    split exactly."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"{data_dir}: expected a dataset directory written by `moelab prepare`, got "
            f"{'a file' if data_dir.exists() else 'nothing (no such directory)'}"
        )
    path = data_dir / META_FILE
    meta = read_json(path, "dataset metadata")

    def bad(field: str, expected: str, got) -> UserError:
        return UserError(f"{path}: {field}: expected {expected}, got {got!r}")

    if meta.get("format") != FORMAT:
        raise bad("format", str(FORMAT), meta.get("format"))
    if meta.get("dtype") not in DTYPES:
        raise bad("dtype", " or ".join(DTYPES), meta.get("dtype"))
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict):
        raise bad("tokenizer", "an object", tok)
    if not isinstance(tok.get("fingerprint"), str):
        raise bad("tokenizer.fingerprint", "a string", tok.get("fingerprint"))
    if not _count(tok.get("vocab_size")) or tok["vocab_size"] < 1:
        raise bad("tokenizer.vocab_size", "a positive integer", tok.get("vocab_size"))
    if tok["vocab_size"] > np.iinfo(DTYPES[meta["dtype"]]).max + 1:
        raise bad(
            "tokenizer.vocab_size",
            f"<= {np.iinfo(DTYPES[meta['dtype']]).max + 1} for dtype {meta['dtype']}",
            tok["vocab_size"],
        )
    tok_dir = tok.get("dir", "tokenizer")
    if not isinstance(tok_dir, str) or not tok_dir or "/" in tok_dir or "\\" in tok_dir or tok_dir.startswith("."):
        raise bad("tokenizer.dir", "a directory name inside the dataset", tok_dir)
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise bad("splits", "an object", splits)
    for name in SPLITS:
        s = splits.get(name)
        if not isinstance(s, dict):
            raise bad(f"splits.{name}", "an object", s)
        if not _count(s.get("tokens")):
            raise bad(f"splits.{name}.tokens", "a count >= 0", s.get("tokens"))
        if not isinstance(s.get("file"), str) or not s["file"] or "/" in s["file"] or s["file"].startswith("."):
            raise bad(f"splits.{name}.file", "a file name", s.get("file"))
        bpt = s.get("bytes_per_token")
        if not (bpt is None and s["tokens"] == 0) and not (
            isinstance(bpt, (int, float)) and not isinstance(bpt, bool) and 0 < bpt < float("inf")
        ):
            raise bad(
                f"splits.{name}.bytes_per_token", "a positive number" + (" or null" if not s["tokens"] else ""), bpt
            )
    _check_sources(meta, path, bad)
    return meta


def _check_sources(meta: dict, path: Path, bad) -> None:
    """Each split's tokens are the sources' ranges laid end to end, in order (what analysis groups by)."""
    sources = meta.get("sources")
    if not isinstance(sources, list):
        raise bad("sources", "a list of source files", sources)
    ends = dict.fromkeys(SPLITS, 0)
    for i, src in enumerate(sources):
        if not isinstance(src, dict):
            raise bad(f"sources[{i}]", "an object", src)
        if not isinstance(src.get("path"), str):
            raise bad(f"sources[{i}].path", "a string", src.get("path"))
        for name in SPLITS:
            r = src.get(name)
            if not isinstance(r, dict):
                raise bad(f"sources[{i}].{name}", "an object", r)
            for key in ("offset", "tokens"):
                if not _count(r.get(key)):
                    raise bad(f"sources[{i}].{name}.{key}", "a count >= 0", r.get(key))
            if r["offset"] != ends[name]:
                raise bad(f"sources[{i}].{name}.offset", f"{ends[name]} (where the previous source ends)", r["offset"])
            ends[name] += r["tokens"]
    for name in SPLITS:
        total = meta["splits"][name]["tokens"]
        if sources and ends[name] != total:
            raise UserError(
                f"{path}: sources: expected {name} ranges adding up to splits.{name}.tokens = {total}, got {ends[name]}"
            )


class TokenDataset:
    """One split of a prepared dataset: `get_batch` for training, `iter_val` for evaluation."""

    def __init__(
        self, data_dir: str | Path, split: str = "train", seq_len: int = 256, stride: int | None = None, seed: int = 0
    ):
        self.dir = Path(data_dir)
        if split not in SPLITS:
            raise UserError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        if seq_len < 1:
            raise UserError(f"data.seq_len: expected >= 1, got {seq_len}")
        if stride is not None and stride < 1:
            raise UserError(f"data.stride: expected >= 1 or null, got {stride}")
        self.meta = load_meta(self.dir)
        self.split, self.seq_len, self.stride, self.seed = split, seq_len, stride, int(seed)
        info = self.meta["splits"][split]
        dtype = np.dtype(DTYPES[self.meta["dtype"]])
        path = self.dir / info["file"]
        n = info["tokens"]
        size = path.stat().st_size if path.is_file() else None
        if size != n * dtype.itemsize:
            got = "no file" if size is None else f"{size} bytes"
            raise UserError(
                f"{path}: expected {n} {dtype.name} tokens ({n * dtype.itemsize} bytes) as recorded in "
                f"{META_FILE}, got {got}: the dataset is incomplete or was modified"
            )
        if n < seq_len + 1:
            raise UserError(
                f"{path}: expected at least seq_len + 1 = {seq_len + 1} tokens, got {n}: lower data.seq_len or add text"
            )
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        self._batches, self._drawn = 0, 0  # batches and windows drawn so far
        self._epoch, self._position = 0, 0  # stride mode
        self._order = None  # (epoch, a, b) of the cached permutation

    @classmethod
    def from_config(cls, data_cfg, split: str = "train", seed: int = 0) -> TokenDataset:
        """From a `DataConfig` (path, seq_len, stride)."""
        if not data_cfg.path:
            raise UserError("data.path: expected a directory written by `moelab prepare`, got null")
        return cls(data_cfg.path, split, data_cfg.seq_len, data_cfg.stride, seed)

    # --- identity -------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.dir / self.meta["tokenizer"].get("dir", "tokenizer")

    def load_tokenizer(self) -> Tokenizer:
        tok = Tokenizer.load(self.tokenizer_dir)
        self.check_tokenizer(tok)
        return tok

    def check_tokenizer(self, tokenizer: Tokenizer | str) -> None:
        """Refuse a tokenizer (or a fingerprint, e.g. from a checkpoint) other than the one that made the data."""
        fp = tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint
        if fp != self.fingerprint:
            t = self.meta["tokenizer"]
            what = "" if isinstance(tokenizer, str) else f" ({tokenizer.kind}, vocab {tokenizer.vocab_size})"
            raise UserError(
                f"{self.dir}: tokenizer mismatch: the data was prepared with tokenizer "
                f"{self.fingerprint[:12]} ({t.get('kind')}, vocab {t['vocab_size']}), got {fp[:12]}{what}; "
                "train with the dataset's tokenizer or re-run `moelab prepare` with this one"
            )

    def check_vocab(self, model_vocab_size: int) -> None:
        if model_vocab_size < self.vocab_size:
            raise UserError(
                f"model.vocab_size: expected >= {self.vocab_size} (the tokenizer of {self.dir}), got {model_vocab_size}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_windows(self) -> int:
        """Windows per epoch in stride mode; distinct start positions in random mode."""
        last = len(self.tokens) - self.seq_len - 1  # largest start
        return last // self.stride + 1 if self.stride else last + 1

    # --- batches --------------------------------------------------------------------------------------
    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)
        w = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def _permutation(self, epoch: int) -> tuple[int, int]:
        if self._order is None or self._order[0] != epoch:
            n = self.num_windows
            rng = np.random.default_rng([self.seed, epoch])
            a = int(rng.integers(1, max(n, 2)))
            while math.gcd(a, n) != 1:
                a = a % n + 1
            self._order = (epoch, a, int(rng.integers(0, n)))
        return self._order[1], self._order[2]

    def get_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 tensors of shape [batch_size, seq_len] on the CPU, y = x shifted by one token."""
        if batch_size < 1:
            raise UserError(f"batch_size: expected >= 1, got {batch_size}")
        if not self.stride:
            rng = np.random.default_rng([self.seed, self._batches])
            self._batches, self._drawn = self._batches + 1, self._drawn + batch_size
            return self._windows(rng.integers(0, self.num_windows, size=batch_size, dtype=np.int64))
        n, parts, need = self.num_windows, [], batch_size
        while need:
            take = min(need, n - self._position)
            a, b = self._permutation(self._epoch)
            i = np.arange(self._position, self._position + take, dtype=np.int64)
            parts.append((a * i + b) % n * self.stride)  # a, i < 2^63 / n: no overflow below ~3e9 windows
            self._position += take
            need -= take
            if self._position == n:
                self._epoch, self._position = self._epoch + 1, 0
        self._batches, self._drawn = self._batches + 1, self._drawn + batch_size
        return self._windows(np.concatenate(parts))

    @property
    def epoch(self) -> float:
        """Epochs so far, fractional: windows visited / windows per epoch in stride mode; in random mode,
        tokens drawn / tokens in the split (the same amount of text, not the same coverage)."""
        if self.stride:
            return self._epoch + self._position / self.num_windows
        return self._drawn * self.seq_len / len(self.tokens)

    def iter_val(
        self, batch_size: int, max_batches: int | None = None, spread: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in order (every token is predicted at most once); the last batch may be
        smaller. Stops after `max_batches` when given, or with `spread` takes max_batches * batch_size
        windows evenly spaced over the split (the same ones every call)."""
        if batch_size < 1:
            raise UserError(f"batch_size: expected >= 1, got {batch_size}")
        starts = np.arange(0, len(self.tokens) - self.seq_len, self.seq_len, dtype=np.int64)
        if spread and max_batches is not None and max_batches * batch_size < len(starts):
            pick = np.linspace(0, len(starts) - 1, max(1, max_batches * batch_size)).round().astype(np.int64)
            starts = starts[np.unique(pick)]
        for j, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and j >= max_batches:
                return
            yield self._windows(starts[i : i + batch_size])

    def num_val_windows(self) -> int:
        return len(range(0, len(self.tokens) - self.seq_len, self.seq_len))

    # --- exact resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-ready sampler state; `load_state_dict` on a dataset built with the same arguments resumes
        the exact batch sequence."""
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "stride": self.stride,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "tokens": len(self.tokens),
            "batches": self._batches,
            "windows": self._drawn,
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seq_len", "stride", "seed", "fingerprint", "tokens"):
            if state.get(key) != self.state_dict()[key]:
                raise UserError(
                    f"data sampler state: {key}: expected {self.state_dict()[key]!r} (this dataset), "
                    f"got {state.get(key)!r}: the data or its settings changed since the checkpoint"
                )
        try:
            counters = [int(state[k]) for k in ("batches", "windows", "epoch", "position")]
        except (KeyError, TypeError, ValueError):
            raise UserError(
                "data sampler state: expected integer batches, windows, epoch and position, got "
                f"{ {k: state.get(k) for k in ('batches', 'windows', 'epoch', 'position')} }"
            ) from None
        self._batches, self._drawn, self._epoch, self._position = counters
