"""The trainer's data source for a chat dataset (`moelab prepare --format chat`): whole padded rows, with
targets -100 wherever the loss mask says a token is not trained (prompts, markers, padding)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from moelab.data.chat import load_split
from moelab.device import to_device
from moelab.errors import UserError
from moelab.model.lm_loss import IGNORE_INDEX


class ChatSource:
    """Random rows of the train split (a seeded generator: its state is the sampler position); the val
    split's rows in order for validation."""

    def __init__(self, cfg):
        path = Path(cfg.data.path)
        self.train_ids, self.train_mask, meta = load_split(path, "train")
        self.val_ids, self.val_mask, _ = load_split(path, "val")
        if meta["seq_len"] != cfg.data.seq_len:
            raise UserError(
                f"data.seq_len: {cfg.data.seq_len}, but the chat dataset {path} has rows of "
                f"seq_len {meta['seq_len']}; set data.seq_len={meta['seq_len']}"
            )
        self.path, self.meta, self.tokenizer_dir = path, meta, path / "tokenizer"
        self.batch_size = cfg.train.batch_size
        self.vocab_size = meta["tokenizer"]["vocab_size"]
        self.fingerprint = meta["tokenizer"]["fingerprint"]
        self.bytes_per_token = 1.0  # bits per byte is not meaningful on masked targets; val/bpb = nats/ln2
        self.gen = torch.Generator().manual_seed(cfg.train.seed)

    @staticmethod
    def _xy(ids: np.ndarray, mask: np.ndarray):
        t, m = torch.from_numpy(np.asarray(ids, dtype=np.int64)), torch.from_numpy(np.array(mask)).bool()
        y = t[:, 1:].masked_fill(~m[:, 1:], IGNORE_INDEX)
        return t[:, :-1].contiguous(), y.contiguous()

    def train_batch(self, device: torch.device):
        rows = torch.randint(0, len(self.train_ids), (self.batch_size,), generator=self.gen).numpy()
        x, y = self._xy(self.train_ids[rows], self.train_mask[rows])
        return to_device(x, device), to_device(y, device)

    def val_batches(self, batch_size: int, n: int, device: torch.device):
        for b in range(min(n, len(self.val_ids) // batch_size)):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            x, y = self._xy(self.val_ids[sl], self.val_mask[sl])
            yield to_device(x, device), to_device(y, device)

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])

    def copy_tokenizer(self, dst: Path) -> None:
        shutil.copytree(self.tokenizer_dir, dst, dirs_exist_ok=True)

    def check_token_ids(self, model_vocab: int) -> None:
        """Refuse token ids the model has no embedding for (rows that do not match meta.json), before
        anything is written, in the plain dataset's words (`DatasetSource.check_token_ids`). Chat splits
        are small (instruction data): one max over each memory-mapped split."""
        limit = min(model_vocab, self.vocab_size)
        for split, ids in (("train", self.train_ids), ("val", self.val_ids)):
            top = int(ids.max()) if ids.size else 0
            if top >= limit:
                raise UserError(
                    f"{self.path}: the {split} split holds token id {top}, outside the vocabulary "
                    f"(the dataset's tokenizer has {self.vocab_size} ids, model.vocab_size is "
                    f"{model_vocab}); the dataset is corrupt or was not made by its tokenizer: "
                    "prepare it again"
                )

    def check_tokenizer_dir(self, tokenizer_dir: Path, what: str) -> None:
        from moelab.tokenizer import Tokenizer

        if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            return
        tok = Tokenizer.load(tokenizer_dir)
        if tok.fingerprint != self.fingerprint:
            raise UserError(
                f"{what} uses tokenizer {tok.fingerprint[:12]}, but the chat dataset was made with "
                f"{self.fingerprint[:12]}; prepare the chat data with the base model's tokenizer"
            )
