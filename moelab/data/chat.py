"""`moelab prepare --format chat`: JSONL conversations -> fixed-length rows with a loss mask.

Input lines: {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]} or
{"prompt": "...", "completion": "..."} (a user turn and the assistant's answer). Each is rendered with
the chat template stored with the tokenizer (`chat_template.py`).

    DATA_DIR/train.bin, val.bin        token ids [rows, seq_len + 1], tokenizer dtype
    DATA_DIR/train.mask, val.mask      uint8 [rows, seq_len + 1]: 1 where the token is a training target
    DATA_DIR/meta.json                 kind "chat", seq_len, rows per split, bad records, tokenizer
    DATA_DIR/tokenizer/                the tokenizer, with chat_template.json

One conversation per row, right-padded with EOD (mask 0), not several packed into a window: attention is
causal, so padding after a conversation can never influence its tokens, while packing would need
block-diagonal attention masks that the training forward does not take (packed conversations would
attend to each other). The price is padding compute, small for short instruction data.

Bad records (not JSON, wrong shape, unknown role, no assistant turn, longer than a row) are reported one
line each with file:line, counted in meta.json, and skipped; `strict` fails on the first one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from moelab.data.chat_template import ChatEncoder, ChatTemplate, check_messages
from moelab.errors import UserError
from moelab.fileio import write_dir_atomic

KIND = "chat"


def record_messages(obj) -> list[dict]:
    """A JSONL record's conversation, or ValueError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object with 'messages' or 'prompt'/'completion'")
    if "messages" in obj:
        msgs = check_messages(obj["messages"])
    elif "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise ValueError("'prompt' and 'completion' must be strings")
        msgs = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    else:
        raise ValueError("expected 'messages' or 'prompt' and 'completion'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant message: nothing to train on")
    return msgs


def encode_rows(records, encoder: ChatEncoder, seq_len: int, eod_id: int, report, strict: bool):
    """(ids [n, seq_len + 1], mask [n, seq_len + 1], bad count) from (where, line text) records."""
    ids_rows, mask_rows, bad = [], [], 0
    width = seq_len + 1
    for where, line in records:
        try:
            ids, mask = encoder.encode(record_messages(json.loads(line)))
            if len(ids) > width:
                raise ValueError(f"{len(ids)} tokens, longer than a row (data.seq_len + 1 = {width})")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if strict:
                raise UserError(f"{where}: {e}") from None
            report(f"{where}: skipped: {e}")
            bad += 1
            continue
        pad = width - len(ids)
        ids_rows.append(ids + [eod_id] * pad)
        mask_rows.append(mask + [0] * pad)
    ids_arr = np.array(ids_rows, dtype=np.int64).reshape(-1, width)
    return ids_arr, np.array(mask_rows, dtype=np.uint8).reshape(-1, width), bad


def _records(inputs: list[str]):
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{path}: no such file (--format chat reads .jsonl files)")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    yield f"{path}:{i}", line


def prepare_chat(
    inputs: list[str],
    tokenizer,
    out: str | Path,
    seq_len: int,
    val_fraction: float = 0.05,
    strict: bool = False,
    overwrite: bool = False,
    template: ChatTemplate | None = None,
    quiet: bool = False,
) -> dict:
    from moelab.data.preparation import is_val, resolve_tokenizer

    t0 = time.perf_counter()
    tok = resolve_tokenizer(tokenizer)
    tok_dir = Path(tokenizer) if isinstance(tokenizer, (str, Path)) and Path(tokenizer).is_dir() else None
    if template is None:
        template = ChatTemplate.load(tok_dir) if tok_dir else ChatTemplate()
    encoder = ChatEncoder(tok, template)
    lines = list(_records(inputs))
    splits = {"train": [], "val": []}
    for k, rec in enumerate(lines):
        splits["val" if is_val(k, val_fraction) else "train"].append(rec)

    def report(msg: str) -> None:
        if not quiet:
            print(f"moelab prepare: {msg}", file=sys.stderr)

    arrays, bad = {}, 0
    for name, recs in splits.items():
        ids, mask, b = encode_rows(recs, encoder, seq_len, tok.eod_id, report, strict)
        arrays[name] = (ids.astype(tok.dtype), mask)
        bad += b
    if len(arrays["train"][0]) == 0:
        raise UserError(f"no usable conversations in {', '.join(inputs)} ({bad} bad records)")
    meta = {
        "format": 1,
        "kind": KIND,
        "seq_len": seq_len,
        "dtype": np.dtype(tok.dtype).name,
        "tokenizer": tok.meta(),
        "records": len(lines),
        "bad_records": bad,
        "splits": {
            n: {
                "rows": int(a[0].shape[0]),
                "trained_tokens": int(a[1].sum()),
                "tokens": int(a[1].shape[0] * (seq_len + 1)),
            }
            for n, a in arrays.items()
        },
        "chat_template": template.to_json(),
        "seconds": time.perf_counter() - t0,
    }

    def write(tmp: Path) -> None:
        for name, (ids, mask) in arrays.items():
            ids.tofile(tmp / f"{name}.bin")
            mask.tofile(tmp / f"{name}.mask")
        tok.save(tmp / "tokenizer")
        template.save(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    write_dir_atomic(Path(out), write, overwrite, marker="meta.json")
    return meta


def is_chat_dataset(path: str | Path) -> bool:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("kind") == KIND
    except ValueError:
        return False


def load_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids [rows, seq_len + 1], mask, meta) of one split of a chat dataset, memory-mapped."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    width = meta["seq_len"] + 1
    rows = meta["splits"][split]["rows"]
    ids = (
        np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(rows, width))
        if rows
        else np.zeros((0, width), dtype=meta["dtype"])
    )
    mask = (
        np.memmap(path / f"{split}.mask", dtype=np.uint8, mode="r", shape=(rows, width))
        if rows
        else np.zeros((0, width), dtype=np.uint8)
    )
    return ids, mask, meta
