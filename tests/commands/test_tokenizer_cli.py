import json

import pytest

from moelab.cli import main
from moelab.tokenizer import Tokenizer

TEXT = " Mixture of experts 混合专家 🚀\r\n\tdef route(x):  return x @ w  # top-k 2024\n\n"


def test_tokenizer_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT * 3 + "the quick brown fox jumps over the lazy dog 0123456789\n") * 200, encoding="utf-8")
    out = tmp_path / "tok"
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(corpus),
            "stdlib",
            "--vocab-size",
            "700",
            "--sample-mb",
            "0.5",
            "--special",
            "<|pad|>",
            "--out",
            str(out),
        ]
    )
    assert rc == 0 and capsys.readouterr().out.startswith(f"wrote {out}: sentencepiece bpe, vocab 700")
    tok = Tokenizer.load(out)
    assert tok.special_tokens == {"<|endoftext|>": 1, "<|pad|>": 2}
    assert tok.training["files"] > 300 and tok.training["bytes_seen"] < 1_500_000

    assert main(["tokenizer", "encode", str(out), TEXT]) == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tok.encode(TEXT)
    assert main(["tokenizer", "decode", str(out), *ids, "1"]) == 0
    assert capsys.readouterr().out == TEXT + "<|endoftext|>"
    assert main(["tokenizer", "decode", str(out), "5,99999"]) == 2
    assert "ids: expected integers 0 <= id < 700, got '99999'" in capsys.readouterr().err
    assert main(["tokenizer", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == tok.fingerprint


def test_tokenizer_byte_and_overwrite(tmp_path, capsys):
    assert main(["tokenizer", "byte", "--out", str(tmp_path / "b")]) == 0
    assert Tokenizer.load(tmp_path / "b").vocab_size == 257
    assert main(["tokenizer", "byte", "--out", str(tmp_path / "b"), "--special", "<|pad|>"]) == 2
    assert capsys.readouterr().err.endswith("b: output directory already exists (pass --overwrite to replace it)\n")
    assert main(["tokenizer", "byte", "--out", str(tmp_path / "b"), "--special", "<|pad|>", "--overwrite"]) == 0
    assert Tokenizer.load(tmp_path / "b").vocab_size == 258
    (tmp_path / "c.txt").write_text(
        "".join(f"line {i}: the quick brown fox jumps over dog {i * 7}\n" for i in range(200))
    )
    train = [
        "tokenizer",
        "train",
        "--input",
        str(tmp_path / "c.txt"),
        "--vocab-size",
        "300",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(train) == 0 and main(train) == 2
    assert "t: output directory already exists (pass --overwrite to replace it)" in capsys.readouterr().err
    assert main(train + ["--overwrite", "--vocab-size", "310"]) == 0
    assert Tokenizer.load(tmp_path / "t").vocab_size == 310


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "tiny.txt").write_text("only a few words here\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "tokenizer.json").write_text("[1, 2")
    (tmp_path / "no_model").mkdir()
    (tmp_path / "no_model" / "tokenizer.json").write_text(
        json.dumps(
            {"format": 1, "kind": "sentencepiece", "special_tokens": {"<|endoftext|>": 1}, "fingerprint": "0" * 64}
        )
    )
    return tmp_path


TRAIN = ["tokenizer", "train", "--vocab-size", "300", "--threads", "1", "--out", "{d}/tok", "--input"]
# (arguments, the one error line after "moelab tokenizer: error: "; {d} is the temporary directory)
BAD = [
    (
        TRAIN + ["{d}/missing.txt"],
        "{d}/missing.txt: expected a file, directory, glob or 'stdlib', got nothing (no such file or directory)",
    ),
    (TRAIN + ["{d}/*.md"], "{d}/*.md: expected files matching this pattern, got none"),
    (TRAIN + ["{d}/empty.txt"], "corpus: expected some text to train on, got none"),
    (
        TRAIN + ["{d}/image.bin"],
        "corpus: expected some text to train on, got none (1 file(s) skipped as not UTF-8 text, e.g. {d}/image.bin)",
    ),
    (
        TRAIN + ["{d}/image.bin", "--strict"],
        "{d}/image.bin: expected UTF-8 text, got a file that is binary: NUL byte in the first 8 KB",
    ),
    (
        TRAIN + ["{d}/latin1.txt"],
        "corpus: expected some text to train on, got none (1 file(s) skipped as not UTF-8 text, e.g. {d}/latin1.txt)",
    ),
    (
        TRAIN + ["{d}/tiny.txt", "{d}/latin1.txt", "--strict"],
        "{d}/latin1.txt: expected UTF-8 text, got a file that is not UTF-8: invalid byte at offset 3",
    ),
    (
        TRAIN + ["{d}/tiny.txt", "--vocab-size", "32000"],
        "vocab_size: expected <= 301 for this corpus (too little "
        "text to learn more pieces; use a smaller vocab size or more "
        "text), got 32000",
    ),
    (
        TRAIN + ["{d}/tiny.txt", "--vocab-size", "0"],
        "vocab_size: expected >= 259 (256 byte pieces + 1 special + unk), got 0",
    ),
    (TRAIN + ["{d}/tiny.txt", "--threads", "-1"], "num_threads (--threads): expected 1 <= N <= 1024, got -1"),
    (
        TRAIN + ["{d}/tiny.txt", "--character-coverage", "0.5"],
        "character_coverage: expected 0.98 <= value <= 1.0, got 0.5",
    ),
    (TRAIN + ["{d}/tiny.txt", "--sample-mb", "0"], "--sample-mb: expected > 0, got 0.0"),
    (
        TRAIN + ["{d}/tiny.txt", "--special", "<a b>"],
        "specials: expected non-empty tokens without whitespace, got '<a b>'",
    ),
    (
        TRAIN + ["{d}/tiny.txt", "--out", "{d}/a_file"],
        "{d}/a_file: expected a directory to write (or nothing), got a file",
    ),
    (
        TRAIN + ["{d}/tiny.txt", "--out", "{d}/a_file/tok"],
        "{d}/a_file/tok: cannot create the output directory ({d}/a_file is not a directory)",
    ),
    (
        TRAIN + ["{d}/tiny.txt", "--out", "{d}", "--overwrite"],
        "{d}: refusing to replace it: expected an empty directory or one holding tokenizer.json, got other files",
    ),
    (
        ["tokenizer", "encode", "{d}/missing", "hi"],
        "{d}/missing: expected a tokenizer directory, got nothing (no such file or directory)",
    ),
    (["tokenizer", "decode", "{d}/a_file", "1"], "{d}/a_file: expected a tokenizer directory, got a file"),
    (
        ["tokenizer", "info", "{d}/corrupt"],
        "{d}/corrupt/tokenizer.json: expected tokenizer metadata as JSON, got a "
        "corrupt file (Expecting ',' delimiter: line 1 column 6 (char 5))",
    ),
    (
        ["tokenizer", "encode", "{d}/no_model", "hi"],
        "{d}/no_model/tokenizer.model: expected the SentencePiece model "
        "next to tokenizer.json, got nothing (no such file or directory)",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_tokenizer_cli_bad_input_is_one_line(bad_inputs, capsys, args, message):
    d = str(bad_inputs)
    before = sorted(p.name for p in bad_inputs.iterdir())
    assert main([a.format(d=d) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"moelab tokenizer: error: {message.format(d=d)}\n" and captured.out == ""
    assert sorted(p.name for p in bad_inputs.iterdir()) == before  # nothing written, no temporaries left
