import errno
import json
import multiprocessing
import os
import re
import signal
import stat
import threading

import numpy as np
import pytest
import torch

from moelab.config import DataConfig
from moelab.data import TokenDataset, load_meta, prepare, resolve_inputs, stdlib_files
from moelab.data import corpus as corpus_mod
from moelab.data import preparation as prepare_mod
from moelab.data.tokenizer_training import train_sentencepiece
from moelab.errors import UserError
from moelab.tokenizer import EOD, ByteTokenizer, Tokenizer

BYTE = ByteTokenizer()


def _docs(n: int) -> list[str]:
    return [f"document {i}: " + "中文 text ✓ " * (i % 7 + 1) + f"end of {i}." for i in range(n)]


def _split_docs(data_dir, split, tok=BYTE) -> list[str]:
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=load_meta(data_dir)["dtype"])
    text = tok.decode(ids.tolist())
    assert text.endswith(EOD) or not text
    return text.split(EOD)[:-1]


@pytest.fixture
def line_data(tmp_path):
    """Three files of one-document-per-line text, prepared with the byte tokenizer."""
    docs = _docs(90)
    for j in range(3):
        (tmp_path / f"f{j}.txt").write_text("\n".join(docs[30 * j : 30 * (j + 1)]) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    prepare([str(tmp_path / "f*.txt")], "byte", out, val_fraction=0.1, doc_boundary="line", workers=0)
    return out, docs


def test_train_val_disjoint_documents_and_offsets(line_data):
    out, docs = line_data
    meta = load_meta(out)
    train, val = _split_docs(out, "train"), _split_docs(out, "val")
    assert set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)
    assert len(val) == 9 and val == [docs[k] for k in range(9, 90, 10)]  # every 10th document
    for split in ("train", "val"):
        s = meta["splits"][split]
        assert s["tokens"] * 2 == (out / s["file"]).stat().st_size and meta["dtype"] == "uint16"
        assert s["bytes"] == sum(len(d.encode()) for d in (train if split == "train" else val))
        assert s["bytes_per_token"] == s["bytes"] / s["tokens"]
        # Offsets: contiguous, in source order, adding up to the totals; each range holds that file's docs.
        ids = np.fromfile(out / s["file"], dtype=np.uint16)
        pos = 0
        for j, src in enumerate(meta["sources"]):
            r = src[split]
            assert r["offset"] == pos
            pos += r["tokens"]
            text = BYTE.decode(ids[r["offset"] : r["offset"] + r["tokens"]].tolist())
            assert text.split(EOD)[:-1] == [d for d in docs[30 * j : 30 * (j + 1)] if d in set(text.split(EOD))]
            assert r["documents"] == text.count(EOD)
        assert pos == s["tokens"] and sum(x[split]["documents"] for x in meta["sources"]) == s["documents"]
    assert meta["tokenizer"]["fingerprint"] == BYTE.fingerprint
    assert Tokenizer.load(out / "tokenizer").fingerprint == BYTE.fingerprint


def test_workers_give_identical_output(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "TASK_CHARS", 2000)  # many tasks, so order across workers matters
    (tmp_path / "in").mkdir()
    for j, d in enumerate(_docs(60)):
        (tmp_path / "in" / f"{j:03d}.txt").write_text(d * 20, encoding="utf-8")
    prepare([tmp_path / "in"], "byte", tmp_path / "a", workers=0)
    prepare([tmp_path / "in"], "byte", tmp_path / "b", workers=2)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    a, b = load_meta(tmp_path / "a"), load_meta(tmp_path / "b")
    assert a["sources"] == b["sources"] and a["splits"] == b["splits"]


def test_sentencepiece_prepare_on_stdlib_subset(tmp_path):
    files = [str(f) for f in stdlib_files()[:40]]
    tok = train_sentencepiece([open(f, encoding="utf-8").read() for f in files], 800)
    meta = prepare(files, tok, tmp_path / "d", val_fraction=0.1, workers=2)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 800
    assert 2.0 < meta["splits"]["train"]["bytes_per_token"] < 6.0
    texts = [open(f, encoding="utf-8").read() for f in files]
    docs = _split_docs(tmp_path / "d", "train", tok) + _split_docs(tmp_path / "d", "val", tok)
    assert sorted(docs) == sorted(t for t in texts if t)  # exact text, documents intact


def test_large_documents_are_streamed_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "PIECE", 1000)
    monkeypatch.setattr(corpus_mod, "BLOCK", 700)
    monkeypatch.setattr(corpus_mod, "SMALL_FILE", 2000)  # the two-pass reader for "large" files
    big = "".join(f"line {i} 汉字 {'x' * (i % 50)}\n" for i in range(500)) + "y" * 3000  # and a line > PIECE
    (tmp_path / "big.txt").write_text(big, encoding="utf-8")
    (tmp_path / "para.txt").write_text("p1 a\np1 b\n\n\n  \np2\n" + "z" * 2500 + "\n\np3", encoding="utf-8")
    prepare([tmp_path / "big.txt"], "byte", tmp_path / "d1", val_fraction=0, workers=0)
    assert _split_docs(tmp_path / "d1", "train") == [big]
    prepare([tmp_path / "para.txt"], "byte", tmp_path / "d2", val_fraction=0, doc_boundary="blank", workers=0)
    assert _split_docs(tmp_path / "d2", "train") == ["p1 a\np1 b", "p2\n" + "z" * 2500, "p3"]


def test_bad_files_skipped_or_strict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus_mod, "SMALL_FILE", 1000)
    monkeypatch.setattr(corpus_mod, "BLOCK", 256)
    good = "\n".join(_docs(40))
    (tmp_path / "a_good.txt").write_text(good, encoding="utf-8")
    (tmp_path / "b_latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "c_binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    (tmp_path / "d_late_bad.txt").write_bytes(("ok line\n" * 300).encode() + b"\xff\xfe bad tail")
    meta = prepare([tmp_path], "byte", tmp_path / "out", workers=0, val_fraction=0)
    skipped = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in meta["skipped_files"]}
    assert set(skipped) == {"b_latin1.txt", "c_binary.bin", "d_late_bad.txt"}
    assert skipped["c_binary.bin"].startswith("binary") and "offset 2400" in skipped["d_late_bad.txt"]
    assert _split_docs(tmp_path / "out", "train") == [good]  # nothing of the late-bad file leaked in
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped 3 file(s) that are not UTF-8 text" in err
    with pytest.raises(UserError, match=r"b_latin1\.txt: expected UTF-8 text, got a file that is not UTF-8"):
        prepare([tmp_path], "byte", tmp_path / "out2", workers=0, strict=True)
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2.tmp-*"))


def test_jsonl_documents(tmp_path, capsys):
    lines = [json.dumps({"text": d, "id": i}, ensure_ascii=False) for i, d in enumerate(_docs(20))]
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:10] + ["{oops", '{"other": 1}'] + lines[10:]) + "\n")
    meta = prepare([tmp_path / "c.jsonl"], "byte", tmp_path / "d", val_fraction=0.1, workers=0)
    assert sorted(_split_docs(tmp_path / "d", "train") + _split_docs(tmp_path / "d", "val")) == sorted(_docs(20))
    assert meta["skipped_lines"] == 2 and "skipped 2 JSONL line(s)" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"c\.jsonl:11: "):
        prepare([tmp_path / "c.jsonl"], "byte", tmp_path / "d2", workers=0, strict=True)


def test_input_and_output_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("a single document")
    cases = [
        (([tmp_path / "missing.txt"], "byte"), r"missing\.txt: expected a file, directory, glob or 'stdlib'"),
        (([str(tmp_path / "*.md")], "byte"), r"\*\.md: expected files matching this pattern, got none"),
        (([tmp_path / "empty.txt"], "byte"), "corpus: expected some text, got none"),
        (([tmp_path / "one.txt"], "byte"), r"--val-fraction: the corpus has 1 document\(s\), too few"),
        (([tmp_path / "one.txt"], tmp_path / "nope"), "nope: expected a tokenizer directory"),
    ]
    for (inputs, tok), pattern in cases:
        with pytest.raises(UserError, match=pattern):
            prepare(inputs, tok, tmp_path / "out", workers=0)
    prepare([tmp_path / "one.txt"], "byte", tmp_path / "out", val_fraction=0, workers=0)
    with pytest.raises(UserError, match="already exists"):
        prepare([tmp_path / "one.txt"], "byte", tmp_path / "out", val_fraction=0)
    prepare([tmp_path / "one.txt"], "byte", tmp_path / "out", val_fraction=0, overwrite=True, workers=0)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="refusing to replace it"):
        prepare([tmp_path / "one.txt"], "byte", tmp_path / "precious", val_fraction=0, overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_stdlib_input_is_library_code():
    sources = resolve_inputs(["stdlib"])
    names = {s.path.name for s in sources}
    assert {"os.py", "argparse.py", "__init__.py"} <= names and len(sources) > 300
    assert not any({"site-packages", "test", "tests"} & set(s.path.parts) for s in sources)
    assert all(s.input == "stdlib" and s.path.suffix == ".py" for s in sources)


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    big = ByteTokenizer([EOD] + [f"<s{i}>" for i in range(65300)])
    (tmp_path / "a.txt").write_text("hello")
    meta = prepare([tmp_path / "a.txt"], big, tmp_path / "d", val_fraction=0, workers=0)
    assert meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "d" / "train.bin", np.uint32).tolist() == list(b"hello") + [256]


def test_in_flight_tasks_are_bounded(tmp_path):
    # Pool.imap alone would pull all 200 tasks into its queue at once; memory stays flat only if the
    # producer is held back to a few tasks ahead of the consumer.
    BYTE.save(tmp_path / "tok")
    produced = []
    lock = threading.Lock()

    def tasks():
        for i in range(200):
            with lock:
                produced.append(i)
            yield ["x" * 100], [True], [0], [0]

    ahead = []
    for i, _ in enumerate(prepare_mod._results(tmp_path / "tok", tasks(), workers=2)):
        with lock:
            ahead.append(len(produced) - (i + 1))
    assert len(produced) == 200 and max(ahead) <= 2 * 2 + 2


# ------------------------------------------------------------------------------------------------------
# TokenDataset


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for j in range(40):
        (tmp_path / f"{j:02d}.txt").write_text("".join(rng.choice(list("abcdefgh \n"), 300)), encoding="utf-8")
    prepare([tmp_path], "byte", tmp_path / "d", val_fraction=0.1, workers=0)
    return tmp_path / "d"


def _stream(d, split="train"):
    return np.fromfile(d / f"{split}.bin", dtype=np.uint16).astype(np.int64)


def test_batches_are_shifted_windows(data_dir):
    ds = TokenDataset(data_dir, "train", seq_len=32, seed=1)
    assert isinstance(ds.tokens, np.memmap)  # read from disk on demand, never loaded whole
    stream = _stream(data_dir)
    windows = np.lib.stride_tricks.sliding_window_view(stream, 33)
    x, y = ds.get_batch(16)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in torch.cat([x, y[:, -1:]], 1).numpy():
        assert (windows == row).all(axis=1).any()  # a real window of the split, x then its next token


def test_stride_epochs_visit_every_window_once(data_dir):
    ds = TokenDataset(data_dir, "train", seq_len=20, stride=8, seed=3)
    stream, n = _stream(data_dir), ds.num_windows
    assert n == (len(stream) - 21) // 8 + 1
    firsts = []
    for _ in range(2):
        starts = []
        for _ in range(n // 7):
            x, _ = ds.get_batch(7)
            starts += [
                int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 20)[::8] == r).all(1))[0])
                for r in x.numpy()
            ]
        x, _ = ds.get_batch(n % 7) if n % 7 else (None, None)
        if x is not None:
            starts += [
                int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 20)[::8] == r).all(1))[0])
                for r in x.numpy()
            ]
        assert sorted(starts) == list(range(n))
        firsts.append(starts)
    assert firsts[0] != firsts[1] and ds.epoch == 2.0  # a new order each epoch
    again = TokenDataset(data_dir, "train", seq_len=20, stride=8, seed=3)  # deterministic: same seed, same order
    replay = TokenDataset(data_dir, "train", seq_len=20, stride=8, seed=3)
    assert all(torch.equal(again.get_batch(7)[0], replay.get_batch(7)[0]) for _ in range(n // 7 + 2))


@pytest.mark.parametrize("stride", [None, 5])
def test_restored_sampler_yields_same_batches(data_dir, stride):
    a = TokenDataset(data_dir, "train", seq_len=16, stride=stride, seed=7)
    for _ in range(3):
        a.get_batch(50)  # crosses epoch boundaries in stride mode
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.get_batch(50) for _ in range(4)]
    b = TokenDataset(data_dir, "train", seq_len=16, stride=stride, seed=7)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.get_batch(50) for _ in range(4)], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    c = TokenDataset(data_dir, "train", seq_len=16, stride=stride, seed=8)
    with pytest.raises(UserError, match="data sampler state: seed: expected 8"):
        c.load_state_dict(state)


def test_iter_val_walks_non_overlapping_windows(data_dir):
    ds = TokenDataset(data_dir, "val", seq_len=24)
    stream = _stream(data_dir, "val")
    xs, ys = zip(*ds.iter_val(batch_size=5), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    k = (len(stream) - 1) // 24
    assert len(x) == k == ds.num_val_windows()
    assert torch.equal(x.flatten(), torch.from_numpy(stream[: k * 24]))
    assert torch.equal(y.flatten(), torch.from_numpy(stream[1 : k * 24 + 1]))
    assert len(list(ds.iter_val(batch_size=2, max_batches=3))) == 3


def test_dataset_identity_and_errors(data_dir, tmp_path):
    ds = TokenDataset.from_config(DataConfig(path=str(data_dir), seq_len=8, stride=4), "train", seed=2)
    assert (ds.seq_len, ds.stride, ds.seed, ds.num_windows) == (8, 4, 2, (len(ds) - 9) // 4 + 1)
    assert ds.fingerprint == BYTE.fingerprint and ds.load_tokenizer().fingerprint == BYTE.fingerprint
    ds.check_tokenizer(ByteTokenizer())
    with pytest.raises(UserError, match="tokenizer mismatch: the data was prepared with tokenizer"):
        ds.check_tokenizer(ByteTokenizer([EOD, "<|pad|>"]))
    with pytest.raises(UserError, match=r"model.vocab_size: expected >= 257"):
        ds.check_vocab(200)
    with pytest.raises(UserError, match=r"expected at least seq_len \+ 1"):
        TokenDataset(data_dir, "val", seq_len=10**6)
    meta = json.loads((data_dir / "meta.json").read_text())
    with open(data_dir / "train.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(UserError, match="train.bin: expected .* tokens .* got 100 bytes"):
        TokenDataset(data_dir, "train", seq_len=8)
    (data_dir / "meta.json").write_text(json.dumps({**meta, "dtype": "int8"}))
    with pytest.raises(UserError, match=r"meta\.json: dtype: expected uint16 or uint32, got 'int8'"):
        TokenDataset(data_dir, "train")
    (data_dir / "meta.json").write_text('{"format": 1, "splits": ')
    with pytest.raises(UserError, match=r"meta\.json: expected dataset metadata as JSON, got a corrupt file"):
        TokenDataset(data_dir, "train")
    with pytest.raises(UserError, match="expected a dataset directory written by `moelab prepare`"):
        TokenDataset(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format", 2, "format: expected 1, got 2"),
        ("dtype", ..., "dtype: expected uint16 or uint32, got None"),
        ("tokenizer", "byte", "tokenizer: expected an object, got 'byte'"),
        ("tokenizer.fingerprint", 5, "tokenizer.fingerprint: expected a string, got 5"),
        ("tokenizer.vocab_size", True, "tokenizer.vocab_size: expected a positive integer, got True"),
        ("tokenizer.vocab_size", 70000, "tokenizer.vocab_size: expected <= 65536 for dtype uint16, got 70000"),
        ("tokenizer.dir", "../elsewhere", "tokenizer.dir: expected a directory name inside the dataset"),
        ("splits", [], "splits: expected an object, got []"),
        ("splits.val", ..., "splits.val: expected an object, got None"),
        ("splits.train.tokens", "12", "splits.train.tokens: expected a count >= 0, got '12'"),
        ("splits.train.file", "/etc/passwd", "splits.train.file: expected a file name, got '/etc/passwd'"),
        ("splits.val.bytes_per_token", "x", "splits.val.bytes_per_token: expected a positive number, got 'x'"),
        ("splits.train.bytes_per_token", ..., "splits.train.bytes_per_token: expected a positive number, got None"),
        ("sources", {}, "sources: expected a list of source files, got {}"),
        ("sources.0", 1, "sources[0]: expected an object, got 1"),
        ("sources.0.path", None, "sources[0].path: expected a string, got None"),
        ("sources.2.val", ..., "sources[2].val: expected an object, got None"),
        ("sources.0.train.offset", -1, "sources[0].train.offset: expected a count >= 0, got -1"),
        ("sources.1.train.offset", 0, "sources[1].train.offset: expected "),
        ("sources.39.train.tokens", 10**6, "sources: expected train ranges adding up to splits.train.tokens = "),
    ],
)
def test_corrupt_meta_names_the_field(data_dir, field, value, message):
    path = data_dir / "meta.json"
    meta = json.loads(path.read_text())
    *parents, last = field.split(".")
    node = meta
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[last]
    else:
        node[last] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        TokenDataset(data_dir, "train", seq_len=8)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------------
# Atomic output: a dataset directory exists only once it is complete


def _interrupt_on_task(monkeypatch, n: int, action) -> None:
    real, calls = prepare_mod.encode_task, []

    def encode(tok, task):
        calls.append(1)
        if len(calls) == n:  # the n-th task of each prepare
            calls.clear()
            action()
        return real(tok, task)

    monkeypatch.setattr(prepare_mod, "TASK_CHARS", 500)  # several tasks, so the interruption is mid-write
    monkeypatch.setattr(prepare_mod, "encode_task", encode)


def _snapshot(d):
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def test_interrupted_prepare_leaves_no_partial_dataset(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    for j, d in enumerate(_docs(60)):
        (tmp_path / "in" / f"{j:03d}.txt").write_text(d * 5, encoding="utf-8")
    prepare([tmp_path / "in"], "byte", tmp_path / "old", workers=0)
    before = _snapshot(tmp_path / "old")

    def interrupt():
        assert not (tmp_path / "new").exists()  # nothing under the final name while writing
        raise KeyboardInterrupt

    _interrupt_on_task(monkeypatch, 3, interrupt)
    for out, overwrite in ((tmp_path / "new", False), (tmp_path / "old", True)):
        with pytest.raises(KeyboardInterrupt):
            prepare([tmp_path / "in"], "byte", out, workers=0, overwrite=overwrite)
    assert not (tmp_path / "new").exists() and _snapshot(tmp_path / "old") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "old"]  # temporaries cleaned up

    # kill -9 mid-write (in a forked child): the temporary is left behind, the old dataset stays whole.
    _interrupt_on_task(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGKILL))
    child = multiprocessing.get_context("fork").Process(
        target=prepare, args=([tmp_path / "in"], "byte", tmp_path / "old"), kwargs={"workers": 0, "overwrite": True}
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert _snapshot(tmp_path / "old") == before and load_meta(tmp_path / "old")
    (left,) = tmp_path.glob(".old.tmp-*")
    assert (left / "train.bin").exists() and not (left / "meta.json").exists()
    assert left.name.startswith(f".old.tmp-{child.pid}-")

    # The next write deletes the killed writer's leftover, but not a live writer's (the parent's PID here).
    live = tmp_path / f".old.tmp-{os.getppid()}-0123abcd"
    live.mkdir()
    monkeypatch.undo()
    prepare([tmp_path / "in"], "byte", tmp_path / "old", workers=0, overwrite=True)
    assert (tmp_path / "old" / "train.bin").read_bytes() == before["train.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "old", live.name])

    # Killed between the two renames of an overwrite: the old output survives only as `.old-*`, which is
    # kept while the output is missing and deleted once a write completes.
    dead = child.pid
    (tmp_path / "old").rename(tmp_path / f".old.old-{dead}-0123abcd")
    (tmp_path / f".old.tmp-{dead}-89abcdef").mkdir()
    from moelab.fileio import remove_stale_siblings

    assert remove_stale_siblings(tmp_path / "old") == [tmp_path / f".old.tmp-{dead}-89abcdef"]
    assert (tmp_path / f".old.old-{dead}-0123abcd" / "train.bin").is_file()
    prepare([tmp_path / "in"], "byte", tmp_path / "old", workers=0)
    assert remove_stale_siblings(tmp_path / "old") == [tmp_path / f".old.old-{dead}-0123abcd"]


def test_output_directory_errors_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("some text\n" * 20)
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path / "file", "expected a directory to write (or nothing), got a file"),
        (tmp_path / "file" / "sub", f"cannot create the output directory ({tmp_path}/file is not a directory)"),
    ]
    for out, message in cases:
        with pytest.raises(UserError, match=re.escape(f"{out}: {message}")):
            prepare([tmp_path / "a.txt"], "byte", out, workers=0, val_fraction=0)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "d.tmp-x" / "train.bin"))

    monkeypatch.setattr(prepare_mod, "_meta", full)
    with pytest.raises(UserError, match=r"d: writing failed \(No space left on device: .*train\.bin\)$"):
        prepare([tmp_path / "a.txt"], "byte", tmp_path / "d", workers=0, val_fraction=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "file"]


def test_output_directory_honours_umask(data_dir):
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o777 & ~umask
