import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.data import TokenDataset
from tests.conftest import REPO


def test_prepare_cli_writes_dataset(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("第一段 first paragraph\n\nsecond paragraph\n\nthird\n", encoding="utf-8")
    out = tmp_path / "data"
    rc = main(
        [
            "prepare",
            "--tokenizer",
            "byte",
            "--input",
            str(tmp_path / "a.txt"),
            "--out",
            str(out),
            "--doc-boundary",
            "blank",
            "--val-fraction",
            "0.34",
            "--quiet",
        ]
    )
    assert rc == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: train ") and "val " in line and "uint16" in line
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == 2 and meta["splits"]["val"]["documents"] == 1
    assert TokenDataset(out, "train", seq_len=4).fingerprint == meta["tokenizer"]["fingerprint"]
    # An existing output is refused in one line, then replaced with --overwrite.
    args = [
        "prepare",
        "--tokenizer",
        "byte",
        "--input",
        str(tmp_path / "a.txt"),
        "--out",
        str(out),
        "--quiet",
        "--doc-boundary",
        "line",
        "--val-fraction",
        "0",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"moelab prepare: error: {out}: output directory already exists (pass --overwrite to replace it)\n"
    assert main(args + ["--overwrite"]) == 0


@pytest.fixture
def bad_inputs(tmp_path):
    """Tiny inputs for every kind of bad input."""
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ok.txt").write_text("fine text\n" * 50)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "no_tok").mkdir()
    (tmp_path / "corrupt_tok").mkdir()
    (tmp_path / "corrupt_tok" / "tokenizer.json").write_text('{"kind": "byte", ')
    (tmp_path / "old_out").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "old_out" / "notes.txt").write_text("keep me")
    return tmp_path


# (extra arguments, the one error line after "moelab prepare: error: "; {d} is the temporary directory)
BAD = [
    (
        ["--input", "{d}/missing.txt"],
        "{d}/missing.txt: expected a file, directory, glob or 'stdlib', got nothing (no such file or directory)",
    ),
    (["--input", "{d}/*.md"], "{d}/*.md: expected files matching this pattern, got none"),
    (["--input", "{d}/empty_dir"], "--input: expected at least one file, got none in {d}/empty_dir"),
    (["--input", "{d}/empty.txt"], "corpus: expected some text, got none (1 file(s); all empty)"),
    (
        ["--input", "{d}/image.bin"],
        "corpus: expected some text, got none (1 file(s); 1 file(s) skipped as not UTF-8 "
        "text, e.g. {d}/image.bin; the rest empty)",
    ),
    (
        ["--input", "{d}/image.bin", "--strict"],
        "{d}/image.bin: expected UTF-8 text, got a file that is binary: NUL byte in the first 8 KB",
    ),
    (
        ["--input", "{d}/latin1.txt"],
        "corpus: expected some text, got none (1 file(s); 1 file(s) skipped as not "
        "UTF-8 text, e.g. {d}/latin1.txt; the rest empty)",
    ),
    (
        ["--input", "{d}/latin1.txt", "{d}/ok.txt", "--strict"],
        "{d}/latin1.txt: expected UTF-8 text, got a file that is not UTF-8: invalid byte at offset 3",
    ),
    (["--input", "{d}/ok.txt", "--val-fraction", "1.5"], "--val-fraction: expected 0 <= F < 1, got 1.5"),
    (["--input", "{d}/ok.txt", "--val-fraction", "1"], "--val-fraction: expected 0 <= F < 1, got 1.0"),
    (["--input", "{d}/ok.txt", "--val-fraction", "-0.1"], "--val-fraction: expected 0 <= F < 1, got -0.1"),
    (["--input", "{d}/ok.txt", "--val-fraction", "nan"], "--val-fraction: expected 0 <= F < 1, got nan"),
    (
        ["--input", "{d}/ok.txt"],
        "--val-fraction: the corpus has 1 document(s), too few to hold out 0.05 of them "
        "(validation is split by document; it needs at least 20 documents): add documents, "
        "use --doc-boundary line|blank, or pass --val-fraction 0",
    ),
    (["--input", "{d}/ok.txt", "--workers", "-1"], "--workers: expected >= 0 (0 = encode in this process), got -1"),
    (
        ["--input", "{d}/ok.txt", "--tokenizer", "{d}/missing_tok"],
        "{d}/missing_tok: expected a tokenizer directory "
        "(from `moelab tokenizer train`) or 'byte', got "
        "nothing (no such file or directory)",
    ),
    (
        ["--input", "{d}/ok.txt", "--tokenizer", "{d}/a_file"],
        "{d}/a_file: expected a tokenizer directory (from `moelab tokenizer train`) or 'byte', got a file",
    ),
    (["--input", "{d}/fifo"], "{d}/fifo: expected a file, directory, glob or 'stdlib', got a named pipe (FIFO)"),
    (["--input", "/dev/zero"], "/dev/zero: expected a file, directory, glob or 'stdlib', got a character device"),
    (
        ["--input", "{d}/ok.txt", "--tokenizer", "{d}/no_tok"],
        "{d}/no_tok/tokenizer.json: expected tokenizer metadata, got nothing (no such file)",
    ),
    (
        ["--input", "{d}/ok.txt", "--tokenizer", "{d}/corrupt_tok"],
        "{d}/corrupt_tok/tokenizer.json: expected tokenizer metadata as JSON, got a corrupt file (Expecting property "
        "name enclosed in double quotes: line 1 column 18 (char 17))",
    ),
    (
        ["--input", "{d}/ok.txt", "--val-fraction", "0", "--out", "{d}/a_file"],
        "{d}/a_file: expected a directory to write (or nothing), got a file",
    ),
    (
        ["--input", "{d}/ok.txt", "--val-fraction", "0", "--out", "{d}/a_file/sub"],
        "{d}/a_file/sub: cannot create the output directory ({d}/a_file is not a directory)",
    ),
    (
        ["--input", "{d}/ok.txt", "--val-fraction", "0", "--out", "{d}/old_out"],
        "{d}/old_out: output directory already exists (pass --overwrite to replace it)",
    ),
    (
        ["--input", "{d}/ok.txt", "--val-fraction", "0", "--out", "{d}/old_out", "--overwrite"],
        "{d}/old_out: refusing to replace it: expected an empty directory or one holding meta.json, got other files",
    ),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_prepare_cli_bad_input_is_one_line(bad_inputs, capsys, extra, message):
    d = str(bad_inputs)
    extra = [a.format(d=d) for a in extra]
    out = [] if "--out" in extra else ["--out", f"{d}/out"]
    assert main(["prepare", "--tokenizer", "byte", *out, "--quiet", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"moelab prepare: error: {message.format(d=d)}\n" and captured.out == ""
    assert not (bad_inputs / "out").exists() and not list(bad_inputs.glob(".*.tmp-*"))
    assert (bad_inputs / "old_out" / "notes.txt").read_text() == "keep me"


def test_prepare_cli_skips_bad_files_with_one_warning(bad_inputs, capsys):
    assert (
        main(
            [
                "prepare",
                "--tokenizer",
                "byte",
                "--input",
                str(bad_inputs),
                "--out",
                str(bad_inputs / "out"),
                "--val-fraction",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert err.startswith("moelab: warning: skipped 2 file(s) that are not UTF-8 text:") and err.count("\n") == 1
    meta = json.loads((bad_inputs / "out" / "meta.json").read_text())
    assert sorted(Path(s["path"]).name for s in meta["skipped_files"]) == ["image.bin", "latin1.txt"]


def test_train_on_corrupt_meta_is_one_line(tmp_path, capsys):
    for j in range(20):
        (tmp_path / f"{j}.txt").write_text(f"document {j} " * 40)
    data = tmp_path / "data"
    assert (
        main(["prepare", "--tokenizer", "byte", "--input", str(tmp_path / "*.txt"), "--out", str(data), "--quiet"]) == 0
    )
    meta = (data / "meta.json").read_text()
    train = [
        "train",
        str(REPO / "configs" / "demo.yaml"),
        "--set",
        f"data.path={data}",
        "--set",
        "data.seq_len=8",
        "--run-dir",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    for corrupt, message in [
        (meta[: len(meta) // 2], "expected dataset metadata as JSON, got a corrupt file"),
        (meta.replace('"dtype": "uint16"', '"dtype": "float32"'), "dtype: expected uint16 or uint32, got 'float32'"),
    ]:
        (data / "meta.json").write_text(corrupt)
        capsys.readouterr()
        assert main(train) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"moelab train: error: {data / 'meta.json'}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_python_dash_m_missing_input_no_traceback(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "moelab",
            "prepare",
            "--tokenizer",
            "byte",
            "--input",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 2
    assert res.stderr == (
        f"moelab prepare: error: {tmp_path / 'missing.txt'}: expected a file, directory, glob or "
        "'stdlib', got nothing (no such file or directory)\n"
    )
