"""What a run reports: metrics.jsonl records, TensorBoard scalars, a progress bar, MFU and memory.

A record (one JSON line per log step; keys listed in docs/training.md) holds means over the optimizer
steps since the previous record (`Window`), so curves are smooth at any `log.every` and a record with
`log.every: 1` is exactly that step's values. Per MoE layer the window's expert loads are the summed
kept assignments, so `load` fractions, `dead` experts and `cv` describe every token of the window.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from functools import cache
from pathlib import Path

import torch

from moelab.fileio import write_file_atomic
from moelab.model.losses import hard_load_cv

# ----------------------------------------------------------------------------------------------------
# Hardware numbers


@cache
def measure_matmul_peak(
    dtype: str = "float32", device: str = "cpu", seconds: float = 1.0, n: int | None = None
) -> float:
    """Achieved FLOP/s of an n^3 matmul in `dtype` on `device`: the ceiling MFU is measured against (a
    datasheet peak is meaningless on a shared, throttled CPU, and a GPU's depends on its clocks and power).
    CPU: n = 2048, timed for about `seconds`. CUDA: n = 8192, timed with CUDA events, the best of several
    bursts (the device's sustained matmul peak in that dtype, e.g. bf16 tensor cores). Cached; call
    `measure_matmul_peak.__wrapped__` for a fresh measurement."""
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    if dev.type == "cuda":
        return _cuda_matmul_peak(dt, dev, n or 8192, seconds)
    n = n or 2048
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    a @ b  # warm-up: thread pool, kernel selection
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and reps >= 3:
            return 2.0 * n**3 * reps / elapsed


def _cuda_matmul_peak(dt: torch.dtype, dev: torch.device, n: int, seconds: float) -> float:
    with torch.cuda.device(dev):
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        c = torch.empty(n, n, device=dev, dtype=dt)
        for _ in range(3):  # warm-up: cuBLAS handle, kernel choice, clocks up
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best, reps, t0 = 0.0, 10, time.perf_counter()
        while True:
            start.record()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            best = max(best, 2.0 * n**3 * reps / (start.elapsed_time(end) / 1e3))
            if time.perf_counter() - t0 >= min(seconds, 0.5):
                return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu_fields(flops: float, seconds: float, peak: float) -> dict:
    """A record's throughput fields: achieved FLOP/s, the peak it is compared to, and MFU, capped at 1 and
    flagged (`mfu_capped`) when the achieved rate beat the peak (a CPU measured while loaded). A peak of 0
    (`train.peak_flops: 0`) means no MFU: the achieved rate alone."""
    if seconds <= 0:
        return {"mfu": None}
    achieved = flops / seconds
    if peak <= 0:
        return {"flops_per_s": achieved, "mfu": None}
    out = {"flops_per_s": achieved, "peak_flops": peak, "mfu": min(1.0, achieved / peak)}
    if achieved > peak:
        out["mfu_capped"] = True
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


# ----------------------------------------------------------------------------------------------------
# Accumulating one window of optimizer steps


class Window:
    """Sums over the optimizer steps since the last record. Values stay on the device (no host sync per
    micro-batch); `summary()` turns them into the record's means. `state_dict()` makes a resumed run
    log the same numbers as an uninterrupted one even when a checkpoint falls inside a window."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.skipped = 0
        self.tokens = 0
        self.flops = 0.0
        self.seconds = 0.0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one good optimizer step's values (scalars or [E] count vectors)."""
        for key, v in values.items():
            v = v.detach().float()
            self.sums[key] = padded_add(self.sums[key], v) if key in self.sums else v.clone()
        self.steps += 1

    def summary(self) -> dict:
        rec: dict = {}
        n = max(1, self.steps)
        layers = sorted({k.split("/")[1] for k in self.sums if k.startswith("moe/")}, key=int)
        for key, v in self.sums.items():
            if not key.startswith("moe/"):
                rec[key] = float(v) / n
        for i in layers:
            counts = self.sums[f"moe/{i}/counts"].double()
            total = float(counts.sum())
            load = (counts / total if total > 0 else counts).tolist()
            rec[f"moe/{i}/load"] = load
            rec[f"moe/{i}/load_cv"] = hard_load_cv(counts)
            rec[f"moe/{i}/max_load"] = max(load)
            rec[f"moe/{i}/min_load"] = min(load)
            rec[f"moe/{i}/dead"] = int((counts == 0).sum())
            routed = float(self.sums[f"moe/{i}/assignments"])
            rec[f"moe/{i}/dropped_frac"] = float(self.sums[f"moe/{i}/dropped"]) / routed if routed > 0 else 0.0
            rec[f"moe/{i}/entropy"] = float(self.sums[f"moe/{i}/entropy"]) / n
            for key, v in self.sums.items():
                if key.startswith(f"moe/{i}/aux/"):
                    rec[key] = float(v) / n
            rec.update(k_fields(self.sums.get(f"moe/{i}/k_hist"), f"moe/{i}/"))
        return rec

    def state_dict(self) -> dict:
        return {
            "sums": {k: v.tolist() for k, v in self.sums.items()},
            "steps": self.steps,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "flops": self.flops,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in state["sums"].items()}
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        self.tokens, self.flops, self.seconds = int(state["tokens"]), float(state["flops"]), float(state["seconds"])


def step_values(ce_loss: torch.Tensor, aux: dict[str, torch.Tensor], loss: torch.Tensor, routing: dict) -> dict:
    """One micro-batch's loggable values (detached), keyed as in metrics.jsonl."""
    out = {"train/loss": loss.detach(), "train/ce_loss": ce_loss.detach()}
    for name, v in aux.items():
        out[f"train/aux/{name}"] = v.detach()
    for i, st in routing.items():
        out[f"moe/{i}/counts"] = st.tokens_per_expert
        out[f"moe/{i}/dropped"] = st.dropped
        out[f"moe/{i}/assignments"] = st.assignments
        out[f"moe/{i}/entropy"] = st.entropy
        for name, v in st.aux_losses.items():
            out[f"moe/{i}/aux/{name}"] = v.detach()
        if st.experts_per_token is not None:
            out[f"moe/{i}/k_hist"] = st.experts_per_token
    return out


def k_fields(hist: torch.Tensor | None, prefix: str) -> dict:
    """Experts per token from a [K + 1] histogram of tokens: `k_mean` and `k_dist` (share of tokens
    using 0..K experts)."""
    if hist is None:
        return {}
    h = hist.double()
    total = float(h.sum())
    if total <= 0:
        return {}
    return {
        f"{prefix}k_mean": float((h * torch.arange(h.numel(), dtype=h.dtype, device=h.device)).sum()) / total,
        f"{prefix}k_dist": (h / total).tolist(),
    }


def mean_experts_per_token(values: dict) -> float | None:
    """Kept experts per token averaged over MoE layers, from one step's `moe/<i>/k_hist` values (what
    adaptive routers' FLOPs follow; one host read)."""
    hists = [v for k, v in values.items() if k.endswith("/k_hist")]
    if not hists:
        return None
    h = torch.stack(hists).double()  # [L, K + 1]
    k = (h * torch.arange(h.shape[1], dtype=h.dtype, device=h.device)).sum(1) / h.sum(1).clamp_min(1.0)
    return float(k.mean())


def merge_micro(acc: dict[str, torch.Tensor], values: dict[str, torch.Tensor], scale: float) -> None:
    """acc += values, with losses and per-micro-batch means scaled by `scale` (1 / grad_accum) and
    counts summed as they are."""
    for key, v in values.items():
        is_count = key.endswith(("/counts", "/dropped", "/assignments", "/k_hist"))
        v = v.float() if is_count else v.float() * scale
        acc[key] = padded_add(acc[key], v) if key in acc else v


def padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, zero-padding the shorter of two 1-D vectors: a window can span a change of length (the
    top-k schedule changes the experts-per-token histogram's K + 1, growing appends experts to counts)."""
    if a.dim() == 1 and b.dim() == 1 and a.numel() != b.numel():
        n = max(a.numel(), b.numel())
        a, b = torch.nn.functional.pad(a, (0, n - a.numel())), torch.nn.functional.pad(b, (0, n - b.numel()))
    return a + b


# ----------------------------------------------------------------------------------------------------
# Sinks


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN/inf; a null says "not a number" without breaking strict parsers
    return x


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per record, appended and flushed line by line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh = None

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written by a run that died after its last checkpoint) and any
        torn last line, atomically, so a resumed run's file reads like an uninterrupted one."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line)
        write_file_atomic(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        if self.fh is None:
            self.fh = open(self.path, "a", encoding="utf-8")
        clean = {k: ([_finite(x) for x in v] if isinstance(v, list) else _finite(v)) for k, v in record.items()}
        self.fh.write(json.dumps(clean) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class TensorBoard:
    """RUN/tb/ event files when the `tensorboard` package is installed; otherwise does nothing."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: JSONL alone
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, v in record.items():
            if key == "step" or v is None:
                continue
            if isinstance(v, list):  # per-expert load: a histogram over experts
                if v:
                    self.writer.add_histogram(key, torch.tensor(v), step)
            elif isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(key, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar (ETA, loss, tokens/s) when `bar` is set and stderr is a terminal; otherwise one plain
    line per record on stdout, so logs of unattended runs stay readable."""

    def __init__(self, total: int, initial: int, bar: bool, desc: str = "train"):
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
        self.total = total

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def record(self, rec: dict) -> None:
        loss, tps = rec.get("train/loss"), rec.get("tokens_per_s")
        parts = [f"loss {loss:.4f}" if loss is not None else "loss nan"]
        if rec.get("val/loss") is not None:
            parts.append(f"val {rec['val/loss']:.4f} ({rec['val/bpb']:.3f} bpb)")
        if tps:
            parts.append(f"{tps:,.0f} tok/s")
        if rec.get("mfu") is not None:
            parts.append(f"mfu {100 * rec['mfu']:.0f}%")
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(parts), refresh=True)
        else:
            print(f"step {rec['step']:>6}/{self.total}  " + "  ".join(parts), flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepFlops:
    """Training FLOPs per token, by how many experts each token uses (cached per k: the top-k schedule
    changes k, and adaptive routers -- top-p, null experts -- use a measured mean k). `clear()` after the
    model changes shape (growing experts)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._by_k: dict[int, int] = {}

    def clear(self) -> None:
        self._by_k.clear()

    def at_k(self, k: int) -> int:
        if k not in self._by_k:
            import dataclasses

            from moelab.model.counting import flops_per_token

            m = self.cfg.model
            m = dataclasses.replace(m, moe=dataclasses.replace(m.moe, top_k=k))
            self._by_k[k] = flops_per_token(m, self.cfg.data.seq_len)["train"]
        return self._by_k[k]

    def for_step(self, k: int, acc: dict) -> float:
        """Adaptive routers: FLOPs at the step's measured mean experts per token (linear in k); fixed top-k
        keeps the scheduled k, so capacity drops leave existing runs' MFU alone."""
        from moelab.model.dynamic_config import adaptive

        mean_k = mean_experts_per_token(acc) if adaptive(self.cfg.model.moe) else None
        if mean_k is None:
            return self.at_k(k)
        f0 = self.at_k(0)
        return f0 + mean_k * (self.at_k(1) - f0)
