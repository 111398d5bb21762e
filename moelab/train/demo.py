"""`moelab demo`: the whole pipeline in one command, in a budget of minutes (default 4) on two CPU cores.

1. train a SentencePiece tokenizer on the corpus (default: the Python standard library's sources);
2. tokenize the corpus into RUN/data (train/val split by file);
3. sample from the untrained model, train configs/demo.yaml, sample again from the trained one (each set scored
   for how Python-like it looks, `pylike`);
4. write the report (`report_step`) and say where everything is.
With `dense_twin`, the dense model of equal active parameters (`MoEConfig.active_ffn_dim`) trains beside the
MoE in its own process, one thread each, for the same seconds and steps, and the demo ends with both val
bits/byte: the comparison `moelab bench quality` makes, in miniature (one seed, one short budget).
The budget covers the whole demo: training gets what the first steps and a reserve for the rest leave, as
`train.budget_seconds` (its LR schedule ends when the time does, however busy the machine is).
The run directory is kept; an existing one is never overwritten (runs/demo-2, runs/demo-3, ... instead).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from moelab.config import load_config
from moelab.errors import UserError
from moelab.presets import PRESET_DIR

DEMO_CONFIG = PRESET_DIR / "demo.yaml"
# No trailing spaces: the tokenizer joins a space to the word after it ("▁name"), so a prompt ending in one
# asks for a split the model has rarely seen.
PROMPTS = ["import os\n", "def", "class"]


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

    # a cooler, narrower sampler than generate's defaults: a small model's tail is mostly noise
    return generate(model, tokenizer, PROMPTS, max_new_tokens=max_new_tokens, temperature=0.6, top_k=20, seed=seed)


def show(title: str, prompts: list[str], texts: list[str]) -> float:
    """Print the samples and their Python-likeness score (returned)."""
    from moelab.train import pylike

    full = [p + t for p, t in zip(prompts, texts, strict=True)]
    value = pylike.score(full)
    print(f"\n--- {title} (Python-likeness {value:.2f}: keywords, indentation, brackets) " + "-" * 8)
    for text in full:
        print(repr(text)[1:-1][:160])
    return value


def pick_threads() -> int:
    """Torch threads for this machine now: the cores the load average leaves free (at least 1). On a busy
    2-core machine two threads that wait on each other at every matmul ran slower than one."""
    cores = os.cpu_count() or 1
    try:
        free = cores - os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: torch's choice
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), cores, int(free + 0.5)))


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


def fit_budget(model, cfg, seconds: float, first: float | None = None) -> tuple[int, int, float]:
    """(steps, batch size, seconds per step) for a training budget of `seconds`: train.steps at
    train.batch_size if they fit; else, while fewer than MIN_STEPS fit, halve the batch (down to 4):
    on a slow or busy machine many small steps learn more than a few large ones. `first`: the step time
    at train.batch_size if already measured."""
    batch = cfg.train.batch_size
    while True:
        step_s = first if first is not None and batch == cfg.train.batch_size else step_seconds(model, cfg, batch)
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


# Seconds kept for what follows training (after-samples, the report's two traces, statistics and plots): a
# fixed part plus this many training steps at the config's batch, as measured before training. Measured: 29 s
# = 20 s + 12 steps at load 2-3; about 20 s + 22 steps with 12% of a core left to the demo.
RESERVE_S, RESERVE_STEPS = 20.0, 24


TWIN_DIR = "dense-twin"  # inside the demo's run directory


def check_twin(cfg, config: Path) -> None:
    """The twin swaps every MoE layer for a SwiGLU of `model.ffn_dim` = the active width, which only means
    "the same model, dense" when every layer is MoE (or the dense layers already have that width)."""
    moe_layers = cfg.model.moe_layer_ids()
    if not moe_layers:
        raise UserError(f"--dense-twin: {config} is a dense model already (model.moe.layers: none)")
    width = cfg.model.moe.active_ffn_dim
    if len(moe_layers) < cfg.model.n_layers and cfg.model.ffn_dim != width:
        raise UserError(
            f"--dense-twin: {config} has dense layers of model.ffn_dim {cfg.model.ffn_dim}; the twin needs "
            f"{width} (the MoE's active width) in every layer, which would change them too"
        )


def start_dense_twin(config: Path, overrides: list[str], cfg, run: Path) -> subprocess.Popen:
    """`moelab train` of the dense twin (every MoE layer a SwiGLU of the MoE's active width, all else equal:
    data, seed, batch, budget) in a process of its own with one torch thread, logging to RUN/dense-twin.log."""
    twin = [*overrides, "model.moe.layers=none", f"model.ffn_dim={cfg.model.moe.active_ffn_dim}"]
    cmd = [sys.executable, "-m", "moelab", "train", str(config), "--run-dir", str(run / TWIN_DIR), "--no-progress"]
    cmd += [a for o in twin for a in ("--set", o)]
    with open(run / f"{TWIN_DIR}.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def dense_twin_result(proc: subprocess.Popen, run: Path) -> dict | None:
    """Wait for the twin; its last evaluated record, or None (said why) when it failed."""
    code = proc.wait()
    log = run / f"{TWIN_DIR}.log"
    if code != 0:
        print(f"  dense twin: training failed (exit {code}); its output is in {log}")
        return None
    from moelab.analysis.runlog import read_metrics

    try:
        evaluated = [r for r in read_metrics(run / TWIN_DIR) if "val/bpb" in r]
    except UserError as e:
        print(f"  dense twin: {e}; see {log}")
        return None
    if not evaluated:
        print(f"  dense twin: {run / TWIN_DIR / 'metrics.jsonl'} has no validation record; see {log}")
        return None
    return evaluated[-1]


def run_demo(
    run_dir: str | Path | None = None,
    inputs=("stdlib",),
    overrides=(),
    config: str | Path | None = None,
    samples: bool = True,
    minutes: float | None = 4.0,
    dense_twin: bool = False,
) -> Path:
    """Run the demo; `minutes` is the budget for all of it (None = train.steps, no time budget); `dense_twin`:
    train the dense model of equal active parameters beside the MoE and report both (module docstring)."""
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
    if dense_twin:
        check_twin(cfg, config)
    threads = 1 if dense_twin else pick_threads()  # with a twin: one core each
    torch.set_num_threads(threads)
    beside = ", the dense twin beside it on another" if dense_twin else ""
    print(f"moelab demo -> {run} ({threads} torch thread{'s' if threads > 1 else ''}{beside})")

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
    plan = f"{cfg.train.steps} steps"
    if minutes is not None:
        step_s = step_seconds(before, cfg, cfg.train.batch_size)
        left = minutes * 60 - (time.perf_counter() - t_start) - RESERVE_S - RESERVE_STEPS * step_s
        budget = max(10.0, left)
        steps, batch, step_s = fit_budget(before, cfg, budget, first=step_s)
        every = max(10, steps // 8)
        overrides += [
            f"train.steps={cfg.train.steps}",  # a cap: a fast machine finishes them early, schedule and all
            f"train.budget_seconds={budget:.1f}",
            f"train.batch_size={batch}",
            f"eval.every={every}",
            f"log.every={min(cfg.log.every, every)}",
        ]
        cfg = load_config(config, overrides)
        plan = (
            f"{budget:.0f} s (at most {cfg.train.steps} steps; batch {batch}, ~{step_s:.2f} s per step measured "
            f"now: ~{steps} steps)"
        )
    print(f"\n[3/4] training {config.name} for {plan} (progress below; metrics in {run / 'metrics.jsonl'})")
    twin = start_dense_twin(config, overrides, cfg, run) if dense_twin else None
    try:
        result = train(config, run_dir=run, overrides=overrides)
        from moelab.checkpoint import load_model

        if result.checkpoint is None:
            raise UserError(f"{config}: training wrote no checkpoint to sample from")
        model, _, _ = load_model(result.checkpoint)
        if samples:
            show("samples after training", PROMPTS, sample(model, tok))
        twin_rec = dense_twin_result(twin, run) if twin is not None else None
    except BaseException:
        if twin is not None and twin.poll() is None:  # never leave the twin training on its own
            twin.kill()
            twin.wait()
        raise
    rec = result.last_record
    report = report_step(run)
    stopped = " (the time budget ended training)" if rec.get("stopped") == "budget_seconds" else ""
    print(
        f"\n[4/4] done in {time.perf_counter() - t_start:.0f} s: step {result.step}{stopped}, "
        f"val loss {rec['val/loss']:.3f} ({rec['val/bpb']:.3f} bits per byte)"
    )
    if twin_rec is not None:
        width = cfg.model.moe.active_ffn_dim
        print(
            f"  dense twin:    val {twin_rec['val/bpb']:.3f} bits per byte at step {twin_rec['step']} (SwiGLU of width "
            f"{width}, the MoE's active parameters; same seconds, one thread each, side by side): MoE - dense "
            f"{rec['val/bpb'] - twin_rec['val/bpb']:+.3f} (one seed, one short run: `moelab bench quality` for more)"
        )
    print(f"  run directory: {run}")
    print(f"  metrics:       {run / 'metrics.jsonl'}")
    print(f"  checkpoint:    {result.checkpoint}")
    if report is not None:
        print(f"  report:        {report}")
    print(f"  next:          moelab generate {run} --prompt 'def '   |   moelab train configs/tiny.yaml ...")
    return run
