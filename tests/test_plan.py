"""The memory planner: estimates against measured peaks on CPU, invariants, and the `moelab plan` CLI."""

import json

import pytest

from moelab.bench.plan import CONFIGS, measure_train_peak
from moelab.cli import main
from moelab.config import Config, from_dict, load_config
from moelab.errors import UserError
from moelab.model.counting import count_params
from moelab.plan import layer_shapes, parse_bytes, plan, train_memory
from tests.conftest import REPO


def model_cfg(model: dict, seq_len: int):
    return from_dict(Config, {"model": model, "data": {"seq_len": seq_len}}).model


@pytest.mark.parametrize("name,checkpointing", [("wide-vocab", False), ("many-experts", False), ("deep-mixed", True)])
def test_estimate_within_15_percent_of_measured_peak(name, checkpointing):
    # Measured: peak live-tensor bytes of a steady-state fp32 training step (profiler memory timeline).
    model, micro_batch, seq_len = CONFIGS[name]
    measured = measure_train_peak(model, micro_batch, seq_len, activation_checkpointing=checkpointing)
    est = train_memory(
        model_cfg(model, seq_len), micro_batch, seq_len, dtype="float32", activation_checkpointing=checkpointing
    )
    ratio = est.peak / measured["peak_tensor_bytes"]
    assert 0.85 <= ratio <= 1.15, (
        f"{name}: planned {est.peak >> 20} MiB, measured {measured['peak_tensor_bytes'] >> 20} MiB (ratio {ratio:.3f})"
    )


def test_layer_shapes_add_up_to_the_parameter_count():
    for preset in ["tiny", "small", "moe-100b"]:
        cfg = load_config(REPO / "configs" / f"{preset}.yaml").model
        s = layer_shapes(cfg)
        assert sum(s.dense_params) + sum(s.expert_params) + s.head_params + s.embed_params == count_params(cfg).total


def test_sharding_divides_state_and_checkpointing_cuts_activations():
    cfg = load_config(REPO / "configs" / "small.yaml").model
    one = train_memory(cfg, 4, 512)
    eight = train_memory(cfg, 4, 512, devices=8, ep=2)
    assert eight.weights * 8 == pytest.approx(one.weights, rel=1e-6)
    assert eight.optimizer * 8 == pytest.approx(one.optimizer, rel=1e-6)
    assert eight.fsdp_working_set > 0 == one.fsdp_working_set
    assert one.activations_checkpointed < one.activations / 3
    off = train_memory(cfg, 4, 512, offload="optimizer")
    assert off.optimizer == 0 and off.host == one.optimizer and off.peak < one.peak


def test_largest_micro_batch_is_the_boundary():
    cfg = load_config(REPO / "configs" / "tiny.yaml").model
    p = plan(cfg, device_memory=parse_bytes("2GiB"), dtype="float32", seq_len=256)
    assert p.max_micro_batch >= 1 and p.max_micro_batch_checkpointed > p.max_micro_batch
    fits = lambda mb, ck: train_memory(cfg, mb, 256, activation_checkpointing=ck).peak <= 2 * 2**30  # noqa: E731
    assert fits(p.max_micro_batch, False) and not fits(p.max_micro_batch + 1, False)
    assert fits(p.max_micro_batch_checkpointed, True) and not fits(p.max_micro_batch_checkpointed + 1, True)


def test_100b_fits_one_80gib_device_only_with_expert_offload(capsys):
    cfg = REPO / "configs" / "moe-100b.yaml"
    assert main(["plan", str(cfg), "--devices", "1", "--device-memory", "80GiB", "--json"]) == 0
    resident = json.loads(capsys.readouterr().out)
    assert 95e9 < resident["params_total"] < 105e9
    assert not resident["inference_fits"] and not resident["train_fits"]
    assert main(["plan", str(cfg), "--devices", "1", "--device-memory", "80GiB", "--offload", "experts", "--json"]) == 0
    offloaded = json.loads(capsys.readouterr().out)
    assert offloaded["inference_fits"]
    assert offloaded["inference"]["host_or_disk"] > 150 * 2**30  # the experts stay on host/disk
    assert main(["plan", str(cfg), "--devices", "8", "--device-memory", "80GiB", "--activation-checkpointing"]) == 0
    assert "largest micro-batch" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--device-memory", "80XB"], "--device-memory"),
        (["--device-memory=-1GiB"], "--device-memory"),
        (["--device-memory", "8GiB", "--devices", "0"], "--devices"),
        (["--device-memory", "8GiB", "--devices", "4", "--ep", "3"], "--ep"),
        (["--device-memory", "8GiB", "--micro-batch", "0"], "--micro-batch"),
    ],
)
def test_bad_plan_arguments_are_one_line_errors(argv, match, capsys):
    assert main(["plan", str(REPO / "configs" / "tiny.yaml"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moelab plan: error:") and match in err[0]


def test_parse_bytes_units():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("1.5MiB") == 3 * 2**19
    with pytest.raises(UserError):
        parse_bytes("lots")
