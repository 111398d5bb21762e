import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.data.corpus import stdlib_files
from moelab.errors import UserError
from moelab.tokenizer import EOD, ByteTokenizer, SentencePieceTokenizer, Tokenizer, train_sentencepiece, train_tokenizer

CHINESE = ("混合专家模型把前馈网络换成许多专家，每个词元只激活其中少数几个。路由器根据隐藏状态为每个词元打分，"
           "选出得分最高的专家，再把它们的输出按权重相加。这样参数总量很大，计算量却和小模型相当。\n"
           "训练时要防止负载不均：辅助损失鼓励各专家处理相近数量的词元；容量因子限制每个专家最多接收多少词元。\n"
           "中文和English混合的文本也要能够无损往返，包括数字１２３和全角标点！")

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


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> SentencePieceTokenizer:
    texts = [f.read_text(encoding="utf-8") for f in stdlib_files()[:60]] + [CHINESE] * 20
    tok = train_sentencepiece(texts, 1200, specials=[EOD, "<|pad|>"], num_threads=2)
    return tok


def test_sentencepiece_exact_round_trip_on_tricky_text(sp_tok):
    for s in TRICKY:
        ids = sp_tok.encode(s)
        assert sp_tok.decode(ids) == s, repr(s)
        assert sp_tok.eod_id not in ids and all(0 <= i < sp_tok.vocab_size for i in ids)
    joined = "".join(TRICKY)
    assert sp_tok.decode(sp_tok.encode(joined)) == joined
    # The literal meta symbol is carried by its byte pieces, never turned into a space.
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("▁")] == ["<0xE2>", "<0x96>", "<0x81>"]


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_sentencepiece_round_trip_arbitrary_text(sp_tok, s):
    assert sp_tok.decode(sp_tok.encode(s)) == s


def test_sentencepiece_settings(sp_tok):
    assert sp_tok.special_tokens == {EOD: 1, "<|pad|>": 2}
    assert sp_tok.eod_id == 1 and sp_tok.eod_token == EOD
    ids = sp_tok.encode("hello")
    assert sp_tok.decode(ids) == "hello" and len(ids) >= 1  # no BOS/EOS added
    assert [sp_tok.id_to_piece(i) for i in sp_tok.encode("2024")] == ["2", "0", "2", "4"]  # digits split
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
    sp2, b2 = Tokenizer.load(tmp_path / "sp"), Tokenizer.load(tmp_path / "byte")
    assert isinstance(sp2, SentencePieceTokenizer) and isinstance(b2, ByteTokenizer)
    assert sp2.fingerprint == sp_tok.fingerprint and sp2.encode(CHINESE) == sp_tok.encode(CHINESE)
    assert (tmp_path / "sp" / "tokenizer.model").read_bytes() == sp_tok.model_proto
    meta = json.loads((tmp_path / "sp" / "tokenizer.json").read_text())
    assert meta["kind"] == "sentencepiece" and meta["vocab_size"] == 1200 and meta["eod_id"] == 1
    fps = {sp_tok.fingerprint, ByteTokenizer().fingerprint, ByteTokenizer([EOD, "<|pad|>"]).fingerprint}
    assert len(fps) == 3 and ByteTokenizer().fingerprint == b2.fingerprint
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


def test_training_errors_are_one_line():
    with pytest.raises(UserError, match=r"vocab_size: expected <= \d+ for this corpus") as e:
        train_sentencepiece(["tiny corpus, tiny corpus"] * 5, 5000)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"vocab_size: expected >= \d+ \(the text has more distinct characters"):
        train_sentencepiece(["".join(chr(0x4E00 + i) for i in range(600))] * 3, 400)
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
