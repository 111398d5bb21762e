"""Optimizer parameter groups and the learning-rate schedule."""

import math

import pytest
import torch

from moelab.config import Config, from_dict
from moelab.model import Transformer
from moelab.train.optim import build_optimizer, lr_at, param_groups


def _model(**moe):
    cfg = from_dict(
        Config,
        {
            "model": {
                "vocab_size": 64,
                "d_model": 32,
                "n_layers": 3,
                "n_heads": 4,
                "n_kv_heads": 2,
                "ffn_dim": 48,
                "max_seq_len": 256,
                "qkv_bias": True,
                "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 16, "layers": [1, 2], **moe},
            }
        },
    )
    return Transformer(cfg.model), cfg


@pytest.mark.parametrize("moe", [{}, {"router": "noisy_topk", "num_shared_experts": 1, "shared_expert_gate": True}])
def test_every_parameter_in_exactly_one_group(moe):
    model, _ = _model(**moe)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {n: g for g in groups.values() for n in g["param_names"]}
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    # the easy mistakes: stacked 3-D expert weights decay, 2-D router gates do not
    assert names["layers.1.ffn.experts.gate_up"]["name"] == "decay"
    assert names["layers.1.ffn.experts.down"]["name"] == "decay"
    assert names["layers.1.ffn.router.weight"]["name"] == "router"
    assert names["layers.0.ffn.gate_proj.weight"]["name"] == "decay"
    assert names["layers.0.attn.q_proj.weight"]["name"] == "decay"
    assert names["lm_head.weight"]["name"] == "decay"
    for n in ("embed.weight", "norm.weight", "layers.0.attn_norm.weight", "layers.0.attn.q_proj.bias"):
        assert names[n]["name"] == "no_decay"
    if moe:
        assert names["layers.1.ffn.router.noise_weight"]["name"] == "router"
        assert names["layers.2.ffn.shared_gate.weight"]["name"] == "router"
        assert names["layers.2.ffn.shared.down_proj.weight"]["name"] == "decay"
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == groups["router"]["weight_decay"] == 0.0


def test_tied_embedding_counted_once_and_not_decayed():
    cfg = from_dict(
        Config,
        {
            "model": {
                "vocab_size": 64,
                "d_model": 32,
                "n_layers": 1,
                "n_heads": 4,
                "tie_embeddings": True,
                "moe": {"num_experts": 2, "top_k": 1, "expert_dim": 16},
            }
        },
    )
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert any(p is model.embed.weight for g in opt.param_groups if g["name"] == "no_decay" for p in g["params"])


def test_weight_decay_applies_only_to_decay_group():
    model, cfg = _model()
    opt = build_optimizer(model, from_dict(Config, {"train": {"lr": 0.1, "weight_decay": 0.5}}).train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay can move a weight
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (n.endswith(("experts.gate_up", "experts.down", "proj.weight")) or n == "lm_head.weight"), n


def test_lr_schedule_values():
    t = from_dict(Config, {"train": {"steps": 110, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}}).train
    assert lr_at(0, t) == pytest.approx(1 / 11)
    assert lr_at(9, t) == pytest.approx(10 / 11)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(109, t) == pytest.approx(0.1)
    mid = 10 + 99 / 2
    assert lr_at(int(mid), t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (int(mid) - 10) / 99)))
    lin = from_dict(
        Config, {"train": {"steps": 110, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "schedule": "linear"}}
    ).train
    assert lr_at(10 + 33, lin) == pytest.approx(1.0 - 0.9 / 3)
    const = from_dict(Config, {"train": {"steps": 110, "lr": 1.0, "warmup_steps": 0, "schedule": "constant"}}).train
    assert {lr_at(s, const) for s in range(110)} == {1.0}
    values = [lr_at(s, t) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay after warmup


def test_budget_seconds_schedule_runs_over_time_not_steps():
    t = from_dict(
        Config,
        {"train": {"steps": 10_000, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "budget_seconds": 60.0}},
    ).train
    assert lr_at(5, t, elapsed_s=3.0) == pytest.approx(6 / 11)  # warmup still counts steps
    assert lr_at(50, t, elapsed_s=30.0) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(50, t, elapsed_s=60.0) == pytest.approx(0.1)  # the budget is spent: min_lr, whatever the step
    assert lr_at(9_000, t, elapsed_s=90.0) == pytest.approx(0.1)
    lin = from_dict(
        Config, {"train": {"lr": 1.0, "min_lr": 0.0, "warmup_steps": 0, "schedule": "linear", "budget_seconds": 8}}
    ).train
    assert lr_at(3, lin, elapsed_s=2.0) == pytest.approx(0.75)
    # whichever ends first leads the schedule: train.steps on a fast machine
    fast = from_dict(Config, {"train": {"steps": 110, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}}).train
    both = from_dict(
        Config, {"train": {"steps": 110, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "budget_seconds": 1e6}}
    ).train
    assert [lr_at(s, both, elapsed_s=s * 1e-3) for s in range(110)] == pytest.approx(
        [lr_at(s, fast) for s in range(110)]
    )


@pytest.mark.parametrize("bad", [0, -5])
def test_budget_seconds_must_be_positive(bad):
    from moelab.errors import UserError

    with pytest.raises(UserError, match=r"train.budget_seconds: expected > 0 or null, got"):
        from_dict(Config, {"train": {"budget_seconds": bad}})


def test_router_lr_scale_scales_only_the_router_group():
    from moelab.train.optim import set_lr

    model, cfg = _model()
    opt = build_optimizer(model, cfg.train)
    set_lr(opt, 1e-3, 0.1)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"decay": 1e-3, "no_decay": 1e-3, "router": pytest.approx(1e-4)}
    set_lr(opt, 2e-3)  # default scale 1
    assert {g["lr"] for g in opt.param_groups} == {2e-3}


def test_router_lr_scale_is_what_the_trainer_steps_with(toy_data, tmp_path):
    from train_helpers import tiny_cfg

    from moelab.train.loop import Trainer

    cfg = tiny_cfg(toy_data, train={"steps": 3, "router_lr_scale": 0.25}, eval={"every": 0}, checkpoint={"every": 0})
    t = Trainer(cfg, tmp_path / "run")
    t.run()
    lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    expected = lr_at(2, t.cfg.train)  # the last step's LR
    assert lrs["decay"] == pytest.approx(expected) and lrs["router"] == pytest.approx(0.25 * expected)


@pytest.mark.parametrize("bad", [0, -1.0])
def test_router_lr_scale_must_be_positive(bad):
    from moelab.errors import UserError

    with pytest.raises(UserError, match=r"train.router_lr_scale: expected > 0, got"):
        from_dict(Config, {"train": {"router_lr_scale": bad}})
