import json
import subprocess
import sys

from moelab.cli import main
from moelab.data import TokenDataset
from tests.conftest import REPO


def test_prepare_cli_writes_dataset(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("第一段 first paragraph\n\nsecond paragraph\n\nthird\n", encoding="utf-8")
    out = tmp_path / "data"
    rc = main(["prepare", "--tokenizer", "byte", "--input", str(tmp_path / "a.txt"), "--out", str(out),
               "--doc-boundary", "blank", "--val-fraction", "0.34", "--quiet"])
    assert rc == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: train ") and "val " in line and "uint16" in line
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == 2 and meta["splits"]["val"]["documents"] == 1
    assert TokenDataset(out, "train", seq_len=4).fingerprint == meta["tokenizer"]["fingerprint"]
    # An existing output is refused in one line, then replaced with --overwrite.
    args = ["prepare", "--tokenizer", "byte", "--input", str(tmp_path / "a.txt"), "--out", str(out), "--quiet",
            "--doc-boundary", "line", "--val-fraction", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"moelab prepare: error: {out}: output directory already exists (pass --overwrite to replace it)\n"
    assert main(args + ["--overwrite"]) == 0


def test_prepare_cli_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("fine text\n" * 50)
    cases = [
        (["--input", str(tmp_path / "latin1.txt"), "--strict"], "latin1.txt: expected UTF-8 text, got a file that "
                                                                "is not UTF-8: invalid byte at offset 3"),
        (["--input", str(tmp_path / "latin1.txt")], "corpus: expected some text, got none (1 file(s), 1 skipped"),
        (["--input", str(tmp_path / "ok.txt"), "--val-fraction", "1.5"], "--val-fraction: expected 0 <= F < 1"),
        (["--input", str(tmp_path / "ok.txt"), "--tokenizer", str(tmp_path)], "expected tokenizer metadata"),
    ]
    for extra, message in cases:
        assert main(["prepare", "--tokenizer", "byte", "--out", str(tmp_path / "out"), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moelab prepare: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    # Skipped by default: one warning line, and the rest is prepared.
    assert main(["prepare", "--tokenizer", "byte", "--input", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--val-fraction", "0", "--quiet"]) == 0
    assert capsys.readouterr().err.startswith("moelab: warning: skipped 1 file(s) that are not UTF-8 text:")


def test_python_dash_m_missing_input_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "moelab", "prepare", "--tokenizer", "byte", "--input",
                          str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert res.stderr == (f"moelab prepare: error: {tmp_path / 'missing.txt'}: expected a file, directory, glob or "
                          "'stdlib', got nothing (no such file or directory)\n")
