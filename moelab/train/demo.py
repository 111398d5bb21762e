"""`moelab demo`: the whole pipeline in one command, in about three minutes on two CPU cores.

1. train a SentencePiece tokenizer on the corpus (default: the Python standard library's sources);
2. tokenize the corpus into RUN/data (train/val split by file);
3. sample from the untrained model, train configs/demo.yaml, sample again from the trained one;
4. write the report (`report_step`) and say where everything is.
The run directory is kept; an existing one is never overwritten (runs/demo-2, runs/demo-3, ... instead).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from moelab.config import load_config
from moelab.errors import UserError
from moelab.presets import PRESET_DIR

DEMO_CONFIG = PRESET_DIR / "demo.yaml"
PROMPTS = ["import os\n", "def ", "class "]


def free_run_dir(base: Path) -> Path:
    """`base` if it holds no run yet, else the first of base-2, base-3, ... that does not exist."""
    from moelab.train.rundir import holds_run

    if not base.exists() or not holds_run(base) and not (base / "data").exists():
        return base
    n = 2
    while base.with_name(f"{base.name}-{n}").exists():
        n += 1
    return base.with_name(f"{base.name}-{n}")


def sample(model, tokenizer, seed: int = 0, max_new_tokens: int = 60) -> list[str]:
    from moelab.infer.generate import generate

    return generate(model, tokenizer, PROMPTS, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=seed)


def show(title: str, prompts: list[str], texts: list[str]) -> None:
    print(f"\n--- {title} " + "-" * max(0, 60 - len(title)))
    for p, t in zip(prompts, texts, strict=True):
        print(repr(p + t)[1:-1][:160])


# Fewer optimizer steps than this do not get a model of this size past `0x0x0x...` (a busy 2-core machine
# fitted 42 steps of batch 16 into the budget once): below it the demo trades batch size for steps.
MIN_STEPS = 200


def step_seconds(model, cfg, batch_size: int) -> float:
    """Seconds per optimizer step at `batch_size`: the fastest of five timed forward+backward passes after
    a warm-up, plus 15% for the optimizer and telemetry. The fastest: on a busy 2-core machine single
    passes ran up to 10x slower than the steady state training then reached (a median priced 40 steps
    into a budget that held 400); `train.max_seconds` guards the other direction."""
    x = torch.randint(0, cfg.model.vocab_size, (batch_size, cfg.data.seq_len))
    model.train()
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        model(x, x).loss.backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return min(times[1:]) * cfg.train.grad_accum * 1.15


def fit_budget(model, cfg, seconds: float) -> tuple[int, int, float]:
    """(steps, batch size, seconds per step) for a training budget of `seconds`: train.steps at
    train.batch_size if they fit; else, while fewer than MIN_STEPS fit, halve the batch (down to 4):
    on a slow or busy machine many small steps learn more than a few large ones."""
    batch = cfg.train.batch_size
    while True:
        step_s = step_seconds(model, cfg, batch)
        steps = min(cfg.train.steps, max(20, int(seconds / step_s)))
        if steps >= min(MIN_STEPS, cfg.train.steps) or batch <= 4:
            return steps, batch, step_s
        batch //= 2


def report_step(run_dir: Path) -> Path | None:
    """The analysis step of the demo: routing on held-out data (expert load, specialisation by source file)
    and the training curves, in one HTML report."""
    from moelab.analysis.run import analyze_run
    from moelab.analysis.trace import format_summary

    analysis, report = analyze_run(run_dir, tokens=16384)  # (traced twice: trained and untrained for scale)
    print("\n" + format_summary(analysis))
    return report


def run_demo(
    run_dir: str | Path | None = None,
    inputs=("stdlib",),
    overrides=(),
    config: str | Path | None = None,
    samples: bool = True,
    minutes: float | None = 2.5,
) -> Path:
    """Run the demo; `minutes` is the training budget (steps are fitted to it; None = train.steps)."""
    from moelab.data import prepare
    from moelab.data.tokenizer_training import train_tokenizer
    from moelab.model import Transformer
    from moelab.train import train

    t_start = time.perf_counter()
    config = Path(config) if config is not None else DEMO_CONFIG
    if not config.is_file():
        raise UserError(f"{config}: demo config not found (run `moelab demo` from a source checkout, or pass --config)")
    cfg = load_config(config, overrides)  # checked before any work is done
    run = free_run_dir(Path(run_dir) if run_dir is not None else Path("runs") / "demo")
    if run_dir is not None and run != Path(run_dir):
        raise UserError(f"{run_dir}: already holds a run; choose another --run-dir")
    print(f"moelab demo -> {run}")

    t0 = time.perf_counter()
    tok = train_tokenizer(list(inputs), run / "tokenizer", cfg.model.vocab_size, sample_mb=10.0)
    print(f"[1/4] tokenizer: SentencePiece BPE, {tok.vocab_size} tokens ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    meta = prepare(list(inputs), run / "tokenizer", run / "data")
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"[2/4] data: {tr['tokens']:,} train / {va['tokens']:,} val tokens from {len(meta['sources'])} files, "
        f"{tr['bytes_per_token']:.2f} bytes per token ({time.perf_counter() - t0:.1f} s)"
    )

    overrides = [*overrides, f"data.path={run / 'data'}"]
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.train.seed)  # the same initial weights the trainer will build
    before = Transformer(cfg.model).eval()
    if samples:
        show("samples before training", PROMPTS, sample(before, tok))
    eta = ""
    if minutes is not None:
        steps, batch, step_s = fit_budget(before, cfg, minutes * 60)
        every = max(10, steps // 8)
        # max_seconds: if the machine gets busier than when it was measured, stop at 1.3x the budget
        # (the run says so) rather than overrun it
        overrides += [
            f"train.steps={steps}",
            f"train.batch_size={batch}",
            f"eval.every={every}",
            f"log.every={min(cfg.log.every, every)}",
            f"train.max_seconds={max(1.0, minutes * 60 * 1.3):.1f}",
        ]
        cfg = load_config(config, overrides)
        eta = f", batch {batch}: ~{step_s:.2f} s per step measured now, ETA {steps * step_s / 60:.1f} min"
    print(
        f"\n[3/4] training {cfg.train.steps} steps of {config.name}{eta} (progress below; metrics in "
        f"{run / 'metrics.jsonl'})"
    )
    result = train(config, run_dir=run, overrides=overrides)
    rec = result.last_record
    from moelab.checkpoint import load_model

    model, _, _ = load_model(result.checkpoint)
    if samples:
        show("samples after training", PROMPTS, sample(model, tok))
    report = report_step(run)
    stopped = " (stopped early at train.max_seconds: the machine got busier)" if rec.get("stopped") else ""
    print(
        f"\n[4/4] done in {time.perf_counter() - t_start:.0f} s: step {result.step}{stopped}, "
        f"val loss {rec['val/loss']:.3f} ({rec['val/bpb']:.3f} bits per byte)"
    )
    print(f"  run directory: {run}")
    print(f"  metrics:       {run / 'metrics.jsonl'}")
    print(f"  checkpoint:    {result.checkpoint}")
    if report is not None:
        print(f"  report:        {report}")
    print(f"  next:          moelab generate {run} --prompt 'def '   |   moelab train configs/tiny.yaml ...")
    return run
