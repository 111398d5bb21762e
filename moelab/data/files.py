"""Small file helpers for tokenizer and dataset directories: one-line errors for bad JSON, and directories
written atomically (temporary sibling, then rename) that never replace something they did not write."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from moelab.errors import UserError


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a one-line UserError saying what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: expected {what}, got nothing (no such file)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: expected {what} as JSON, got a corrupt file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {what} as a JSON object, got {type(data).__name__}")
    return data


def check_output_dir(final: Path, overwrite: bool, marker: str) -> None:
    """Refuse an existing output directory unless `overwrite` (see `write_dir_atomic`). Called before long
    work too, so a run is not wasted on an output it will refuse."""
    final = Path(final)
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise UserError(f"{final}: output directory already exists (pass --overwrite to replace it)")
        if not final.is_dir() or (any(final.iterdir()) and not (final / marker).is_file()):
            raise UserError(f"{final}: refusing to replace it: expected an empty directory or one holding "
                            f"{marker}, got {'a file' if not final.is_dir() else 'other files'}")


def write_dir_atomic(final: Path, write, overwrite: bool, marker: str) -> Path:
    """Call write(tmp) in a temporary sibling of `final`, then rename it into place. An existing `final` is
    refused unless `overwrite`, and even then only replaced when it is empty or holds `marker` (so a typo in
    an output path never deletes an unrelated directory)."""
    final = Path(final)
    check_output_dir(final, overwrite, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
