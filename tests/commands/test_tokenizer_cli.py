import json

from moelab.cli import main
from moelab.tokenizer import Tokenizer

TEXT = "Mixture of experts 混合专家 🚀\n\tdef route(x):  return x @ w  # top-k\n"


def test_tokenizer_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT * 3 + "the quick brown fox jumps over the lazy dog 0123456789\n") * 200, encoding="utf-8")
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--input", str(corpus), "stdlib", "--vocab-size", "700", "--sample-mb", "0.5",
               "--special", "<|pad|>", "--out", str(out)])
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


def test_tokenizer_byte_and_errors(tmp_path, capsys):
    assert main(["tokenizer", "byte", "--out", str(tmp_path / "b")]) == 0
    assert Tokenizer.load(tmp_path / "b").vocab_size == 257
    capsys.readouterr()
    (tmp_path / "tiny.txt").write_text("only a few words here\n")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "tiny.txt"), "--vocab-size", "32000",
                 "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moelab tokenizer: error: vocab_size: expected <= ")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "tiny.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "b")]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "b" / "tokenizer.json").write_text("[1, 2")
    assert main(["tokenizer", "info", str(tmp_path / "b")]) == 2
    assert "tokenizer.json: expected tokenizer metadata as JSON, got a corrupt file" in capsys.readouterr().err
