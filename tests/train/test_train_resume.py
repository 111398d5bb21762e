"""Exact resume: SIGKILL mid-training and mid-checkpoint-write, corrupted checkpoints skipped."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import read_metrics, tiny_cfg, write_yaml

from moelab.errors import UserError
from moelab.train import train
from moelab.train.state import SLEEP_ENV

REPO = Path(__file__).resolve().parents[2]
CFG = {"train": {"steps": 24}, "checkpoint": {"every": 4, "keep_last": 2}, "eval": {"every": 6}}


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


def _wait(cond, proc, what, timeout=90.0):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return int(lines[-1].split('"step": ')[1].split(",")[0]) if lines else 0


def _curves(run: Path):
    recs = read_metrics(run)
    return [(r["step"], r["train/loss"], r["train/ce_loss"], r.get("val/loss"), r["moe/0/load"]) for r in recs]


def test_sigkill_anywhere_then_resume_matches_uninterrupted_run_bit_for_bit(toy_data, tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_cfg(toy_data, **CFG))
    ref = _moelab(["train", str(cfg), "--run-dir", str(tmp_path / "ref"), "--no-progress"])
    run = tmp_path / "run"
    # 1. kill -9 in the middle of training, after the step-8 checkpoint
    p = _moelab(["train", str(cfg), "--run-dir", str(run), "--no-progress"])
    _wait(lambda: _last_step(run) >= 10, p, "step 10")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _last_step(run) > 8  # metrics past the checkpoint exist and must be discarded on resume
    # 2. resume, and kill -9 while it writes the next checkpoint (the test hook sleeps inside the write)
    p = _moelab(["train", str(cfg), "--run-dir", str(run), "--resume", "--no-progress"], {SLEEP_ENV: "60"})
    ck = run / "checkpoints"
    _wait(
        lambda: any(d.name.startswith(".step_") and (d / "model.safetensors").exists() for d in ck.iterdir()),
        p,
        "a checkpoint write in progress",
    )
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = [d.name for d in ck.iterdir() if d.name.startswith(".step_")]
    assert partial, "the kill should leave a half-written temporary checkpoint directory"
    # 3. resume to the end
    p = _moelab(["train", str(cfg), "--run-dir", str(run), "--resume", "--no-progress"])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    out_ref, err_ref = ref.communicate(timeout=120)
    assert ref.returncode == 0, err_ref
    assert _curves(run) == _curves(tmp_path / "ref")  # every step's losses and loads, bit for bit
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 25))
    assert not [d for d in ck.iterdir() if d.name.startswith(".")]  # the partial write was cleaned up
    assert sorted(d.name for d in ck.iterdir()) == ["best", "step_0000020", "step_0000024"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_and_truncated_checkpoints_are_skipped_with_a_warning(toy_data, tmp_path, capsys):
    cfg = tiny_cfg(toy_data, train={"steps": 12}, checkpoint={"every": 4, "keep_last": 3, "keep_best": False})
    run = tmp_path / "run"
    train(cfg, run_dir=run)
    reference = _curves(run)
    ck = run / "checkpoints"
    _flip_byte(ck / "step_0000012" / "model.safetensors")  # loads fine, but wrong: only the manifest sees it
    state = ck / "step_0000008" / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    capsys.readouterr()
    result = train(cfg, run_dir=run, resume=True)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_0000012: model.safetensors does not match its sha256" in err
    assert "step_0000008: train_state.safetensors has 100 bytes" in err
    assert result.step == 12
    assert _curves(run) == reference  # resumed from step 4 and recomputed 5..12 identically


def test_resume_without_a_usable_checkpoint_stops_and_changes_nothing(toy_data, tmp_path, capsys):
    cfg = tiny_cfg(toy_data, train={"steps": 8}, checkpoint={"every": 4, "keep_last": 2, "keep_best": False})
    run = tmp_path / "run"
    train(cfg, run_dir=run)
    reference = _curves(run)
    metrics = (run / "metrics.jsonl").read_bytes()
    for step in (4, 8):  # truncated weights, and weights replaced by something that is not safetensors
        w = run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:50] if step == 4 else b"\x80\x04K\x01.")
    with pytest.raises(
        UserError,
        match=r"cannot resume: none of its 2 checkpoint\(s\) is usable \(step_0000008: "
        r".*--restart.*new --run-dir",
    ):
        train(cfg, run_dir=run, resume=True)
    assert (run / "metrics.jsonl").read_bytes() == metrics  # not restarted, not truncated
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(UserError, match="cannot resume: it has no checkpoint"):
        train(cfg, run_dir=run, resume=True)
    assert (run / "metrics.jsonl").read_bytes() == metrics
    train(cfg, run_dir=run, restart=True)  # the way out the message names
    assert _curves(run) == reference


def test_cli_resume_without_checkpoint_is_one_line_and_nonzero(toy_data, tmp_path):
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_cfg(toy_data, train={"steps": 2}, checkpoint={"every": 0}))
    run = tmp_path / "run"
    assert (
        subprocess.run(
            [sys.executable, "-m", "moelab", "train", str(cfg), "--run-dir", str(run)], cwd=REPO, capture_output=True
        ).returncode
        == 0
    )
    shutil.rmtree(run / "checkpoints")
    p = _moelab(["train", "--run-dir", str(run), "--resume"])
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--restart" in err and not (run / "checkpoints").exists()
    p = _moelab(["train", "--run-dir", str(run), "--restart", "--no-progress"])  # the run's own config.yaml
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and [r["step"] for r in read_metrics(run)] == [1, 2], err


def test_corrupt_newer_checkpoints_neither_win_nor_push_good_ones_out(toy_data, tmp_path, capsys):
    """keep_best=false: corrupt step 12/16 used to count as the newest, so rotation deleted each good
    checkpoint as soon as it was written."""
    run = tmp_path / "run"
    train(
        tiny_cfg(toy_data, train={"steps": 16}, checkpoint={"every": 4, "keep_last": 4, "keep_best": False}),
        run_dir=run,
    )
    ck = run / "checkpoints"
    for step in (12, 16):
        _flip_byte(ck / f"step_{step:07d}" / "model.safetensors")
    # resume from 8, checkpointing every 3 now: step numbers the corrupt ones never had
    more = tiny_cfg(toy_data, train={"steps": 16}, checkpoint={"every": 3, "keep_last": 2, "keep_best": False})
    result = train(more, run_dir=run, resume=True)
    assert result.step == 16
    names = sorted(p.name for p in ck.iterdir())
    assert names == [".step_0000012.bad", ".step_0000016.bad", "step_0000015", "step_0000016"], names
    assert "moved unusable checkpoint" in capsys.readouterr().err
    assert train(more, run_dir=run, resume=True).step == 16  # and the newest is good


@pytest.mark.parametrize("router", ["gumbel", "noisy_topk"])
def test_resume_is_exact_with_random_routers_and_schedules(toy_data, tmp_path, router):
    moe = {"router": router, "num_experts": 6}
    sched = {"gumbel_tau_end": 0.3} if router == "gumbel" else {}
    cfg = tiny_cfg(
        toy_data,
        model={"moe": moe},
        schedule={"top_k_start": 6, "top_k_steps": 6, **sched},
        train={"steps": 10, "grad_accum": 2},
        checkpoint={"every": 3, "keep_last": 4, "keep_best": False},
        eval={"every": 0},
        log={"every": 4},
    )
    train(cfg, run_dir=tmp_path / "ref")
    train(cfg, run_dir=tmp_path / "run")
    for step in (9, 10):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step_{step:07d}")
    result = train(cfg, run_dir=tmp_path / "run", resume=True)  # from step 6: inside the 4..8 log window
    assert result.step == 10 and (tmp_path / "run" / "checkpoints" / "step_0000006").is_dir()
    assert _curves(tmp_path / "run") == _curves(tmp_path / "ref")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [4, 8, 10]


def test_token_ids_outside_the_vocabulary_are_refused_before_the_run_starts(toy_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    tokens = bytearray((data / "train.bin").read_bytes())
    tokens[2:4] = (400).to_bytes(2, "little")  # a byte tokenizer has 257 ids; the model has vocab_size 257+
    (data / "train.bin").write_bytes(bytes(tokens))
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"the train split holds token id 400, outside the vocabulary"):
        train(tiny_cfg(data, train={"steps": 2}), run_dir=run)
    assert not run.exists()  # nothing half-made that would block running the same command again
