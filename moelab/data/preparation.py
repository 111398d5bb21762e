"""`prepare`: a raw corpus -> `train.bin`, `val.bin` and `meta.json`, streaming, with memory flat in the
corpus size.

    DATA_DIR/train.bin   token ids, uint16 when the vocabulary fits in it, else uint32; an end-of-document
                         (EOD) token after every document
    DATA_DIR/val.bin     the same for the validation documents
    DATA_DIR/meta.json   counts, dtype, tokenizer fingerprint, bytes per token, every source file with its
                         token range in each split
    DATA_DIR/tokenizer/  the tokenizer that made the ids (training copies it into the run)

Pipeline: a producer thread reads the files in order and cuts them into tasks of ~1 MB of text (whole
documents, or pieces of a large one); `multiprocessing.Pool.imap` encodes tasks in worker processes, in
order; the main thread appends each result to the split files. `Pool.imap` would read the whole corpus
ahead into its task queue, so a semaphore keeps at most a few tasks in flight: that is what keeps memory
flat. The output is identical whatever the number of workers.

The validation split is by document, never by token: document k (counted over the whole corpus, in input
order) goes to val when floor((k+1) f) > floor(k f), i.e. every (1/f)-th document. Because files are
processed in order, each source's tokens are one contiguous range in each split file (`meta.sources`).

Bits per byte: `splits.<name>.bytes_per_token` is the UTF-8 bytes of the split's documents divided by its
tokens (EOD tokens included), so bits/byte = (loss in nats per token) / ln 2 / bytes_per_token.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from moelab.data.corpus import BadFile, CorpusStats, Source, iter_pieces, report_skips, resolve_inputs, skipped_summary
from moelab.errors import UserError
from moelab.fileio import describe, warn, write_dir_atomic
from moelab.tokenizer import ByteTokenizer, Tokenizer

FORMAT = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
TASK_CHARS = 1 << 20  # text per worker task: large enough to amortise IPC, small enough to keep memory flat
AUTO_INPROCESS_BYTES = 4 << 20  # below this, starting worker processes costs more than it saves


def resolve_tokenizer(spec: Tokenizer | str | Path) -> Tokenizer:
    """A Tokenizer, a tokenizer directory, or "byte" (the built-in byte-level tokenizer)."""
    if isinstance(spec, Tokenizer):
        return spec
    if Path(spec).is_dir():
        return Tokenizer.load(spec)
    if str(spec) == "byte":
        return ByteTokenizer()
    raise UserError(
        f"{spec}: expected a tokenizer directory (from `moelab tokenizer train`) or 'byte', got {describe(Path(spec))}"
    )


def is_val(k: int, val_fraction: float) -> bool:
    return math.floor((k + 1) * val_fraction) > math.floor(k * val_fraction)


# ------------------------------------------------------------------------------------------------------
# Worker side

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it terminates us)
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode_in_worker(task):
    return encode_task(_worker_tokenizer, task)


def encode_task(tok: Tokenizer, task) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int, int]]]:
    """Encode one task (texts, ends_document flags, split per text, source index per text) into the train
    tokens, the val tokens and a summary [(source, split, tokens, bytes, documents)] in text order."""
    texts, ends, splits, srcs = task
    ids, lengths = tok.encode_array(texts, ends)
    if not any(splits):
        parts = [ids, ids[:0]]
    elif all(splits):
        parts = [ids[:0], ids]
    else:
        per_token = np.repeat(np.asarray(splits, dtype=bool), lengths)
        parts = [ids[~per_token], ids[per_token]]
    summary: dict[tuple[int, int], list[int]] = {}
    for text, end, split, src, n in zip(texts, ends, splits, srcs, lengths.tolist(), strict=True):
        rec = summary.setdefault((src, split), [0, 0, 0])
        rec[0] += n
        rec[1] += len(text) if text.isascii() else len(text.encode("utf-8"))
        rec[2] += end
    return parts[0], parts[1], [(s, sp, *v) for (s, sp), v in summary.items()]


# ------------------------------------------------------------------------------------------------------
# Producer side


def _tasks(
    sources: Sequence[Source], doc_boundary: str, text_field: str, val_fraction: float, strict: bool, stats: CorpusStats
) -> Iterator[tuple[list, list, list, list]]:
    texts, ends, splits, srcs, size = [], [], [], [], 0
    doc, split = 0, None
    for si, src in enumerate(sources):
        try:
            for text, end in iter_pieces(src, doc_boundary, text_field, strict, stats):
                if split is None:  # the first piece of a document decides where all of it goes
                    split = int(is_val(doc, val_fraction))
                texts.append(text)
                ends.append(end)
                splits.append(split)
                srcs.append(si)
                size += len(text)
                if end:
                    doc, split = doc + 1, None
                if size >= TASK_CHARS:
                    yield texts, ends, splits, srcs
                    texts, ends, splits, srcs, size = [], [], [], [], 0
        except BadFile as e:
            if strict:
                raise UserError(f"{src.path}: expected UTF-8 text, got a file that is {e}") from None
            stats.skipped.append((str(src.path), str(e)))
            if split is not None:  # only a read error after validation gets here: end the partial document
                texts.append("")
                ends.append(True)
                splits.append(split)
                srcs.append(si)
                doc, split = doc + 1, None
    if texts:
        yield texts, ends, splits, srcs


def _bounded(tasks: Iterator, in_flight: threading.Semaphore, stop: threading.Event, failure: list):
    """`tasks`, pausing while too many are in flight. Runs in Pool's task-handler thread: an exception is
    kept for the main thread (which re-raises it with its traceback), and `stop` lets Pool.terminate()
    join this thread instead of deadlocking on the semaphore."""
    try:
        for task in tasks:
            while not in_flight.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield task
    except BaseException as e:
        failure.append(e)


def _results(tokenizer_dir: Path, tasks: Iterator, workers: int) -> Iterator:
    tok = Tokenizer.load(tokenizer_dir)
    if workers <= 0:
        yield from (encode_task(tok, t) for t in tasks)
        return
    # fork starts workers in milliseconds; spawn would re-import torch (through moelab) in each of them.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    in_flight, stop, failure = threading.Semaphore(2 * workers + 1), threading.Event(), []
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
            for result in pool.imap(_encode_in_worker, _bounded(tasks, in_flight, stop, failure)):
                in_flight.release()
                yield result
    finally:
        stop.set()
    if failure:
        raise failure[0]


def default_workers(total_bytes: int) -> int:
    if total_bytes < AUTO_INPROCESS_BYTES:
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer | str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.05,
    doc_boundary: str = "file",
    text_field: str = "text",
    workers: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenize the corpus named by `inputs` (files, directories, globs, "stdlib") into `out`; returns the
    meta.json contents. `workers=None` picks in-process for small corpora, else one per core."""
    from moelab.version import __version__

    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction: expected 0 <= F < 1, got {val_fraction}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers: expected >= 0 (0 = encode in this process), got {workers}")
    tok = resolve_tokenizer(tokenizer)
    sources = resolve_inputs(inputs)
    total_bytes = sum(s.size for s in sources)
    workers = default_workers(total_bytes) if workers is None else workers
    stats = CorpusStats()
    meta: dict = {}

    def write(tmp: Path) -> None:
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        tok.write_files(tok_dir)
        # per source, per split: tokens, bytes, documents
        counts = np.zeros((len(sources), 2, 3), dtype=np.int64)
        t0, cpu0 = time.perf_counter(), time.process_time()
        tasks = _tasks(sources, doc_boundary, text_field, val_fraction, strict, stats)
        bar = None
        with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val:
            for train_ids, val_ids, summary in _results(tok_dir, tasks, workers):
                if bar is None:  # only now: tqdm starts a monitor thread, and workers are forked before that
                    bar = _progress(total_bytes, progress)
                f_train.write(memoryview(train_ids))
                f_val.write(memoryview(val_ids))
                for src, split, n_tok, n_bytes, n_docs in summary:
                    counts[src, split] += (n_tok, n_bytes, n_docs)
                bar.update(sum(s[3] for s in summary))
        if bar is not None:
            bar.close()
        timing = {
            "seconds": round(time.perf_counter() - t0, 3),
            "main_cpu_seconds": round(time.process_time() - cpu0, 3),
        }  # workers' CPU not included
        meta.update(
            _meta(sources, counts, tok, stats, inputs, val_fraction, doc_boundary, workers, timing, __version__)
        )
        _check_splits(meta, val_fraction, len(sources), stats)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    write_dir_atomic(Path(out), write, overwrite, marker=META_FILE)
    report_skips(stats)
    check_vocab_fits(Path(out), meta)
    return meta


def check_vocab_fits(data_dir: Path, meta: dict, chunk: int = 1 << 24) -> int:
    """Warn when the vocabulary is far too large for the corpus: when more than a quarter of the ids
    (and over 1000) occur at most once in the train split, their embedding rows are trained on (nearly)
    nothing and the model wastes capacity on them. Returns the number of such ids."""
    vocab, info = meta["tokenizer"]["vocab_size"], meta["splits"]["train"]
    if vocab < 1000 or not info["tokens"]:
        return 0
    tokens = np.memmap(data_dir / info["file"], dtype=np.dtype(meta["dtype"]), mode="r", shape=(info["tokens"],))
    hist = np.zeros(vocab, dtype=np.int64)
    for i in range(0, len(tokens), chunk):
        hist += np.bincount(np.asarray(tokens[i : i + chunk]), minlength=vocab)[:vocab]
    rare = int((hist <= 1).sum())
    if rare > max(1000, vocab // 4):
        common = int((hist >= 10).sum())
        warn(
            f"the tokenizer's vocabulary ({vocab:,} ids) is far too large for this corpus "
            f"({info['tokens']:,} train tokens): {rare:,} ids occur at most once and only {common:,} occur 10+ "
            f"times; retrain the tokenizer with a smaller --vocab-size (about {max(256, common):,} or less)"
        )
    return rare


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    # disable=None: off when stderr is not a terminal (logs, CI)
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="prepare",
        file=sys.stderr,
        mininterval=0.5,
        disable=None if enabled else True,
    )


def _meta(sources, counts, tok, stats, inputs, val_fraction, doc_boundary, workers, timing, version) -> dict:
    splits, source_meta = {}, [{"path": str(s.path), "input": s.input, "file_bytes": s.size} for s in sources]
    for j, name in enumerate(SPLITS):
        tokens = counts[:, j, 0]
        offsets = np.concatenate([[0], np.cumsum(tokens)[:-1]])
        for rec, off, (n_tok, n_bytes, n_docs) in zip(
            source_meta, offsets.tolist(), counts[:, j].tolist(), strict=True
        ):
            rec[name] = {"offset": off, "tokens": n_tok, "bytes": n_bytes, "documents": n_docs}
        n_tok, n_bytes, n_docs = (int(v) for v in counts[:, j].sum(axis=0))
        splits[name] = {
            "file": f"{name}.bin",
            "tokens": n_tok,
            "bytes": n_bytes,
            "documents": n_docs,
            "bytes_per_token": n_bytes / n_tok if n_tok else None,
        }
    return {
        "format": FORMAT,
        "moelab_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": tok.dtype.name,
        "tokenizer": {
            "dir": "tokenizer",
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "fingerprint": tok.fingerprint,
        },
        "doc_boundary": doc_boundary,
        "val_fraction": val_fraction,
        "inputs": [str(i) for i in inputs],
        "splits": splits,
        **timing,
        "workers": workers,
        "sources": source_meta,
        "skipped_files": [{"path": p, "reason": r} for p, r in stats.skipped],
        "skipped_lines": len(stats.bad_lines),
    }


def _check_splits(meta: dict, val_fraction: float, n_files: int, stats: CorpusStats) -> None:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    if train["tokens"] + val["tokens"] == 0:
        why = f"{skipped_summary(stats)}; the rest empty" if stats.skipped or stats.bad_lines else "all empty"
        raise UserError(f"corpus: expected some text, got none ({n_files} file(s); {why})")
    docs = train["documents"] + val["documents"]
    if val_fraction > 0 and val["documents"] == 0:
        raise UserError(
            f"--val-fraction: the corpus has {docs} document(s), too few to hold out {val_fraction:g} "
            f"of them (validation is split by document; it needs at least "
            f"{math.ceil(1 / val_fraction - 1e-9)} documents): add documents, use --doc-boundary "
            "line|blank, or pass --val-fraction 0"
        )
    if train["documents"] == 0:
        raise UserError(f"--val-fraction: every document went to validation ({docs} document(s)); lower --val-fraction")
