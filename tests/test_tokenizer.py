import json
import os
import stat

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moelab
from moelab.data.corpus import stdlib_files
from moelab.data.tokenizer_training import train_sentencepiece, train_tokenizer
from moelab.errors import UserError
from moelab.tokenizer import EOD, ByteTokenizer, SentencePieceTokenizer, Tokenizer

CHINESE = (
    "混合专家模型把前馈网络换成许多专家，每个词元只激活其中少数几个。路由器根据隐藏状态为每个词元打分，"
    "选出得分最高的专家，再把它们的输出按权重相加。这样参数总量很大，计算量却和小模型相当。\n"
    "训练时要防止负载不均：辅助损失鼓励各专家处理相近数量的词元；容量因子限制每个专家最多接收多少词元。\n"
    "中文和English混合的文本也要能够无损往返，包括数字１２３和全角标点！"
)

TRICKY = [
    "",
    " ",
    "  leading spaces and trailing   ",
    "\ttabs\tinside\t\n\n\n\nfour newlines\n",
    "windows\r\nline\r\nendings\r\n\r\n",
    "中文English混合 😀🎉👨‍👩‍👧‍👦 🇨🇳 emoji sequences",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n\tpass\n",
    "▁ the SentencePiece space symbol ▁▁ itself ▁",
    "\u00a0no-break\u3000ideographic\u2009thin\u200bzero-width",
    "ｆｕｌｌｗｉｄｔｈ and e\u0301 vs é (not normalised)",
    "rare: 𠀀𪚥 \U0010fffd \x00\x01\x7f control",
    "<|endoftext|> written in the text is text",
    "12345678901234567890 3.14159",
    "line\u2028separator\u2029paragraph\x0bvtab\x0cff",
    CHINESE,
]
WHITESPACE = [
    "\t",
    "  ",
    "\n",
    "\r\n",
    "\r",
    "\n\n\n",
    " leading",
    "   three leading",
    "trailing \n",
    "  both  ",
    "\ttab first",
    "mixed \t \t runs",
    "a\r\n\r\nb\r\n",
    " \n \n",
    "   \n\t\n",
    "no final newline",
    "ends with newline\n",
    "ends with two\n\n",
    "\n\nstarts with two",
    "trailing tab\t\n",
    "    ",
]
# One document mixing everything: Chinese, English, emoji, code, CRLF, tabs, runs of spaces, digits.
MIXED = (
    "# 路由 router: top-k\r\n"
    "def route(x, k=2):  \t# 选出得分最高的 k 个专家 🚀\n"
    "    scores = x @ W_gate   # [N, E]\n"
    "\treturn scores.topk(k)  \n"
    "\n"
    "  中文English混合 2024年3月 😀🎉  \r\n"
    "   trailing spaces   \n"
)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> SentencePieceTokenizer:
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files()[:60]] + [CHINESE] * 20
    tok = train_sentencepiece(texts, 1200, specials=[EOD, "<|pad|>"], num_threads=2)
    return tok


def test_sentencepiece_exact_round_trip_on_tricky_text(sp_tok):
    cases = TRICKY + WHITESPACE + [MIXED] + [a + b for a in WHITESPACE for b in WHITESPACE[:6]]
    for s in cases:
        ids = sp_tok.encode(s)
        assert sp_tok.decode(ids) == s, repr(s)
        assert sp_tok.eod_id not in ids and all(0 <= i < sp_tok.vocab_size for i in ids)
    joined = "".join(TRICKY + WHITESPACE + [MIXED])
    assert sp_tok.decode(sp_tok.encode(joined)) == joined
    # A real model, not byte fallback everywhere: CJK characters seen in training are single pieces,
    # indentation is one piece, code compresses; emoji never seen fall back to their UTF-8 bytes.
    assert not any(sp_tok._sp.is_byte(i) for i in sp_tok.encode("路由选出得分最高专家中文混合"))
    assert len(sp_tok.encode("    ")) == 1 and len(sp_tok.encode("        ")) == 1
    assert len(sp_tok.encode(MIXED)) < 0.75 * len(MIXED.encode("utf-8"))
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("🚀")] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]
    # The literal meta symbol is carried by its byte pieces, never turned into a space.
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("▁")] == ["<0xE2>", "<0x96>", "<0x81>"]


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_sentencepiece_round_trip_arbitrary_text(sp_tok, s):
    assert sp_tok.decode(sp_tok.encode(s)) == s


def test_sentencepiece_settings(sp_tok):
    assert sp_tok.special_tokens == {EOD: 1, "<|pad|>": 2}
    assert sp_tok.eod_id == 1 and sp_tok.eod_token == EOD
    # No BOS/EOS: the model has no BOS, and encoding adds nothing around the text.
    assert sp_tok._sp.bos_id() == -1 and sp_tok.encode("") == []
    ids = sp_tok.encode("hello")
    assert sp_tok.decode(ids) == "hello" and not set(ids) & set(sp_tok.special_tokens.values())
    assert sp_tok.encode("hello") + sp_tok.encode("\n") == sp_tok.encode("hello\n")
    # Digits split: every ASCII digit is its own piece, inside words too, and no learned piece holds two.
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("2024")] == ["2", "0", "2", "4"]
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("x1024y")] == ["x", "1", "0", "2", "4", "y"]
    learned = [
        sp_tok.id_to_piece(i)
        for i in range(sp_tok.vocab_size)
        if not sp_tok._sp.is_byte(i) and not sp_tok._sp.is_control(i)
    ]
    assert not [p for p in learned if sum(c in "0123456789" for c in p) > 1]
    assert sp_tok.encode_batch(TRICKY) == [sp_tok.encode(s) for s in TRICKY]
    # Specials render as text on decode (or are dropped); a padded embedding's ids decode to U+FFFD.
    assert sp_tok.decode(sp_tok.encode("a") + [sp_tok.eod_id] + sp_tok.encode("b")) == f"a{EOD}b"
    assert sp_tok.decode(sp_tok.encode("a") + [sp_tok.eod_id, 2], skip_special=True) == "a"
    assert sp_tok.decode([sp_tok.vocab_size + 5]) == "\ufffd"
    assert sp_tok.dtype == np.uint16
    # No piece spans a line end (training splits words there), so line-by-line encoding loses nothing.
    pieces = [sp_tok.id_to_piece(i) for i in range(sp_tok.vocab_size)]
    assert any(p.endswith("\n") and len(p) > 1 for p in pieces) and not any("\n" in p[:-1] for p in pieces)
    doc = "".join(TRICKY)
    cut = doc.index("\n", len(doc) // 2) + 1
    assert sp_tok.encode(doc) == sp_tok.encode(doc[:cut]) + sp_tok.encode(doc[cut:])


def test_unigram_with_partial_character_coverage_round_trips():
    # Unigram, and characters outside the coverage: those go through byte fallback, still exact.
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files()[:15]] + [CHINESE] * 5
    tok = train_sentencepiece(texts, 700, model_type="unigram", character_coverage=0.9995, num_threads=2)
    assert tok.training["model_type"] == "unigram" and tok.vocab_size == 700 and tok.eod_id == 1
    for s in TRICKY + WHITESPACE + [MIXED]:
        assert tok.decode(tok.encode(s)) == s, repr(s)
    assert [tok.id_to_piece(i) for i in tok.encode("x1024y")][1:5] == ["1", "0", "2", "4"]


def test_encode_array_appends_eod_where_asked(sp_tok):
    for tok in (sp_tok, ByteTokenizer()):
        texts = ["one", "", "три 三"]
        arr, lengths = tok.encode_array(texts, [True, True, False])
        assert arr.dtype == tok.dtype and lengths.sum() == len(arr)
        expected = tok.encode("one") + [tok.eod_id] + [tok.eod_id] + tok.encode("три 三")
        assert arr.tolist() == expected
        assert lengths.tolist() == [len(tok.encode("one")) + 1, 1, len(tok.encode("три 三"))]


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_byte_tokenizer_round_trip(a, b):
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eod_id == 256
    ids = tok.encode(a)
    assert ids == list(a.encode("utf-8")) and tok.decode(ids) == a
    assert tok.decode(tok.encode(a) + [tok.eod_id] + tok.encode(b)) == a + EOD + b
    arr, lengths = tok.encode_array([a, b], [True, False])
    assert arr.tolist() == tok.encode(a) + [256] + tok.encode(b)


def test_save_load_fingerprint(sp_tok, tmp_path):
    sp_tok.save(tmp_path / "sp")
    ByteTokenizer().save(tmp_path / "byte")
    assert moelab.Tokenizer is Tokenizer  # the public API: from moelab import Tokenizer
    sp2, b2 = moelab.Tokenizer.load(tmp_path / "sp"), moelab.Tokenizer.load(tmp_path / "byte")
    assert sp2.decode(sp2.encode(MIXED)) == MIXED and sp2.encode_batch([MIXED, ""]) == [sp_tok.encode(MIXED), []]
    assert isinstance(sp2, SentencePieceTokenizer) and isinstance(b2, ByteTokenizer)
    assert sp2.fingerprint == sp_tok.fingerprint and sp2.encode(CHINESE) == sp_tok.encode(CHINESE)
    assert (tmp_path / "sp" / "tokenizer.model").read_bytes() == sp_tok.model_proto
    meta = json.loads((tmp_path / "sp" / "tokenizer.json").read_text())
    assert meta["kind"] == "sentencepiece" and meta["vocab_size"] == 1200 and meta["eod_id"] == 1
    fps = {sp_tok.fingerprint, ByteTokenizer().fingerprint, ByteTokenizer([EOD, "<|pad|>"]).fingerprint}
    assert len(fps) == 3 and ByteTokenizer().fingerprint == b2.fingerprint
    # Stable across versions and machines: datasets and checkpoints made earlier must still be accepted.
    assert ByteTokenizer().fingerprint == "9df76b6094cf2ebb18efff7955d5073ef1d5961336d3c1b8c8819cd8ee80f0fa"
    with pytest.raises(UserError, match="already exists"):
        ByteTokenizer().save(tmp_path / "byte")


def test_load_refuses_modified_or_corrupt(sp_tok, tmp_path):
    d = sp_tok.save(tmp_path / "sp")
    other = train_sentencepiece([CHINESE * 3, "hello world " * 50], 400, specials=[EOD, "<|pad|>"])
    (d / "tokenizer.model").write_bytes(other.model_proto)
    with pytest.raises(UserError, match="fingerprint: expected .* modified after it was saved"):
        Tokenizer.load(d)
    (d / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="expected a SentencePiece model"):
        Tokenizer.load(d)
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match=r"tokenizer\.json: expected tokenizer metadata as JSON, got a corrupt"):
        Tokenizer.load(d)
    with pytest.raises(UserError, match="expected a tokenizer directory"):
        Tokenizer.load(tmp_path / "missing")


def _edit(path, **fields):
    """Set fields of a JSON file; ... deletes one."""
    meta = json.loads(path.read_text())
    for k, v in fields.items():
        if v is ...:
            del meta[k]
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["sentencepiece", "byte"])
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"format": 2}, "format: expected 1, got 2"),
        ({"kind": "wordpiece"}, "kind: expected one of sentencepiece, byte, got 'wordpiece'"),
        ({"special_tokens": ["<|endoftext|>"]}, "special_tokens: expected a non-empty object, got ['<|endoftext|>']"),
        ({"special_tokens": {"<a b>": 1}}, "special_tokens: expected non-empty tokens without whitespace, got '<a b>'"),
        ({"special_tokens": {EOD: 7}}, "special_tokens: expected the ids the model gives them"),
        ({"fingerprint": ...}, "fingerprint: expected a sha256 hex string, got None"),
        ({"fingerprint": "0" * 64}, f"fingerprint: expected {'0' * 64} (recorded), got "),
        ({"vocab_size": 5}, "vocab_size: expected "),
    ],
)
def test_load_names_the_bad_field(sp_tok, tmp_path, kind, fields, message):
    d = (sp_tok if kind == "sentencepiece" else ByteTokenizer()).save(tmp_path / "tok")
    _edit(d / "tokenizer.json", **fields)
    with pytest.raises(UserError) as e:
        Tokenizer.load(d)
    assert str(e.value).startswith(f"{d / 'tokenizer.json'}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_save_is_atomic(sp_tok, tmp_path, monkeypatch):
    umask = os.umask(0o022)
    os.umask(umask)
    d = ByteTokenizer().save(tmp_path / "tok")
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask  # not the 0700 of a private temp dir
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def interrupted(self, directory):
        (directory / "tokenizer.model").write_bytes(self._model_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(SentencePieceTokenizer, "write_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sp_tok.save(tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        sp_tok.save(tmp_path / "tok", overwrite=True)
    # Nothing half-written under the final names: no new directory, the old one untouched, no temporaries.
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert Tokenizer.load(d).fingerprint == ByteTokenizer().fingerprint


def test_training_errors_are_one_line():
    with pytest.raises(UserError, match=r"vocab_size: expected <= \d+ for this corpus") as e:
        train_sentencepiece(["tiny corpus, tiny corpus"] * 5, 5000)
    assert "\n" not in str(e.value)
    cjk = ["".join(chr(0x4E00 + i) for i in range(600))] * 3
    with pytest.raises(UserError, match=r"vocab_size: expected >= \d+ \(the text has more distinct characters") as e:
        train_sentencepiece(cjk, 400)
    minimum = int(str(e.value).split(">= ")[1].split()[0])
    assert train_sentencepiece(cjk, minimum, num_threads=1).vocab_size == minimum  # the bound is exact
    with pytest.raises(UserError, match=rf"vocab_size: expected >= {minimum} "):
        train_sentencepiece(cjk, minimum - 1, num_threads=1)
    # Settings SentencePiece would reject with an internal assertion are refused before any text is read.
    never = iter(())  # consumed only by training
    for kwargs, pattern in [
        ({"character_coverage": 0.95}, r"character_coverage: expected 0\.98 <= value <= 1\.0"),
        ({"model_type": "wordpiece"}, "model_type: expected bpe or unigram, got 'wordpiece'"),
        ({"num_threads": -1}, r"num_threads \(--threads\): expected 1 <= N <= 1024, got -1"),
        ({"vocab_size": 0}, r"vocab_size: expected >= 259 .*, got 0"),
    ]:
        with pytest.raises(UserError, match=pattern):
            train_sentencepiece(never, **{"vocab_size": 1000, **kwargs})
    with pytest.raises(UserError, match=r"vocab_size: expected >= 259 \(256 byte pieces"):
        train_sentencepiece(["abc"], 100)
    with pytest.raises(UserError, match="corpus: expected some text"):
        train_sentencepiece([], 1000)
    with pytest.raises(UserError, match="specials: expected non-empty tokens without whitespace"):
        ByteTokenizer([EOD, "<a b>"])


def test_train_tokenizer_samples_large_corpora(tmp_path):
    # 2.5 MB of files, a 0.6 MB budget: only sampled 1 MB blocks (whole lines) are read.
    files = []
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz专家路由词元"))
    words = np.array(["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(3000)])
    for i in range(5):
        p = tmp_path / f"part{i}.txt"
        p.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(7000)) + "\n", encoding="utf-8")
        files.append(str(p))
    tok = train_tokenizer(files, tmp_path / "tok", 600, sample_mb=0.6, seed=3)
    t = tok.training
    assert t["corpus_bytes"] > 2_000_000 and 300_000 < t["bytes_seen"] <= 1_100_000
    assert Tokenizer.load(tmp_path / "tok").fingerprint == tok.fingerprint


def test_tokenizer_trains_on_a_sampled_corpus_of_one_very_long_line(tmp_path):
    """Sampled 1 MB blocks used to be cut to whole lines: inside one long line nothing was left, and
    training said `expected some text to train on, got none`."""
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "délta", "εψιλον", "zeta", "日本語", "eta"]
    (tmp_path / "one.txt").write_text(" ".join(rng.choice(words) for _ in range(400_000)), encoding="utf-8")
    tok = train_tokenizer([str(tmp_path / "one.txt")], tmp_path / "tok", 300, sample_mb=1.0)
    assert tok.training["bytes_seen"] > 1_000_000
    assert tok.decode(tok.encode("gamma délta 日本語")) == "gamma délta 日本語"


def test_sentencepiece_byte_lengths_add_up_to_the_text(sp_tok):
    """What bits per byte divides by: the bytes a window of ids stands for (issue 19)."""
    lengths = sp_tok.byte_lengths()
    for text in ("def f(x):\n    return x + 1\n", "héllo wörld ▁ 你好\n"):
        assert int(lengths[sp_tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert all(lengths[i] == 0 for i in sp_tok.special_tokens.values())
