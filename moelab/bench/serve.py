"""`moelab bench serve`: the HTTP server under 1, 8 and 32 concurrent streaming clients.

A `moelab serve` subprocess (127.0.0.1, a free port) serves a trained run or a preset config with
random weights. For each concurrency level, that many clients send streaming completions back to back
for a fixed time (then wait for the ones in flight); we report requests/s, generated tokens/s, time
to first token and end-to-end latency (p50/p99) and the error count. Clients run in this process
(asyncio + httpx), so on a small machine they share the CPU with the server: the numbers are what
one box serving itself gets.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from moelab.bench import write_results


def add_arguments(p):
    p.add_argument("--run", default=None, help="run/checkpoint to serve (default: --config with random weights)")
    p.add_argument("--config", default="configs/tiny.yaml", help="preset for the random-weight model")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length in characters")
    p.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    p.add_argument("--json", dest="json_out", default="benchmarks/serve.json", help="where to write results")


def _random_checkpoint(config: str, tmp: Path) -> Path:
    import torch

    from moelab.checkpoint import save_checkpoint
    from moelab.config import load_config
    from moelab.model import Transformer
    from moelab.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = load_config(config, [])
    tok_dir = ByteTokenizer().save(tmp / "tokenizer")
    return save_checkpoint(tmp / "model", Transformer(cfg.model), cfg, tok_dir)


def _start_server(path: Path, args) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "moelab",
        "serve",
        str(path),
        "--port",
        "0",
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        "4096",
        "--model-name",
        "bench",
        "--log-level",
        "warning",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "MOELAB_API_KEY": ""})
    deadline = time.monotonic() + 300
    seen = []
    for line in proc.stderr:
        seen.append(line)
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:  # keep draining stderr, or a chatty server would block on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"server did not start: {' '.join(cmd)}\n{''.join(seen[-20:])}")


async def _client(client, url: str, body: dict, stop_at: float, out: dict) -> None:
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    out["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["errors"].append(str(chunk["error"]))
                    elif chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif ttft is None:
                        ttft = time.perf_counter() - t0
        except Exception as e:  # a benchmark counts failures instead of stopping at the first
            out["errors"].append(f"{type(e).__name__}: {e}")
            continue
        end = time.perf_counter()
        out["ttft"].append(ttft if ttft is not None else end - t0)
        out["e2e"].append(end - t0)
        out["tokens"] += tokens


async def _level(url: str, clients: int, args) -> dict:
    import httpx

    body = {
        "model": "bench",
        "prompt": ("To be, or not to be " * 20)[: args.prompt_len],
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = {"ttft": [], "e2e": [], "tokens": 0, "errors": []}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + args.duration  # no new request after this; running ones finish and count
        await asyncio.gather(*(_client(client, url, body, stop_at, out) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    n = len(out["e2e"])
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None  # noqa: E731
    return {
        "clients": clients,
        "requests": n,
        "seconds": elapsed,
        "requests_per_s": n / elapsed,
        "tokens_per_s": out["tokens"] / elapsed,
        "ttft_ms_p50": 1e3 * pct(out["ttft"], 0.5) if n else None,
        "ttft_ms_p99": 1e3 * pct(out["ttft"], 0.99) if n else None,
        "e2e_ms_p50": 1e3 * pct(out["e2e"], 0.5) if n else None,
        "e2e_ms_p99": 1e3 * pct(out["e2e"], 0.99) if n else None,
        "errors": len(out["errors"]),
        "error_samples": out["errors"][:5],
    }


def run(args) -> int:
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.run) if args.run else _random_checkpoint(args.config, Path(tmp))
        proc, url = _start_server(path, args)
        try:
            httpx.post(
                f"{url}/v1/completions", json={"model": "bench", "prompt": "warm", "max_tokens": 4}, timeout=60
            ).raise_for_status()
            levels = []
            for c in args.clients:
                res = asyncio.run(_level(url, c, args))
                levels.append(res)
                ms = {k: "-" if res[k] is None else f"{res[k]:.0f}" for k in res if k.endswith(("p50", "p99"))}
                print(
                    f"clients={c:3d}  req/s={res['requests_per_s']:.2f}  tok/s={res['tokens_per_s']:.1f}  "
                    f"ttft p50/p99={ms['ttft_ms_p50']}/{ms['ttft_ms_p99']} ms  "
                    f"e2e p50/p99={ms['e2e_ms_p50']}/{ms['e2e_ms_p99']} ms  errors={res['errors']}",
                    flush=True,
                )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    results = {
        "config": {
            k: getattr(args, k)
            for k in ("run", "config", "duration", "max_tokens", "prompt_len", "max_batch", "threads")
        },
        "levels": levels,
    }
    write_results(args.json_out, results)
    return 1 if any(level["errors"] for level in levels) else 0
