"""Tokenizers behind one interface: SentencePiece (trained here, for mixed Chinese/English text and code)
and a byte-level one (no training, for quick experiments and tests).

A tokenizer directory holds
    tokenizer.json    kind, vocab_size, special tokens and their ids, fingerprint, training settings
    tokenizer.model   the SentencePiece ModelProto, unchanged (sentencepiece only), so GGUF / HF export can
                      embed it as-is
`Tokenizer.load(dir)` dispatches on `kind`. The fingerprint is sha256 over the kind, the model bytes and the
special tokens; datasets and checkpoints record it, and training refuses data made with another tokenizer.

Exact round trip is a design goal: `decode(encode(s)) == s` for any str. SentencePiece is configured for it
(identity normalisation, whitespace kept as-is, no dummy prefix, byte fallback for characters outside the
vocabulary). The one thing it cannot represent is a literal U+2581 ("▁"), its internal stand-in for a space:
`encode` emits that character as its three UTF-8 byte pieces, which decode back to "▁", not to a space.

Text is encoded line by line (see `SentencePieceTokenizer._encode_lines`): training forbids pieces that span a
line end, so this gives the ids of a whole-text encode, faster. (A SentencePiece model trained elsewhere may
have such pieces; it still round-trips exactly, its ids may differ slightly from a whole-text encode.)

Training (`train_sentencepiece`, `train_tokenizer`) lives in moelab/data/tokenizer_training.py, as it reads
corpora.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moelab.errors import UserError

FORMAT = 1
META_FILE = "tokenizer.json"
MODEL_FILE = "tokenizer.model"
EOD = "<|endoftext|>"
KINDS = ("sentencepiece", "byte")
SP_SPACE = "\u2581"


def _what(path: Path) -> str:
    from moelab.fileio import describe

    return describe(path)


def _check_specials(specials: Sequence[str], field: str = "specials") -> list[str]:
    specials = list(specials)
    if not specials:
        raise UserError(f"{field}: expected at least the end-of-document token, got none")
    for s in specials:
        if not s or any(c.isspace() for c in s):
            raise UserError(f"{field}: expected non-empty tokens without whitespace, got {s!r}")
    if len(set(specials)) != len(specials):
        raise UserError(f"{field}: expected distinct tokens, got {specials}")
    return specials


def _fingerprint(kind: str, model: bytes, specials: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(kind.encode() + b"\0")
    h.update(model)
    h.update(b"\0" + json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()


class Tokenizer:
    """Common interface. Subclasses set `kind`, `_specials` (token -> id, EOD first) and implement
    `_encode`, `_decode_plain`, `_model_bytes`, `vocab_size`."""

    kind = ""
    _specials: dict[str, int]
    training: dict

    # --- identity -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id, the end-of-document token first."""
        return dict(self._specials)

    @property
    def eod_token(self) -> str:
        return next(iter(self._specials))

    @property
    def eod_id(self) -> int:
        return next(iter(self._specials.values()))

    @functools.cached_property
    def fingerprint(self) -> str:
        return _fingerprint(self.kind, self._model_bytes(), self._specials)  # both immutable after __init__

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every id (what `moelab prepare` writes)."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    # --- encoding -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special-token strings inside text are encoded as plain text, never as the
        special ids (a document quoting "<|endoftext|>" must not end a document)."""
        return self._encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def encode_array(self, texts: Sequence[str], eod: Sequence[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All texts encoded into one array of `self.dtype` (an EOD token appended after text i when eod[i])
        and the token count of each text including its EOD. What `moelab prepare` workers run."""
        flat, lengths = self._encode_flat(list(texts))
        if eod is not None and any(eod):
            mask = np.asarray(eod, dtype=bool)
            flat = np.insert(flat, np.cumsum(lengths)[mask], self.eod_id)  # before index = after text i
            lengths = lengths + mask
        return flat, lengths

    def _encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum())), lengths

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`. Special ids are rendered as their token string unless `skip_special`. What sampled
        output can hold but encoded text never does becomes U+FFFD: byte sequences that are not valid UTF-8,
        and ids outside the vocabulary (a model's embedding table may be padded beyond it)."""
        by_id = {v: k for k, v in self._specials.items()}
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                out.append(self._decode_plain(run) + "\ufffd")
                run = []
            elif i in by_id:
                out.append(self._decode_plain(run))
                run = []
                if not skip_special:
                    out.append(by_id[i])
            else:
                run.append(i)
        out.append(self._decode_plain(run))
        return "".join(out)

    def byte_lengths(self) -> np.ndarray:
        """[vocab_size] int64: the UTF-8 bytes of text each id stands for (0 for special tokens), so the
        bytes a window of targets covers is a sum (what bits per byte divides by)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        specials = set(self._specials.values())
        for i in range(self.vocab_size):
            if i not in specials:
                out[i] = len(self._decode_plain([i]).encode("utf-8"))
        return out

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _model_bytes(self) -> bytes:
        raise NotImplementedError

    # --- files ----------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "eod_token": self.eod_token,
            "eod_id": self.eod_id,
            "fingerprint": self.fingerprint,
            "training": getattr(self, "training", {}),
        }

    def write_files(self, directory: Path) -> None:
        """Write the tokenizer files into an existing directory (no atomicity; see `save`)."""
        directory = Path(directory)
        if self.kind == "sentencepiece":
            (directory / MODEL_FILE).write_bytes(self._model_bytes())
        (directory / META_FILE).write_text(
            json.dumps(self.meta(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the tokenizer directory atomically (temporary sibling, then rename)."""
        from moelab.fileio import write_dir_atomic

        return write_dir_atomic(Path(directory), self.write_files, overwrite, marker=META_FILE)

    @staticmethod
    def load(directory: str | Path) -> Tokenizer:
        """The tokenizer saved in `directory`, after checking its fingerprint against its files."""
        from moelab.fileio import read_json

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not directory.is_dir():
            raise UserError(f"{directory}: expected a tokenizer directory, got {_what(directory)}")
        meta = read_json(meta_path, "tokenizer metadata")
        if meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: format: expected {FORMAT}, got {meta.get('format')!r}")
        kind = meta.get("kind")
        if kind not in KINDS:
            raise UserError(f"{meta_path}: kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        specials = meta.get("special_tokens")
        if not isinstance(specials, dict) or not specials:
            raise UserError(f"{meta_path}: special_tokens: expected a non-empty object, got {specials!r}")
        fingerprint = meta.get("fingerprint")
        if not isinstance(fingerprint, str):
            raise UserError(f"{meta_path}: fingerprint: expected a sha256 hex string, got {fingerprint!r}")
        _check_specials(specials, f"{meta_path}: special_tokens")
        if kind == "byte":
            tok: Tokenizer = ByteTokenizer(list(specials))
        else:
            model_path = directory / MODEL_FILE
            if not model_path.is_file():
                raise UserError(
                    f"{model_path}: expected the SentencePiece model next to {META_FILE}, got {_what(model_path)}"
                )
            tok = SentencePieceTokenizer(model_path.read_bytes(), list(specials), source=str(model_path))
        training = meta.get("training", {})
        tok.training = training if isinstance(training, dict) else {}
        if tok.special_tokens != specials:
            raise UserError(
                f"{meta_path}: special_tokens: expected the ids the model gives them, "
                f"{tok.special_tokens}, got {specials}"
            )
        if fingerprint != tok.fingerprint:
            raise UserError(
                f"{meta_path}: fingerprint: expected {fingerprint} (recorded), got "
                f"{tok.fingerprint} from the files: the tokenizer was modified after it was saved"
            )
        if meta.get("vocab_size") != tok.vocab_size:
            raise UserError(
                f"{meta_path}: vocab_size: expected {tok.vocab_size} (the model's), got {meta.get('vocab_size')!r}"
            )
        return tok

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, eod_id={self.eod_id}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are the UTF-8 bytes of the text; special tokens follow from 256."""

    kind = "byte"

    def __init__(self, specials: Sequence[str] = (EOD,)):
        self._specials = {s: 256 + i for i, s in enumerate(_check_specials(specials))}
        self.training = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self._specials)

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _encode_flat(self, texts):
        # Bytes are their own ids: one join and a frombuffer, no per-token Python work.
        data = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        return np.frombuffer(b"".join(data), dtype=np.uint8).astype(self.dtype), lengths

    def _decode_plain(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        return (np.arange(self.vocab_size) < 256).astype(np.int64)  # one byte per id; specials none

    def _model_bytes(self) -> bytes:
        return b""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model trained by `train_sentencepiece`: the first special token is the model's EOS
    piece (the end-of-document token), the others are control symbols; no BOS/EOS is ever added."""

    kind = "sentencepiece"

    def __init__(
        self, model: bytes, specials: Sequence[str] | None = None, source: str = "tokenizer.model", num_threads: int = 1
    ):
        import sentencepiece as spm

        self._model = bytes(model)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._model)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{source}: expected a SentencePiece model, got unreadable bytes ({e})") from None
        self.num_threads = num_threads
        self.training = {}
        if specials is None:  # a model from elsewhere: EOS (if any) and control symbols, in id order
            ids = [i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)]
            specials = [self._sp.id_to_piece(i) for i in ids]
        self._specials = {}
        for s in _check_specials(specials):
            i = self._sp.piece_to_id(s)
            if self._sp.id_to_piece(i) != s or not self._sp.is_control(i):
                raise UserError(
                    f"{source}: special token {s!r}: expected a control piece in the model, got "
                    f"{'none' if self._sp.id_to_piece(i) != s else 'an ordinary piece'}"
                )
            self._specials[s] = i
        # A literal "▁" is emitted as its UTF-8 bytes (see the module docstring).
        # (A model without byte pieces maps them to <unk>; it then gets plain encoding, lossy for "▁".)
        self._space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SP_SPACE.encode()]
        if self._sp.unk_id() in self._space_bytes:
            self._space_bytes = None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        return self._model

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def _encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def _encode_lines(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Ids of every line of every text (lines keep their newline) and the number of lines per text.

        Encoding line by line loses nothing: training cuts words at line ends too (the pretokenization
        delimiter), so no piece spans one. It is ~2x faster than whole texts, as SentencePiece BPE slows
        down on long inputs, and it makes a document's ids independent of where prepare cuts it into pieces
        (always at line ends)."""
        lines, counts, special = [], [], []
        for t in texts:
            parts = t.split("\n")
            last = parts.pop()
            n = len(lines)
            lines += [p + "\n" for p in parts]
            if last:
                lines.append(last)
            counts.append(len(lines) - n)
            if self._space_bytes is not None and SP_SPACE in t:
                special += [i for i in range(n, len(lines)) if SP_SPACE in lines[i]]
        ids = self._sp.encode(lines, num_threads=self.num_threads)
        for i in special:  # a literal "▁" as its three byte pieces (see the module docstring)
            ids[i] = []
            for j, part in enumerate(lines[i].split(SP_SPACE)):
                ids[i] += (self._space_bytes if j else []) + (self._sp.encode(part) if part else [])
        return ids, counts

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        ids, counts = self._encode_lines(list(texts))
        out, i = [], 0
        for c in counts:
            out.append(list(itertools.chain.from_iterable(ids[i : i + c])))
            i += c
        return out

    def _encode_flat(self, texts):
        ids, counts = self._encode_lines(texts)
        line_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(line_lengths.sum()))
        ends = np.concatenate([[0], np.cumsum(line_lengths)])[np.cumsum(counts, dtype=np.int64)]
        return flat, np.diff(ends, prepend=0)

    def _decode_plain(self, ids: list[int]) -> str:
        return self._sp.decode(ids) if ids else ""

    def byte_lengths(self) -> np.ndarray:
        # from the pieces: decoding one id alone would turn a lone byte piece into U+FFFD (3 bytes)
        sp, out = self._sp, np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                out[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
                out[i] = len(sp.id_to_piece(i).replace(SP_SPACE, " ").encode("utf-8"))
        return out

    def _model_bytes(self) -> bytes:
        return self._model
