"""moelab.fileio: the one atomic writer (modes, leftovers of killed writers, refusing foreign outputs)."""

import os
import re
import stat
import subprocess
import sys

import pytest

from moelab import fileio
from moelab.errors import UserError


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_outputs_get_the_umask_modes_not_private_temp_modes(tmp_path):
    import torch
    from safetensors.torch import save_file

    def write(d):
        (d / "w.bin").write_bytes(b"x")
        save_file({"a": torch.zeros(2)}, str(d / "m.safetensors"))  # safetensors makes its files 0600

    out = fileio.write_dir_atomic(tmp_path / "out", write)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # mkdtemp would leave 0700
    assert stat.S_IMODE((out / "m.safetensors").stat().st_mode) == 0o666 & ~_umask()
    f = fileio.write_file_atomic(tmp_path / "sub" / "f.json", "{}")
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask()  # mkstemp would leave 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sub"]


def test_overwrite_replaces_only_marked_directories(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="refusing to replace it"):
        fileio.write_dir_atomic(tmp_path / "mine", lambda d: None, overwrite=True, marker="MARK")
    with pytest.raises(UserError, match=r"already exists \(pass --overwrite"):
        fileio.write_dir_atomic(tmp_path / "mine", lambda d: None, marker="MARK")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    fileio.write_dir_atomic(tmp_path / "empty", lambda d: (d / "MARK").write_text(""), marker="MARK", empty_ok=True)
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match=re.escape(f"cannot create the output directory ({tmp_path / 'f'} is not")):
        fileio.write_dir_atomic(tmp_path / "f" / "x", lambda d: None)


def test_remove_dir_renames_away_first_and_leftovers_of_dead_writers_are_cleaned(tmp_path, monkeypatch):
    d = tmp_path / "step_1"
    d.mkdir()
    (d / "a").write_text("x")
    seen = []
    monkeypatch.setattr(fileio.shutil, "rmtree", lambda p, **kw: seen.append(p))  # "killed" before the delete
    fileio.remove_dir(d)
    monkeypatch.undo()
    assert not d.exists() and seen and seen[0].name.startswith(".step_1.trash-")
    dead = _dead_pid()
    for kind in ("tmp", "trash", "old"):
        (tmp_path / f".step_2.{kind}-{dead}-0123abcd").mkdir()
    live = tmp_path / f".step_3.tmp-{os.getppid()}-0123abcd"
    live.mkdir()
    os.rename(seen[0], tmp_path / f".step_1.trash-{dead}-0123abcd")
    removed = {p.name for p in fileio.remove_stale(tmp_path)}
    # .old kept while step_2 is missing: it is the only copy of an output whose overwrite was killed
    assert removed == {
        f".step_1.trash-{dead}-0123abcd",
        f".step_2.tmp-{dead}-0123abcd",
        f".step_2.trash-{dead}-0123abcd",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".step_2.old-{dead}-0123abcd", live.name]


def test_write_file_errors_are_one_line(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="cannot write"):
        fileio.write_file_atomic(tmp_path / "d", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    (tmp_path / "bad.json").write_text("[" * 50000 + "]" * 50000)
    with pytest.raises(UserError, match="expected thing"):
        fileio.read_json(tmp_path / "bad.json", "thing")
