"""The trainer keeps its model on the device it asked for, whatever the parallel context reports."""

import sys

import torch
from device_checks import assert_on_device
from train_helpers import tiny_cfg

from moelab.parallel import init_parallel
from moelab.train.loop import Trainer


def test_trainer_model_stays_on_the_requested_device(toy_data, tmp_path, monkeypatch):
    """Issue 13: in one process `parallelize` moved the model to the context's device after the trainer had put
    it on CUDA. Here the context reports `meta` while train.device=cpu: the model (and so training) must stay on
    the CPU, through init, activation checkpointing, training, eval and resume."""

    def other_device(*a, **kw):
        ctx = init_parallel(*a, **kw)
        ctx.device = torch.device("meta")
        return ctx

    monkeypatch.setattr(sys.modules["moelab.train.loop"], "init_parallel", other_device)
    cfg = tiny_cfg(
        toy_data,
        train={"steps": 4, "device": "cpu", "activation_checkpointing": True},
        eval={"every": 2},
        checkpoint={"every": 2},
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.device == torch.device("cpu")
    assert_on_device(trainer.model, "cpu")
    result = trainer.run()
    assert result.step == 4 and result.last_record["val/loss"] is not None
    assert_on_device(trainer.model, "cpu")
    assert all(s["exp_avg"].device.type == "cpu" for s in trainer.optimizer.state.values())

    cfg["train"]["steps"] = 6
    resumed = Trainer(cfg, tmp_path / "run", resume=True)
    assert resumed.run().step == 6
    assert_on_device(resumed.model, "cpu")
    init = Trainer(
        tiny_cfg(toy_data, train={"steps": 1, "device": "cpu"}), tmp_path / "init", init_from=tmp_path / "run"
    )
    assert_on_device(init.model, "cpu")


def test_parallel_context_in_one_process_is_the_trainers_device(toy_data, tmp_path):
    trainer = Trainer(tiny_cfg(toy_data, train={"steps": 1, "device": "cpu"}), tmp_path / "run")
    assert trainer.par.device == trainer.device == torch.device("cpu")
