"""Kills at the moments a run directory changes shape: during rotation, before config.yaml, and at random."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import read_metrics, tiny_cfg, write_yaml

from moelab.checkpoint import is_complete
from moelab.fileio import PAUSE_ENV

REPO = Path(__file__).resolve().parents[2]


def _moelab(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "moelab", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(cond, proc, what, timeout=90.0):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _finish(args):
    p = _moelab(args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return err


def _curves(run: Path):
    return [(r["step"], r["train/loss"], r.get("val/loss"), r["moe/0/load"]) for r in read_metrics(run)]


def test_kill_during_rotation_leaves_no_half_checkpoint(toy_data, tmp_path):
    cfg = write_yaml(
        tmp_path / "cfg.yaml",
        tiny_cfg(toy_data, train={"steps": 8}, checkpoint={"every": 2, "keep_last": 1, "keep_best": False}),
    )
    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    p = _moelab(["train", str(cfg), "--run-dir", str(run), "--no-progress"], {PAUSE_ENV: "remove_dir"})
    _kill_when(lambda: ck.is_dir() and any(".trash-" in d.name for d in ck.iterdir()), p, "a rotation")
    visible = [d for d in ck.iterdir() if not d.name.startswith(".")]
    assert visible and all(is_complete(d) for d in visible)  # the one being deleted is out of sight
    _finish(["train", str(cfg), "--run-dir", str(run), "--resume", "--no-progress"])
    assert sorted(d.name for d in ck.iterdir()) == ["step_0000008"]  # the leftover was cleaned at the start


def test_kill_before_config_leaves_no_half_run(toy_data, tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_cfg(toy_data, train={"steps": 2}))
    run = tmp_path / "run"
    p = _moelab(["train", str(cfg), "--run-dir", str(run), "--no-progress"], {PAUSE_ENV: "run_config"})
    _kill_when(lambda: (run / "run.json").is_file(), p, "the run's start")
    assert (run / "tokenizer" / "tokenizer.json").is_file() and not (run / "config.yaml").exists()
    _finish(["train", str(cfg), "--run-dir", str(run), "--no-progress"])  # the same command just works
    assert (run / "config.yaml").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    assert not [d for d in run.iterdir() if d.name.startswith(".")]


def _last_step(run: Path) -> int:
    """The last complete line's step: the trainer may be writing the next line as we read (seen in CI as
    a half line), and a killed one can leave it torn until the resume repairs the file."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    lines = text.split("\n")[:-1]  # whatever follows the last newline is not a whole line yet
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
def test_random_kills_then_resume_are_exact(toy_data, tmp_path):
    """SIGKILL a tiny run at random moments (seeded: a random step, then a random 0-60 ms into it, which
    lands in steps, metrics writes, checkpoint writes and rotation alike), resume each time (--restart
    when it died before its first checkpoint), and compare per-step metrics and final weights with an
    uninterrupted run."""
    spec = tiny_cfg(
        toy_data, train={"steps": 30}, checkpoint={"every": 3, "keep_last": 2}, eval={"every": 5}, log={"every": 1}
    )
    cfg = write_yaml(tmp_path / "cfg.yaml", spec)
    ref = _moelab(["train", str(cfg), "--run-dir", str(tmp_path / "ref"), "--no-progress"])
    run = tmp_path / "run"
    rng = random.Random(17)
    kills = 0
    for _ in range(6):
        started = (run / "config.yaml").is_file()
        has_ckpt = started and any(d.name != "best" for d in (run / "checkpoints").glob("step_*"))
        mode = ["--resume"] if has_ckpt else (["--restart"] if started else [])
        done = _last_step(run) if has_ckpt else 0
        if done >= 28:
            break
        p = _moelab(["train", str(cfg), "--run-dir", str(run), "--no-progress", *mode])
        target = rng.randint(done + 1, 28)
        t0 = time.monotonic()
        while _last_step(run) < target and p.poll() is None and time.monotonic() - t0 < 90:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.06))
        if p.poll() is not None:
            assert p.returncode == 0, p.communicate()
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    _finish(["train", str(cfg), "--run-dir", str(run), "--resume", "--no-progress"])
    assert ref.wait(timeout=120) == 0, ref.communicate()
    assert kills >= 3
    assert _curves(run) == _curves(tmp_path / "ref")
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 31))
    a = load_file(str(run / "checkpoints" / "step_0000030" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "checkpoints" / "step_0000030" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [d for d in (run / "checkpoints").iterdir() if d.name.startswith(".")]
