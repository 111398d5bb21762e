"""`moelab bench data`: tokenizer training time, `moelab prepare` throughput and peak memory.

1. A synthetic corpus of --corpus-mb MB is generated reproducibly (seeded): files of 20-200 KB, each one
   domain — English passages (tinyshakespeare lines when ../shared/data has it, else stdlib docstrings),
   Chinese (Zipf-distributed common CJK characters with Chinese punctuation and a few English words), or
   Python code (runs of stdlib lines). The first quarter of the files go to `corpus/a/`, the rest to `b/`.
2. `moelab tokenizer train --sample-mb <tokenizer-mb>` on it, --repeats times (median).
3. The tokenizer's own speed: `encode_array` on ~4 MB of the corpus in this process, one thread (MB/s per
   core). Workers x this is the most `prepare` can reach: the tokenizer bound.
4. `moelab prepare` on a quarter of the corpus and on all of it, each as a subprocess whose RSS (main +
   workers, summed, sampled every 50 ms by psutil) is tracked; then once more with the byte tokenizer,
   whose encoding is nearly free, to show what the pipeline around the tokenizer costs.
Peak RSS that does not grow from the quarter to the full corpus is the "memory stays flat" claim.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from moelab.errors import UserError


def add_arguments(p):
    p.add_argument("--corpus-mb", type=float, default=200.0, help="synthetic corpus size (default 200)")
    p.add_argument("--tokenizer-mb", type=float, default=10.0, help="tokenizer training sample (default 10)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--workers", type=int, default=None, help="prepare workers (default: one per core)")
    p.add_argument("--repeats", type=int, default=3, help="tokenizer training repeats (median reported)")
    p.add_argument("--no-byte", action="store_true", help="skip the byte-tokenizer prepare run")
    p.add_argument("--work-dir", default=None, help="keep corpus and outputs here (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default="benchmarks/data.json", help="where to write results")


# ------------------------------------------------------------------------------------------------------
# Synthetic corpus


def _english_lines() -> list[str]:
    shakespeare = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
    if shakespeare.is_file():
        return shakespeare.read_text(encoding="utf-8").split("\n")
    import ast

    from moelab.data.corpus import stdlib_files

    lines = []
    for f in stdlib_files()[:300]:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and ast.get_docstring(node):
                lines += ast.get_docstring(node).split("\n") + [""]
    return lines


def _code_lines() -> list[str]:
    from moelab.data.corpus import stdlib_files

    lines: list[str] = []
    for f in stdlib_files():
        try:
            lines += f.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError:
            continue
    return lines


def make_corpus(root: Path, mb: float, seed: int = 0) -> dict:
    """Write the synthetic corpus under root/a and root/b; returns its composition."""
    import numpy as np

    rng = np.random.default_rng(seed)
    english, code = _english_lines(), _code_lines()
    cjk = np.array([chr(c) for c in rng.choice(np.arange(0x4E00, 0x9FA6), size=3500, replace=False)])
    zipf = 1.0 / np.arange(1, len(cjk) + 1)
    zipf /= zipf.sum()
    punct = np.array(["，", "。", "！", "？", "、", "；", "：", "“", "”"])
    words = np.array(" ".join(english).split() or ["moelab"])

    def chinese(n_chars: int) -> str:
        chars = cjk[rng.choice(len(cjk), size=n_chars, p=zipf)].astype(object)
        marks = rng.random(n_chars)
        chars[marks < 0.08] = punct[rng.integers(0, len(punct), size=int((marks < 0.08).sum()))]
        english_at = np.flatnonzero(marks > 0.995)
        chars[english_at] = [f" {w} " for w in words[rng.integers(0, len(words), size=len(english_at))]]
        newline_at = np.flatnonzero(marks > 0.985)
        chars[newline_at] = "。\n"
        return "".join(chars)

    def passage(lines: list[str], size: int) -> str:
        out, n = [], 0
        while n < size:
            start = int(rng.integers(0, max(1, len(lines) - 80)))
            chunk = "\n".join(lines[start : start + int(rng.integers(20, 80))]) + "\n\n"
            out.append(chunk)
            n += len(chunk.encode("utf-8"))
        return "".join(out)

    target, total, counts = int(mb * 1e6), 0, {"english": 0, "chinese": 0, "code": 0}
    files = []
    while total < target:
        size = int(rng.integers(20_000, 200_000))
        domain = rng.choice(["english", "english", "chinese", "code"])
        text = chinese(size // 3) if domain == "chinese" else passage(english if domain == "english" else code, size)
        data = text.encode("utf-8")
        files.append(data)
        total += len(data)
        counts[str(domain)] += len(data)
    quarter = max(1, len(files) // 4)
    for i, data in enumerate(files):
        d = root / ("a" if i < quarter else "b")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"doc-{i:05d}.txt").write_bytes(data)
    return {
        "bytes": total,
        "files": len(files),
        "bytes_by_domain": counts,
        "quarter_bytes": sum(len(f) for f in files[:quarter]),
    }


# ------------------------------------------------------------------------------------------------------
# Measuring a subprocess


def _run_measured(cmd: list[str]) -> dict:
    """Run cmd; wall seconds and peak RSS (MB) of the process tree, of the main process, of one worker."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"total": 0, "main": 0, "worker": 0, "pss_total": 0}
    main_cpu = [0.0]
    done = threading.Event()

    def sample():
        try:
            p = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            try:
                procs = [p, *p.children(recursive=True)]
                rss = [q.memory_info().rss for q in procs]
                # PSS splits pages shared after fork (torch, the tokenizer) among the processes sharing them,
                # so the sum is the tree's real footprint; the RSS sum counts shared pages once per process.
                pss = sum(q.memory_full_info().pss for q in procs)
                main_cpu[0] = sum(p.cpu_times()[:2])
            except psutil.Error:
                rss, pss = [0], 0
            peak["main"] = max(peak["main"], rss[0])
            peak["worker"] = max([peak["worker"], *rss[1:]])
            peak["total"] = max(peak["total"], sum(rss))
            peak["pss_total"] = max(peak["pss_total"], pss)
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        last = (err.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"`moelab {' '.join(cmd[3:5])}` failed with exit code {proc.returncode}: {last}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and its (waited-for) workers
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "wall_s": round(wall, 3),
        "stdout": out,
        "cpu_s": round(cpu, 2),
        "main_cpu_s": round(main_cpu[0], 2),
        "peak_pss_total_mb": round(peak.pop("pss_total") / 2**20, 1),
        **{f"peak_rss_{k}_mb": round(v / 2**20, 1) for k, v in peak.items()},
    }


def _moelab(*args: str) -> list[str]:
    return [sys.executable, "-m", "moelab", *args]


def _prepare(tokenizer: str, inputs: list[Path], out: Path, workers: int) -> dict:
    # Every file is one document: hold out 1% (a quarter of a small test corpus, none of a tiny one).
    files = sum(1 for d in inputs for _ in d.glob("*.txt"))
    val_fraction = 0.01 if files >= 200 else 0.25 if files >= 4 else 0.0
    res = _run_measured(
        _moelab(
            "prepare",
            "--tokenizer",
            tokenizer,
            "--input",
            *map(str, inputs),
            "--out",
            str(out),
            "--overwrite",
            "--quiet",
            "--val-fraction",
            f"{val_fraction:.4f}",
            "--workers",
            str(workers),
        )
    )
    meta = json.loads((out / "meta.json").read_text())
    mb = sum(s["bytes"] for s in meta["splits"].values()) / 1e6
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    res.pop("stdout")
    # Where the CPU went: the main process's pipeline work (reading, cutting, IPC, writing) is the glue;
    # the rest of the tree's CPU time (minus the main process's own, startup included) is the workers'.
    workers_cpu = res["cpu_s"] - res["main_cpu_s"]
    return {
        **res,
        "mb": round(mb, 2),
        "tokens": tokens,
        "seconds": meta["seconds"],
        "mb_per_s": round(mb / meta["seconds"], 3),
        "bytes_per_token": round(mb * 1e6 / tokens, 3),
        "glue_cpu_s": meta["main_cpu_seconds"],
        "workers_cpu_s": round(workers_cpu, 2),
        "workers_mb_per_cpu_s": round(mb / workers_cpu, 3) if workers_cpu > 0 else None,
    }


def _encode_speed(tok_dir: Path, corpus: Path, mb: float = 4.0) -> tuple[float, float]:
    """Single-thread speed of the tokenizer on whole files of the corpus, as prepare's workers run it:
    (MB per wall second, MB per CPU second). CPU seconds do not count time lost to other processes."""
    from moelab.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    files = sorted(corpus.rglob("*.txt"))
    step = max(1, len(files) // 40)  # spread over the corpus: every domain
    texts, size = [], 0
    for f in files[::step]:
        texts.append(f.read_text(encoding="utf-8"))
        size += len(texts[-1].encode("utf-8"))
        if size >= mb * 1e6:
            break
    t0, c0 = time.perf_counter(), time.process_time()
    tok.encode_array(texts, [True] * len(texts))
    return size / 1e6 / (time.perf_counter() - t0), size / 1e6 / (time.process_time() - c0)


def run_data_bench(args) -> dict:
    import sentencepiece

    from moelab.data.preparation import default_workers

    workers = args.workers if args.workers is not None else max(1, default_workers(1 << 40))
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="moelab-bench-data-")
        work = Path(tmp.name)
    try:
        corpus = work / "corpus"
        t0 = time.perf_counter()
        if (corpus / "composition.json").is_file():
            composition = json.loads((corpus / "composition.json").read_text())
        else:
            composition = make_corpus(corpus, args.corpus_mb, args.seed)
            (corpus / "composition.json").write_text(json.dumps(composition))
        print(
            f"corpus: {composition['bytes'] / 1e6:.1f} MB in {composition['files']} files "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        inputs = [corpus / "a", corpus / "b"]

        tok_dir = work / "tokenizer"
        train = []
        for rep in range(args.repeats):
            res = _run_measured(
                _moelab(
                    "tokenizer",
                    "train",
                    "--input",
                    *map(str, inputs),
                    "--out",
                    str(tok_dir),
                    "--vocab-size",
                    str(args.vocab_size),
                    "--model-type",
                    args.model_type,
                    "--sample-mb",
                    str(args.tokenizer_mb),
                    "--seed",
                    str(rep),
                    "--overwrite",
                )
            )
            res["train_s"] = json.loads((tok_dir / "tokenizer.json").read_text())["training"].get("seconds")
            train.append(res)
            print(
                f"tokenizer train {rep + 1}/{args.repeats}: {res['train_s']:.1f} s training, "
                f"{res['wall_s']:.1f} s wall with startup, "
                f"peak RSS {res['peak_rss_total_mb']:.0f} MB",
                flush=True,
            )
        encode_mb_s, encode_mb_cpu_s = _encode_speed(tok_dir, corpus)
        print(
            f"tokenizer encode, one thread: {encode_mb_s:.2f} MB/s wall, {encode_mb_cpu_s:.2f} MB per CPU second",
            flush=True,
        )

        prep = {
            "quarter": _prepare(str(tok_dir), [inputs[0]], work / "data-quarter", workers),
            "full": _prepare(str(tok_dir), inputs, work / "data-full", workers),
        }
        if not args.no_byte:
            prep["byte_full"] = _prepare("byte", inputs, work / "data-byte", workers)
        for name, r in prep.items():
            print(
                f"prepare {name}: {r['mb']:.1f} MB in {r['seconds']:.1f} s = {r['mb_per_s']:.2f} MB/s; peak RSS "
                f"{r['peak_rss_total_mb']:.0f} MB summed (PSS {r['peak_pss_total_mb']:.0f}; main "
                f"{r['peak_rss_main_mb']:.0f}, largest worker {r['peak_rss_worker_mb']:.0f}); CPU: glue "
                f"{r['glue_cpu_s']:.1f} s, workers {r['workers_cpu_s']:.1f} s",
                flush=True,
            )
    finally:
        if tmp is not None:
            tmp.cleanup()

    bound = encode_mb_cpu_s * min(workers, os.cpu_count() or 1)
    full = prep["full"]
    results = {
        "benchmark": "data",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "sentencepiece": sentencepiece.__version__,
        },
        "config": {
            "corpus_mb": args.corpus_mb,
            "tokenizer_mb": args.tokenizer_mb,
            "vocab_size": args.vocab_size,
            "model_type": args.model_type,
            "workers": workers,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "corpus": composition,
        "tokenizer_train": {
            "train_s": [r["train_s"] for r in train],
            "median_train_s": statistics.median(r["train_s"] for r in train),
            "wall_s": [round(r["wall_s"], 2) for r in train],
            "median_wall_s": round(statistics.median(r["wall_s"] for r in train), 2),
            "peak_rss_mb": max(r["peak_rss_total_mb"] for r in train),
        },
        "tokenizer_encode_mb_per_s_one_core": round(encode_mb_s, 3),
        "tokenizer_encode_mb_per_cpu_s": round(encode_mb_cpu_s, 3),
        "prepare": prep,
        "targets": {
            "peak RSS < 1 GB (full corpus, main + workers)": full["peak_rss_total_mb"] < 1024,
            "peak RSS growth quarter -> full (MB)": round(
                full["peak_rss_total_mb"] - prep["quarter"]["peak_rss_total_mb"], 1
            ),
            "prepare MB/s / (workers x one-core tokenizer MB/s)": round(full["mb_per_s"] / bound, 3),
            "workers' MB per CPU second / tokenizer's": round((full["workers_mb_per_cpu_s"] or 0) / encode_mb_cpu_s, 3),
            "glue share of CPU (main process pipeline / whole tree)": round(full["glue_cpu_s"] / full["cpu_s"], 3),
        },
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".tmp")
    part.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(part, out)
    print(f"wrote {out}")
    return results


def run(args) -> int:
    run_data_bench(args)
    return 0
