"""Routing schedules at chosen steps, their application to a model, and the aux-loss-free bias update."""

import math

import pytest
import torch

from moelab.config import Config, from_dict
from moelab.errors import ConfigError
from moelab.model import Transformer
from moelab.train import schedules


def _cfg(moe=None, schedule=None, steps=100):
    return from_dict(
        Config,
        {
            "model": {
                "vocab_size": 64,
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 4,
                "max_seq_len": 64,
                "moe": {"num_experts": 8, "top_k": 2, "expert_dim": 16, **(moe or {})},
            },
            "data": {"seq_len": 32},
            "train": {"steps": steps},
            "schedule": schedule or {},
        },
    )


def test_defaults_are_constant():
    cfg = _cfg()
    for step in (0, 50, 99):
        s = schedules.at_step(step, cfg)
        assert (s.tau, s.top_k) == (1.0, 2)
        assert s.coefs == {"load_balance": 0.01, "z_loss": 0.001, "cv": 0.0, "variance": 0.0}


def test_gumbel_tau_exponential_linear_cosine():
    base = {"router": "gumbel", "gumbel_tau": 2.0}
    exp = _cfg(base, {"gumbel_tau_end": 0.5, "gumbel_tau_steps": 40})
    assert schedules.gumbel_tau(0, exp) == 2.0
    assert schedules.gumbel_tau(20, exp) == pytest.approx(1.0)  # geometric midpoint of 2 and 0.5
    assert schedules.gumbel_tau(40, exp) == pytest.approx(0.5)
    assert schedules.gumbel_tau(90, exp) == pytest.approx(0.5)  # held after the anneal
    lin = _cfg(base, {"gumbel_tau_end": 0.5, "gumbel_tau_steps": 40, "gumbel_tau_shape": "linear"})
    assert schedules.gumbel_tau(10, lin) == pytest.approx(2.0 - 1.5 / 4)
    cos = _cfg(base, {"gumbel_tau_end": 0.5, "gumbel_tau_shape": "cosine"})  # steps default: the whole run
    assert schedules.gumbel_tau(50, cos) == pytest.approx(1.25)
    assert schedules.gumbel_tau(25, cos) == pytest.approx(0.5 + 0.75 * (1 + math.cos(math.pi / 4)))


def test_top_k_dense_to_sparse():
    cfg = _cfg(schedule={"top_k_start": 8, "top_k_steps": 60})
    assert [schedules.top_k(s, cfg) for s in (0, 15, 30, 45, 60, 99)] == [8, 7, 5, 4, 2, 2]
    half = _cfg(schedule={"top_k_start": 8})  # default: reach K at half the run
    assert schedules.top_k(50, half) == 2 and schedules.top_k(25, half) == 5


def test_aux_coef_ramp():
    cfg = _cfg(schedule={"aux_coef_start": 10.0, "aux_coef_steps": 20})
    assert schedules.aux_coefs(0, cfg)["load_balance"] == pytest.approx(0.1)
    assert schedules.aux_coefs(10, cfg)["load_balance"] == pytest.approx(0.055)
    assert schedules.aux_coefs(20, cfg)["z_loss"] == pytest.approx(0.001)
    assert schedules.aux_coefs(99, cfg)["load_balance"] == pytest.approx(0.01)


def test_apply_sets_router_attributes():
    cfg = _cfg({"router": "gumbel"}, {"gumbel_tau_end": 0.1, "top_k_start": 6, "top_k_steps": 10})
    model = Transformer(cfg.model)
    schedules.apply(model, schedules.at_step(0, cfg), cfg)
    assert {(layer.router.tau, layer.router.top_k) for layer in model.moe_layers.values()} == {(1.0, 6)}
    schedules.apply(model, schedules.at_step(100, cfg), cfg)
    assert [(round(layer.router.tau, 9), layer.router.top_k) for layer in model.moe_layers.values()] == [(0.1, 2)] * 2
    out = model(torch.randint(0, 64, (2, 8)))
    assert all(r.topk_ids.shape[1] == 2 for r in out.routing.values())


def test_bias_update_moves_towards_balance():
    cfg = _cfg({"router": "sigmoid", "router_bias": True, "bias_update_rate": 0.01})
    assert schedules.uses_bias_update(cfg)
    model = Transformer(cfg.model)
    counts = {0: torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6]), 1: torch.full((8,), 2.0)}
    schedules.update_router_bias(model, counts, 0.01)
    b0, b1 = model.moe_layers[0].router.bias, model.moe_layers[1].router.bias
    assert b0[0] == pytest.approx(-0.01) and b0[7] == pytest.approx(-0.01) and b0[1] == pytest.approx(0.01)
    assert torch.equal(b1, torch.zeros(8))  # balanced: sign(0) = 0
    assert not schedules.uses_bias_update(_cfg({"router": "sigmoid", "bias_update_rate": 0.01}))


def test_bias_stays_put_where_fine_tuning_freezes_the_router():
    # experts-only or non-router LoRA tuning freezes the router: its selection bias must not drift either
    cfg = _cfg({"router": "sigmoid", "router_bias": True, "bias_update_rate": 0.01})
    model = Transformer(cfg.model)
    model.moe_layers[0].router.requires_grad_(False)
    counts = {0: torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6]), 1: torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6])}
    schedules.update_router_bias(model, counts, 0.01)
    assert torch.equal(model.moe_layers[0].router.bias, torch.zeros(8))
    assert model.moe_layers[1].router.bias[0] == pytest.approx(-0.01)  # a trained router's bias still moves


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="schedule.gumbel_tau_end: temperature annealing needs"):
        _cfg(schedule={"gumbel_tau_end": 0.5})
    with pytest.raises(ConfigError, match="schedule.top_k_start: expected between"):
        _cfg(schedule={"top_k_start": 9})
    with pytest.raises(ConfigError, match="gumbel_tau_shape"):
        _cfg({"router": "gumbel"}, {"gumbel_tau_end": 0.5, "gumbel_tau_shape": "cubic"})
