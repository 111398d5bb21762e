"""Tokenizers across the Hugging Face boundary.

Export: a moelab SentencePiece tokenizer becomes a `tokenizers` BPE (or Unigram) with byte fallback
and the pieces' merges (plus the original `tokenizer.model`); the byte tokenizer becomes a BPE whose
vocabulary is the 256 byte pieces. Either is written only after `AutoTokenizer` reproduces moelab's
ids on a sample text, so a tokenizer that would silently differ is never shipped.
Import: an HF `tokenizer.model` (SentencePiece) that moelab's tokenizer can load becomes `tokenizer/`;
tokenizer.json-only tokenizers (GPT-2-style byte-level BPE, e.g. Qwen, OLMoE) are not imported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moelab.errors import UserError

# Whitespace runs, indentation, tabs, digits, accents, CJK and an emoji: where tokenizers diverge.
SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "def f(x, y=10):\n    if x  >  3:\n\t\treturn [x, y]  # tab\n    return None\n"
    "Numbers 1234567 and 3.14159, caf\u00e9 na\u00efve, \u4e2d\u6587\u6587\u672c, emoji \U0001f600.\n"
    "   leading spaces, trailing spaces   \n\n\n"
)
WRITTEN = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _sp_specials(sp) -> list[str]:
    """The EOS piece first (moelab's end-of-document token), then the other control pieces by id."""
    controls = [i for i in range(sp.get_piece_size()) if sp.is_control(i)]
    eos = sp.eos_id()
    order = ([eos] if eos in controls else []) + [i for i in controls if i != eos]
    return [sp.id_to_piece(i) for i in order]


def import_tokenizer(hf_dir: Path, dest: Path, vocab_size: int) -> str:
    """Write `dest` (a moelab tokenizer directory) from `hf_dir/tokenizer.model` when possible;
    returns a note saying what happened."""
    model = Path(hf_dir) / "tokenizer.model"
    if not model.is_file():
        return (
            f"no tokenizer imported: {hf_dir} has no SentencePiece tokenizer.model (moelab reads "
            "SentencePiece and byte tokenizers; generate with token ids or add a tokenizer)"
        )
    import sentencepiece as spm

    from moelab.tokenizer import SentencePieceTokenizer

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model.read_bytes())
        specials = _sp_specials(sp)
        tok = SentencePieceTokenizer(model.read_bytes(), specials or None, source=str(model))
    except (RuntimeError, OSError, UserError) as e:
        return f"no tokenizer imported: {model} cannot be loaded ({str(e).splitlines()[0]})"
    if tok.vocab_size > vocab_size:
        return f"no tokenizer imported: {model} has {tok.vocab_size} pieces but the model only {vocab_size} ids"
    dest.mkdir(parents=True)
    tok.write_files(dest)
    return f"tokenizer/ imported from tokenizer.model (SentencePiece, {tok.vocab_size} pieces, EOD {tok.eod_token!r})"


def _fast_tokenizer(tok):
    """A `tokenizers.Tokenizer` meant to reproduce `tok` (checked by the caller)."""
    from tokenizers import AddedToken, decoders, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE, Unigram

    if tok.kind == "byte":
        vocab = {f"<0x{b:02X}>": b for b in range(256)}
        # No piece matches a character, so byte fallback emits every UTF-8 byte: ids == bytes.
        fast = HFTokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True))
        fast.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    else:
        from transformers.tokenization_utils_base import generate_merges

        sp = tok._sp
        unk = sp.id_to_piece(sp.unk_id())
        if tok.training.get("model_type", "bpe") == "unigram":
            fast = HFTokenizer(
                Unigram(
                    [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                    unk_id=sp.unk_id(),
                    byte_fallback=True,
                )
            )
        else:
            vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
            fast = HFTokenizer(
                BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
            )
        # moelab's SentencePiece: identity normalisation and no dummy prefix; spaces are "▁".
        fast.normalizer = normalizers.Replace(" ", "\u2581")
        fast.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.special_tokens])
    return fast


def _compatible_tokenizer_config(path: Path) -> None:
    """transformers 5 names the class `TokenizersBackend`, which 4.x does not know; both read
    `PreTrainedTokenizerFast` + tokenizer.json."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data.pop("backend", None)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_tokenizer(tok_dir: Path, out: Path) -> tuple[dict[str, int | None], str]:
    """Write HF tokenizer files for the moelab tokenizer in `tok_dir` into `out`, if they reproduce it.
    Returns (special token ids for config.json, a note)."""
    if not (Path(tok_dir) / "tokenizer.json").is_file():
        return {}, "the checkpoint has no tokenizer/: no tokenizer files exported"
    from moelab.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    special = {"eos": tok.eod_id, "bos": None, "pad": None}
    if tok.kind == "sentencepiece":
        shutil.copyfile(Path(tok_dir) / "tokenizer.model", out / "tokenizer.model")
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        return special, "transformers is not installed: only tokenizer.model (if any) was written"
    fast = PreTrainedTokenizerFast(tokenizer_object=_fast_tokenizer(tok), eos_token=tok.eod_token)
    fast.save_pretrained(str(out))
    _compatible_tokenizer_config(out / "tokenizer_config.json")
    reloaded = AutoTokenizer.from_pretrained(str(out))
    ours = tok.encode(SAMPLE)
    theirs = reloaded.encode(SAMPLE, add_special_tokens=False)
    if theirs != ours or reloaded.decode(theirs) != SAMPLE:
        for name in WRITTEN:
            if name != "tokenizer.model":
                (out / name).unlink(missing_ok=True)
        return special, (
            "the transformers tokenizer built from tokenizer/ does not reproduce moelab's ids, so "
            "only tokenizer.model (if any) was written"
        )
    return special, f"tokenizer files written ({tok.kind}); AutoTokenizer reproduces moelab's ids on a sample"
