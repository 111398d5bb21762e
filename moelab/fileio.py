"""The one place moelab writes files and directories: every output appears complete or not at all.

    write_file_atomic(path, data)           temp sibling, fsync, rename (a reader never sees half a file)
    write_dir_atomic(final, write, ...)     write(tmp) in a temp sibling directory, fsync, rename
    remove_dir(path)                        rename away first, then delete (a kill never leaves half of it)
    remove_stale_siblings(final)            delete what killed writers left next to `final`
    check_output_dir(final, overwrite, marker)  refuse to replace what moelab did not write
    read_json(path, what), warn(msg)        one-line errors and warnings

Temporary names are hidden siblings carrying the writer's PID: `.NAME.tmp-PID-HEX` (being written),
`.NAME.old-PID-HEX` (the previous output during an overwrite), `.NAME.trash-PID-HEX` (being deleted).
Nothing lists hidden names, and a later writer deletes those of a PID that no longer runs, so a kill -9
at any moment leaves either the old or the new output plus garbage that the next start removes.
Directories are made with mkdir and files with open(), never tempfile.mkdtemp/mkstemp, whose private
0700/0600 modes would survive the rename: outputs get the umask's modes like any file the user makes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from moelab.errors import UserError

_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
# Errors from the machine rather than from moelab: reported in one line instead of a traceback.
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_KINDS = ("tmp", "old", "trash")
# Test hook: `MOELAB_TEST_PAUSE_AT=<point>` sleeps MOELAB_TEST_PAUSE_S seconds (default 60) at that point of
# a write, so a test can SIGKILL the writer inside a window that is otherwise microseconds wide.
PAUSE_ENV, PAUSE_S_ENV = "MOELAB_TEST_PAUSE_AT", "MOELAB_TEST_PAUSE_S"


def warn(msg: str) -> None:
    print(f"moelab: warning: {msg}", file=sys.stderr, flush=True)


def pause_for_test(point: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        import time

        time.sleep(float(os.environ.get(PAUSE_S_ENV) or 60))


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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: expected {what} as JSON, got a corrupt file ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {what} as a JSON object, got {json_type(data)}")
    return data


def describe(path: Path) -> str:
    """What is at `path`, for an error that says what was expected and what was got."""
    import stat

    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "nothing (no such file or directory)"
    except OSError as e:
        return f"something unreadable ({e.strerror or e})"
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((what for test, what in kinds if test(mode)), "a special file")


# ----------------------------------------------------------------------------------------------------
# Names of temporaries and their cleanup


def sibling(final: Path, kind: str) -> Path:
    assert kind in _KINDS
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform without signal 0: assume it still writes
    return True


def _delete(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Delete the temporaries of killed writers (their PID no longer runs) in `parent`, for one output
    `name` or all. A live writer's are left alone, and so is an `.old-*` while its output is missing (a kill
    between the two renames of an overwrite: it is the only copy of the old output). Returns what went."""
    stem = re.escape(name) if name is not None else r".+"
    pattern = re.compile(rf"\.({stem})\.(tmp|old|trash)-(\d+)-[0-9a-f]+")
    removed = []
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None:
            continue
        out, kind, pid = m.group(1), m.group(2), int(m.group(3))
        if kind == "old" and not (Path(parent) / out).exists():
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            _delete(p)
            removed.append(p)
    return removed


def remove_stale_siblings(final: Path) -> list[Path]:
    final = Path(final)
    return remove_stale(final.parent, final.name)


def remove_dir(path: Path) -> None:
    """Delete a directory so that no reader ever sees part of it: rename it to a hidden `.trash-*`
    sibling (atomic), then delete that; a kill during the delete leaves only hidden garbage."""
    path = Path(path)
    trash = sibling(path, "trash")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
    pause_for_test("remove_dir")
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Durability


def fsync_dir(path: Path) -> None:
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


def umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _ordinary_modes(path: Path, is_dir: bool, mask: int) -> None:
    # Some writers make private files (safetensors' save_file: 0600): an output is an ordinary file.
    try:
        os.chmod(path, (0o777 if is_dir else 0o666) & ~mask)
    except OSError:
        pass


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, giving each the umask's modes on the way."""
    mask = umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                _ordinary_modes(p, False, mask)
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        _ordinary_modes(Path(dirpath), True, mask)
        fsync_dir(Path(dirpath))


def _env_error(final: Path, e: OSError) -> UserError:
    where = f": {e.filename}" if e.filename else ""
    return UserError(f"{final}: writing failed ({e.strerror or e}{where})")


# ----------------------------------------------------------------------------------------------------
# Files


def write_file_atomic(path: Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text as UTF-8, or a function that writes the given path) to a temporary sibling,
    fsync it, rename it over `path`. A reader sees the old file or the new one, never a mix. The parent
    directory is created; a problem with the machine (disk full, read-only, a file in the way) is a
    one-line UserError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = parent_problem(path) or (e.strerror or str(e))
        raise UserError(f"{path.parent}: cannot create the output directory ({why})") from None
    tmp = sibling(path, "tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "xb") as fh:  # open() honours the umask (mkstemp would make it 0600)
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        _ordinary_modes(tmp, False, umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------------
# Directories


def parent_problem(final: Path) -> str | None:
    """Why `final`'s parent cannot hold it (an ancestor is a file), or None."""
    blocker = next((a for a in Path(final).parents if a.exists() or a.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{blocker} is not a directory"
    return None


def check_output_dir(final: Path, overwrite: bool, marker: str | None, empty_ok: bool = False) -> None:
    """Refuse an existing output directory unless `overwrite`, and even then unless it is empty or holds
    `marker` (a file only moelab's writer of this kind puts there), so a typo in an output path never
    deletes an unrelated directory. Called before long work too, so a run is not wasted on an output it
    will refuse. `marker=None`: the caller owns the name (e.g. a checkpoint step) and replaces anything.
    `empty_ok`: an existing empty directory is taken without --overwrite (a directory made for the output)."""
    final = Path(final)
    problem = parent_problem(final)
    if problem:
        raise UserError(f"{final}: cannot create the output directory ({problem})")
    if not (final.exists() or final.is_symlink()):
        return
    if not final.is_dir():
        raise UserError(f"{final}: expected a directory to write (or nothing), got a file")
    if empty_ok and not any(final.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{final}: output directory already exists (pass --overwrite to replace it)")
    if marker is not None and any(final.iterdir()) and not (final / marker).is_file():
        raise UserError(
            f"{final}: refusing to replace it: expected an empty directory or one holding {marker}, got other files"
        )


def _make_tmp_dir(final: Path) -> Path:
    for _ in range(100):
        tmp = sibling(final, "tmp")
        try:
            tmp.mkdir()  # mkdir honours the umask; mkdtemp's 0700 would survive the rename
            return tmp
        except FileExistsError:
            continue
    raise UserError(f"{final}: could not create a temporary directory next to it")


def write_dir_atomic(
    final: Path,
    write: Callable[[Path], None],
    overwrite: bool = False,
    marker: str | None = None,
    empty_ok: bool = False,
) -> Path:
    """Call write(tmp) in a hidden temporary sibling, fsync everything in it, then rename it into place, so
    `final` never holds a partial result: an interrupted or failed write leaves `final` as it was (a kill -9
    can leave the temporary behind, never a half-written `final`, and the next write deletes it). An
    existing `final` is handled by `check_output_dir(final, overwrite, marker, empty_ok)`."""
    final = Path(final)
    check_output_dir(final, overwrite, marker, empty_ok)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(final)
        tmp = _make_tmp_dir(final)
    except OSError as e:
        why = parent_problem(final) or f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"
        raise UserError(f"{final}: cannot create the output directory ({why})") from None
    try:
        write(tmp)
        fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            old = sibling(final, "old")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            fsync_dir(final.parent)
            _delete(old)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)  # make the rename itself durable
    except OSError as e:
        if e.errno not in _ENV_ERRNOS:
            raise
        raise _env_error(final, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return final
