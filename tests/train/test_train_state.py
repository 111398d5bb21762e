"""Training-state serialisation, checkpoint rotation, and the telemetry window."""

import json
import random

import numpy as np
import pytest
import torch
from train_helpers import tiny_cfg

from moelab.config import Config, from_dict
from moelab.model import Transformer
from moelab.train import state
from moelab.train.optim import build_optimizer
from moelab.train.telemetry import MetricsLog, Window


def test_nested_state_round_trips_through_json_and_tensors():
    obj = {
        "a": torch.arange(5),
        "b": [np.arange(3, dtype=np.uint32), 1.5, None, "x"],
        "c": {"d": np.int64(7)},
        "py": random.getstate(),
    }
    tensors = {}
    meta = json.loads(json.dumps(state.split_tensors(obj, "s", tensors)))
    back = state.join_tensors(meta, tensors)
    assert torch.equal(back["a"], obj["a"])
    assert back["b"][0].dtype == np.uint32 and (back["b"][0] == obj["b"][0]).all() and back["b"][1:] == [1.5, None, "x"]
    assert back["c"]["d"] == 7


def test_rng_state_round_trip():
    dev = torch.device("cpu")
    saved = state.rng_state(dev)
    tensors = {}
    meta = json.loads(json.dumps(state.split_tensors(saved, "rng", tensors)))
    draws = (torch.rand(3), np.random.rand(3), random.random())
    state.set_rng_state(state.join_tensors(meta, tensors), dev)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2] == again[2]


def test_optimizer_state_keyed_by_name_round_trip():
    cfg = from_dict(Config, tiny_cfg())
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    model(torch.randint(0, 257, (2, 8)), torch.randint(0, 257, (2, 8))).loss.backward()
    opt.step()
    saved = state.optimizer_state(opt)
    assert "layers.0.ffn.experts.gate_up" in saved["state"]
    assert saved["state"]["layers.0.ffn.experts.gate_up"]["exp_avg"].shape == (4, 64, 32)
    fresh = build_optimizer(Transformer(cfg.model), cfg.train)
    state.load_optimizer_state(fresh, saved)
    for p_old, p_new in zip(opt.param_groups[0]["params"], fresh.param_groups[0]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p_old][key], fresh.state[p_new][key])
    other = from_dict(Config, tiny_cfg(model={"n_layers": 3}))
    with pytest.raises(state.BadCheckpoint, match="optimizer parameters differ"):
        state.load_optimizer_state(build_optimizer(Transformer(other.model), other.train), saved)


def test_rotate_keeps_last_k_and_best(tmp_path):
    cfg = from_dict(Config, tiny_cfg())
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    for step in (2, 4, 6, 8):
        path = state.save_train_checkpoint(state.step_dir(tmp_path, step), model, cfg, None, opt, {"step": step})
        if step == 4:
            state.set_best(tmp_path, path)
        state.rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best",
        "step_0000004",
        "step_0000006",
        "step_0000008",
    ]
    assert [p.name for p in state.training_checkpoints(tmp_path)] == ["step_0000008", "step_0000006", "step_0000004"]
    weights, st, _ = state.read_train_state(tmp_path / "checkpoints" / "best")
    assert st["step"] == 4 and "embed.weight" in weights


def test_window_summary_on_hand_counts():
    w = Window()
    w.add(
        {
            "train/loss": torch.tensor(2.0),
            "moe/3/counts": torch.tensor([6.0, 2.0, 0.0, 0.0]),
            "moe/3/dropped": torch.tensor(1.0),
            "moe/3/assignments": torch.tensor(9.0),
            "moe/3/entropy": torch.tensor(1.0),
            "moe/3/aux/z_loss": torch.tensor(0.5),
        }
    )
    w.add(
        {
            "train/loss": torch.tensor(4.0),
            "moe/3/counts": torch.tensor([2.0, 2.0, 4.0, 0.0]),
            "moe/3/dropped": torch.tensor(0.0),
            "moe/3/assignments": torch.tensor(8.0),
            "moe/3/entropy": torch.tensor(0.5),
            "moe/3/aux/z_loss": torch.tensor(1.5),
        }
    )
    s = w.summary()
    assert s["train/loss"] == 3.0
    assert s["moe/3/load"] == [0.5, 0.25, 0.25, 0.0]
    assert (s["moe/3/max_load"], s["moe/3/min_load"], s["moe/3/dead"]) == (0.5, 0.0, 1)
    counts = np.array([8.0, 4.0, 4.0, 0.0])
    assert s["moe/3/load_cv"] == pytest.approx(counts.std() / counts.mean())
    assert s["moe/3/dropped_frac"] == pytest.approx(1 / 17)
    assert s["moe/3/entropy"] == 0.75 and s["moe/3/aux/z_loss"] == 1.0
    restored = Window()
    restored.load_state_dict(json.loads(json.dumps(w.state_dict())), torch.device("cpu"))
    assert restored.summary() == s


def test_metrics_truncate_drops_later_records_and_torn_lines(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.write({"step": step, "train/loss": float("nan") if step == 2 else 1.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "train/lo')  # a kill in the middle of a line
    log.truncate_after(3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]
    assert json.loads(lines[1])["train/loss"] is None  # NaN is written as null: strict JSON


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moelab.train.telemetry import TensorBoard

    tb = TensorBoard(tmp_path / "tb", enabled=True)
    assert tb.active
    for step in (1, 2):
        tb.write({"step": step, "train/loss": 3.0 - step, "moe/0/load": [0.5, 0.5], "val/bpb": None})
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [2.0, 1.0]
    assert "moe/0/load" in acc.Tags()["histograms"]
    assert not TensorBoard(tmp_path / "off", enabled=False).active
