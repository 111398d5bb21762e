"""Small file helpers for tokenizer and dataset directories: one-line errors for bad JSON, and directories
written atomically (temporary sibling, then rename) that never replace something they did not write."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from moelab.errors import UserError

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
# Errors from the machine rather than from moelab: reported in one line instead of a traceback.
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a one-line UserError saying what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: expected {what}, got nothing (no such file)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: expected {what}, got a directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: expected {what} as JSON, got a corrupt file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {what} as a JSON object, got {json_type(data)}")
    return data


def check_output_dir(final: Path, overwrite: bool, marker: str) -> None:
    """Refuse an existing output directory unless `overwrite` (see `write_dir_atomic`). Called before long
    work too, so a run is not wasted on an output it will refuse."""
    final = Path(final)
    if not (final.exists() or final.is_symlink()):
        return
    if not final.is_dir():
        raise UserError(f"{final}: expected a directory to write (or nothing), got a file")
    if not overwrite:
        raise UserError(f"{final}: output directory already exists (pass --overwrite to replace it)")
    if any(final.iterdir()) and not (final / marker).is_file():
        raise UserError(f"{final}: refusing to replace it: expected an empty directory or one holding {marker}, "
                        "got other files")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform without signal 0: assume it still writes
    return True


def remove_stale_siblings(final: Path) -> list[Path]:
    """Delete `final.tmp-PID-*` / `final.old-PID-*` directories left by a writer that was killed (its PID
    no longer runs on this machine); a live writer's are left alone, and so is a `.old-*` while `final`
    is missing (a kill between the two renames of an overwrite: it is the only copy of the old output).
    Returns what was removed."""
    pattern = re.compile(rf"{re.escape(final.name)}\.(tmp|old)-(\d+)-[0-9a-f]+")
    removed = []
    try:
        siblings = list(final.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or (m.group(1) == "old" and not final.exists()):
            continue
        if p.is_dir() and not p.is_symlink() and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _make_tmp_dir(final: Path) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename; mkdir honours the umask like any output.
    # The writer's PID in the name lets a later run tell a killed writer's leftovers from a live one's.
    for _ in range(100):
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise UserError(f"{final}: could not create a temporary directory next to it")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_dir_atomic(final: Path, write, overwrite: bool, marker: str) -> Path:
    """Call write(tmp) in a temporary sibling `final.tmp-*`, fsync its files, then rename it into place, so
    `final` never holds a partial result: an interrupted or failed write leaves `final` as it was (a kill -9
    can leave the `.tmp-*` sibling behind, never a half-written `final`, and the next write deletes it). An
    existing `final` is refused unless `overwrite`, and even then only replaced when it is empty or holds
    `marker` (so a typo in an output path never deletes an unrelated directory)."""
    final = Path(final)
    check_output_dir(final, overwrite, marker)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(final)
        tmp = _make_tmp_dir(final)
    except OSError as e:
        blocker = next((a for a in final.parents if a.exists() or a.is_symlink()), None)
        why = f"{blocker} is not a directory" if blocker is not None and not blocker.is_dir() else \
            f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
        raise UserError(f"{final}: cannot create the output directory ({why})") from None
    try:
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)  # make the rename itself durable
    except OSError as e:
        if e.errno not in _ENV_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        raise UserError(f"{final}: writing failed ({e.strerror or e}{where})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final
