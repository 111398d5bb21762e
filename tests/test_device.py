"""Device names (`train.device`, `--device`) and placement, without a GPU: CUDA's presence is faked where
only the resolution logic is under test, and the `meta` device stands in for "not the CPU"."""

import pytest
import torch
from device_checks import assert_on_device, tiny_checkpoint

from moelab.config import ParallelConfig
from moelab.device import misplaced, resolve_device
from moelab.errors import UserError
from moelab.parallel import ParallelContext, init_parallel, parallelize


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda reports two devices (only the name resolution runs; nothing is put there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_auto_picks_cuda_when_present(fake_cuda):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)  # with its index: equal to a tensor's .device
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"train.device='cuda:2', but this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_cpu_names_and_bad_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device("cpu:0") == torch.device("cpu")
    for bad in ("gpu", "mps", "cuda:x", "meta", ""):
        with pytest.raises(UserError, match="--device: expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad, "--device")
    with pytest.raises(UserError, match=r"^train.device='cuda', but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device(torch.device("meta")) == torch.device("meta")  # a torch.device is taken as given


def test_single_process_context_reports_the_requested_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_parallel(ParallelConfig(), device="cpu").device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        init_parallel(ParallelConfig(), device="cuda:0")


def test_parallelize_in_one_process_leaves_the_model_where_the_caller_put_it():
    """The bug of issue 13: the trainer put the model on CUDA, then parallelize moved it to the context's
    device (the CPU). A context reporting another device (meta) must not move it either."""
    model = torch.nn.Linear(4, 4)
    model.register_buffer("b", torch.zeros(2))
    out = parallelize(model, ParallelContext(device=torch.device("meta")))
    assert_on_device(out, "cpu")


def test_misplaced_names_parameters_and_buffers():
    model = torch.nn.BatchNorm1d(3)
    assert misplaced(model, torch.device("cpu")) == []
    model.running_mean = model.running_mean.to("meta")
    assert misplaced(model, torch.device("cpu")) == ["buffer running_mean on meta"]


def test_generation_engine_and_cache_stay_on_the_requested_device(tmp_path):
    from moelab.infer.generate import load
    from moelab.infer.scheduler import Engine

    ckpt = tiny_checkpoint(tmp_path)
    meta = torch.device("meta")
    model, tok = load(ckpt, meta, "bfloat16")
    engine = Engine(model, tok, max_batch=2)
    assert_on_device(engine.model, meta)
    assert engine.device == meta and engine.cache.k.device == meta and engine.cache.v.device == meta
    assert engine.cache.k.dtype == torch.bfloat16
    model, _ = load(ckpt, "cpu")
    assert_on_device(model, "cpu")


def test_generate_and_serve_refuse_cuda_without_it_in_one_line(tmp_path, monkeypatch, capsys):
    from moelab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt = tiny_checkpoint(tmp_path)
    assert main(["generate", str(ckpt), "--prompt", "a", "--device", "cuda"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--device='cuda', but CUDA is not available" in err and len(err.splitlines()) == 1
    assert main(["serve", str(ckpt), "--device", "gpu0"]) != 0
    assert "--device: expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
