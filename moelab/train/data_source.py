"""Where the trainer's batches come from: a prepared dataset (`moelab prepare`) or tokens in memory.

Both give the trainer the same small surface: `train_batch(device)`, `val_batches(batch_size, n,
device)`, `state_dict()` / `load_state_dict()` (the sampler position, for exact resume), `vocab_size`,
`fingerprint` (of the tokenizer), `bytes_per_token` (for bits per byte) and `copy_tokenizer(dst)`.
A source may add `target_bytes(y)`: the text bytes a batch of targets covers, so bits per byte divides
by the bytes actually evaluated rather than the split's average (domains differ by 4x in bytes/token).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from moelab.config import Config
from moelab.device import to_device
from moelab.errors import UserError
from moelab.fileio import write_dir_atomic


class InMemorySource:
    """Random windows of a token tensor (benchmarks, synthetic data). The window sampler is a seeded
    torch.Generator, so its state is one tensor."""

    def __init__(
        self,
        train_tokens: torch.Tensor,
        val_tokens: torch.Tensor,
        seq_len: int,
        batch_size: int,
        vocab_size: int,
        seed: int = 0,
        bytes_per_token: float = 1.0,
    ):
        if train_tokens.numel() <= seq_len + 1 or val_tokens.numel() <= seq_len + 1:
            raise UserError(f"in-memory data: need more than seq_len + 1 = {seq_len + 1} tokens per split")
        self.train, self.val = train_tokens.long(), val_tokens.long()
        self.seq_len, self.batch_size = seq_len, batch_size
        self.vocab_size, self.bytes_per_token = vocab_size, bytes_per_token
        self.gen = torch.Generator().manual_seed(seed)
        h = hashlib.sha256(f"in-memory:{vocab_size}".encode()).hexdigest()[:16]
        self.fingerprint = h

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None]
        w = tokens[idx]
        return w[:, :-1], w[:, 1:]

    def train_batch(self, device: torch.device):
        starts = torch.randint(0, self.train.numel() - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        x, y = self._windows(self.train, starts)
        return to_device(x, device), to_device(y, device)

    def val_batches(self, batch_size: int, n: int, device: torch.device):
        stride = self.seq_len
        count = (self.val.numel() - 1) // stride
        for b in range(min(n, max(1, count // batch_size))):
            starts = torch.arange(b * batch_size, (b + 1) * batch_size) % count * stride
            x, y = self._windows(self.val, starts)
            yield to_device(x, device), to_device(y, device)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

    def copy_tokenizer(self, dst: Path) -> None:
        pass  # no tokenizer: token ids only

    def check_token_ids(self, model_vocab: int) -> None:
        top = int(max(self.train.max(), self.val.max()))
        if top >= model_vocab:
            raise UserError(
                f"in-memory data: token id {top} is outside the model's vocabulary (model.vocab_size {model_vocab})"
            )

    def check_tokenizer_dir(self, tokenizer_dir: Path, what: str) -> None:
        pass


class DatasetSource:
    """A prepared dataset: random (or strided) training windows from the train split, the first
    `eval.batches` non-overlapping windows of the val split for validation."""

    def __init__(self, cfg: Config):
        from moelab.data import TokenDataset

        self.train = TokenDataset.from_config(cfg.data, "train", seed=cfg.train.seed)
        self.batch_size = cfg.train.batch_size
        self.tokenizer_dir = self.train.tokenizer_dir
        tok = self.train.load_tokenizer()  # the dataset's own tokenizer must be the one that made its tokens
        val_info = self.train.meta["splits"]["val"]
        self.val = None
        if val_info["tokens"] > cfg.data.seq_len + 1:
            self.val = TokenDataset(cfg.data.path, "val", cfg.data.seq_len)
        self.bytes_per_token = val_info.get("bytes_per_token") or self.train.meta["splits"]["train"]["bytes_per_token"]
        self._byte_table = None
        if self.val is not None:
            self._byte_table = torch.from_numpy(tok.byte_lengths()).double()
            # calibrated so the whole split adds up to the bytes prepare counted (a SentencePiece piece's
            # bytes can differ slightly from its text's: normalisation); 1.0 for byte tokenizers
            counted = float(_split_bytes(self.val.tokens, self._byte_table))
            self._byte_scale = self.bytes_per_token * len(self.val) / counted if counted > 0 else 1.0

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint

    def check_tokenizer_dir(self, tokenizer_dir: Path, what: str) -> None:
        """Refuse a run or checkpoint whose tokenizer is not the one that made this dataset."""
        from moelab.tokenizer import Tokenizer

        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            return
        tok = Tokenizer.load(tokenizer_dir)
        if tok.fingerprint != self.fingerprint:
            raise UserError(
                f"{what} uses tokenizer {tok.fingerprint[:12]} ({tok.kind}, vocab {tok.vocab_size}), "
                f"but the dataset {self.train.dir} was made with {self.fingerprint[:12]} "
                f"({self.train.meta['tokenizer'].get('kind')}, vocab {self.vocab_size}); "
                "use a dataset prepared with the same tokenizer"
            )

    def train_batch(self, device: torch.device):
        x, y = self.train.get_batch(self.batch_size)
        return to_device(x, device), to_device(y, device)

    def val_batches(self, batch_size: int, n: int, device: torch.device):
        if self.val is None:
            return
        for x, y in self.val.iter_val(batch_size, n, spread=True):
            yield to_device(x, device), to_device(y, device)

    def target_bytes(self, y: torch.Tensor) -> float:
        """Text bytes the target ids `y` stand for (-100 = ignored)."""
        y = y.detach().cpu().reshape(-1)
        y = y[y >= 0]
        return float(self._byte_table[y].sum()) * self._byte_scale

    def state_dict(self) -> dict:
        return self.train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state)

    def copy_tokenizer(self, dst: Path) -> None:
        from moelab.tokenizer import META_FILE

        write_dir_atomic(
            dst,
            lambda tmp: shutil.copytree(self.tokenizer_dir, tmp, dirs_exist_ok=True),
            overwrite=True,
            marker=META_FILE,
        )

    def check_token_ids(self, model_vocab: int) -> None:
        """Refuse token ids the model has no embedding for (a dataset that does not match its meta.json),
        before anything is written: otherwise an IndexError stops the run midway. A max over the memory-
        mapped splits in 16M-token chunks: about 10 ms per 100 MB of tokens."""
        limit = min(model_vocab, self.vocab_size)
        for ds in (self.train, self.val):
            if ds is None:
                continue
            tokens, chunk = ds.tokens, 1 << 24
            top = max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=0)
            if top >= limit:
                raise UserError(
                    f"{ds.dir}: the {ds.split} split holds token id {top}, outside the vocabulary "
                    f"(the dataset's tokenizer has {self.vocab_size} ids, model.vocab_size is "
                    f"{model_vocab}); the dataset is corrupt or was not made by its tokenizer: "
                    "prepare it again"
                )


def _split_bytes(tokens, table: torch.Tensor, chunk: int = 1 << 24) -> float:
    """Sum of table[id] over a memory-mapped token array, in chunks (a histogram, then one dot)."""
    import numpy as np

    hist = np.zeros(len(table), dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        hist += np.bincount(np.asarray(tokens[i : i + chunk]), minlength=len(table))[: len(table)]
    return float(torch.from_numpy(hist).double() @ table)


def open_source(cfg: Config):
    """The data source a config names (`data.path`, a prepared dataset directory)."""
    if not cfg.data.path:
        raise UserError(
            "data.path: no dataset given; prepare one with `moelab prepare` and set data.path "
            "(e.g. --set data.path=data/stdlib)"
        )
    from moelab.data.chat import is_chat_dataset

    if is_chat_dataset(cfg.data.path):  # `prepare --format chat`: padded rows with a loss mask
        from moelab.train.chat_source import ChatSource

        return ChatSource(cfg)
    return DatasetSource(cfg)
