"""Growing the expert pool (train-time schedule and offline), shrinking for inference, and adaptive-k
training telemetry / FLOPs."""

import json

import pytest
import torch

from moelab.config import ModelConfig, MoEConfig
from moelab.errors import UserError
from moelab.grow import anneal_top_k, grow_model, grow_optimizer_state, shrink_model
from moelab.model import Transformer
from moelab.train import state
from moelab.train.loop import train
from moelab.train.optim import build_optimizer
from tests.train.train_helpers import tiny_cfg


def small(**moe) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_dim=64,
        moe=MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": 16, **moe}),
    )
    m = Transformer(cfg)
    for layer in m.moe_layers.values():  # trained-looking, peaked routers
        torch.nn.init.normal_(layer.router.weight, 0.0, 0.5)
    return m.eval()


@pytest.mark.parametrize(
    "moe", [{}, {"normalize": False}, {"num_null_experts": 2, "top_k": 3}, {"router": "sigmoid", "router_bias": True}]
)
def test_grown_model_with_doubled_k_computes_the_same_function(moe):
    m = small(**moe)
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        before = m(x).logits
        grow_model(m, 8, noise=0.0)
        m.set_router_attr("top_k", 2 * m.cfg.moe.top_k)
        after = m(x).logits
    assert m.cfg.moe.num_experts == 8 and m.moe_layers[0].experts.gate_up.shape[0] == 8
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_noise_splits_the_load_between_copies():
    m = small()
    x = torch.randint(0, 64, (8, 32))
    grow_model(m, 8, noise=0.05, seed=1)
    with torch.no_grad():
        counts = m(x).routing[0].tokens_per_expert
    assert bool((counts[:4] > 0).all()) and bool((counts[4:] > 0).all())


def test_router_noise_alone_sizes_the_router_offsets():
    base = small()
    parent = base.moe_layers[0].router.weight.detach().clone()
    quiet, loud = small(), small()
    grow_model(quiet, 8, noise=0.01, seed=1, router_noise=0.0)
    grow_model(loud, 8, noise=0.01, seed=1, router_noise=0.2)
    rq, rl = quiet.moe_layers[0].router.weight.detach(), loud.moe_layers[0].router.weight.detach()
    assert torch.equal(rq[:4], parent) and torch.equal(rq[4:], parent)  # no router offset at all
    off = rl[4:] - parent
    torch.testing.assert_close(rl[:4] - parent, -off)  # opposite offsets, the halves split the tokens
    assert abs(float(off.std()) / float(parent.std()) - 0.2) < 0.05
    # the expert weights got the same (weight) noise either way
    torch.testing.assert_close(quiet.moe_layers[0].experts.gate_up, loud.moe_layers[0].experts.gate_up)


def test_split_noise_is_opposite_on_the_two_halves_and_keeps_the_function_to_second_order():
    x = torch.randint(0, 64, (2, 12))
    ref = small()
    parent = ref.moe_layers[0].experts.gate_up.detach().clone()
    with torch.no_grad():
        before = ref(x).logits

    def change(**kw) -> float:  # max |logit change| of the grown model at 2k
        m = small()
        grow_model(m, 8, **{"noise": 0.0, "seed": 1, **kw})
        gu = m.moe_layers[0].experts.gate_up.detach()
        if kw.get("split_noise"):
            torch.testing.assert_close((gu[:4] + gu[4:]) / 2, parent)  # the pair's mean is the parent
            assert not torch.equal(gu[:4], gu[4:])  # the halves compute different things
            dev = float((gu[4:] - parent).std() / parent.std())
            assert abs(dev - kw["split_noise"]) < 0.2 * kw["split_noise"]  # sized relative to the tensor's std
            assert torch.equal(m.moe_layers[0].router.weight[:4], m.moe_layers[0].router.weight[4:])
        m.set_router_attr("top_k", 4)
        with torch.no_grad():
            return float((m(x).logits - before).abs().max())

    # second order in the split noise (2x the noise, ~4x the change); copy-only noise is first order (~2x)
    assert change(split_noise=0.2) / change(split_noise=0.1) > 3.0
    assert change(noise=0.2, router_noise=0.0) / change(noise=0.1, router_noise=0.0) < 2.5
    assert change(split_noise=0.1) < 0.5 * change(noise=0.1, router_noise=0.0)


def test_optimizer_state_carried_and_new_rows_copy_parents():
    m = small()
    m.train()
    opt = build_optimizer(
        m, type("T", (), {"weight_decay": 0.1, "lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8})()
    )
    x = torch.randint(0, 64, (2, 12))
    m(x, x).loss.backward()
    opt.step()
    old = state.optimizer_state(opt)
    grown = grow_model(m, 6, noise=0.0)
    new = grow_optimizer_state(old, grown, 4)
    name = "layers.0.ffn.experts.gate_up"
    assert name in grown
    a = new["state"][name]["exp_avg_sq"]
    assert a.shape[0] == 6 and torch.equal(a[:4], old["state"][name]["exp_avg_sq"]) and torch.equal(a[4:], a[:2])
    opt2 = build_optimizer(
        m, type("T", (), {"weight_decay": 0.1, "lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8})()
    )
    state.load_optimizer_state(opt2, new)  # fits the grown model


def test_anneal_top_k():
    assert [anneal_top_k(s, 2, 2.0, [10], 4) for s in (9, 10, 11, 12, 13, 14)] == [2, 4, 4, 3, 3, 2]


def test_shrink_prune_and_merge():
    for method in ("prune", "merge"):
        m = small(num_experts=6)
        usage = {i: torch.tensor([5.0, 0.0, 9.0, 1.0, 7.0, 2.0]) for i in m.moe_layers}
        groups = shrink_model(m, 3, usage, method)
        assert m.moe_layers[0].experts.gate_up.shape[0] == 3 and m.cfg.moe.num_experts == 3
        assert sorted(i for g in groups[0] for i in g) == ([0, 2, 4] if method == "prune" else list(range(6)))
        m(torch.randint(0, 64, (1, 5)))
    with pytest.raises(UserError, match="grow: --experts must be in"):
        grow_model(small(), 9)


def test_grow_at_in_training_is_loss_continuous_and_resumable(toy_data, tmp_path):
    cfg = tiny_cfg(
        toy_data,
        schedule={"grow_at": [6], "grow_anneal_steps": 3},
        train={"steps": 10},
        checkpoint={"every": 8, "keep_last": 2},
        eval={"every": 0, "batches": 2},
    )
    res = train(cfg, tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    g = next(r for r in recs if "grow/experts" in r)
    assert g["grow/experts"] == 8 and abs(g["grow/rel_change"]) < 0.01
    assert res.step == 10
    from moelab.checkpoint import load_model

    model, ccfg, _ = load_model(res.checkpoint)
    assert ccfg.model.moe.num_experts == 8
    run_cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "num_experts: 4" in run_cfg
    # resume from step 8 (grown) re-grows the fresh model before loading it
    cfg["train"]["steps"] = 12
    res2 = train(cfg, tmp_path / "run", resume=True)
    assert res2.step == 12


def test_adaptive_k_training_logs_k_and_uses_measured_flops(toy_data, tmp_path):
    cfg = tiny_cfg(toy_data, model={"moe": {"router": "top_p", "top_k": 3, "top_p": 0.5}}, train={"steps": 4})
    train(cfg, tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    r = recs[-1]
    assert 1.0 <= r["moe/0/k_mean"] <= 3.0 and len(r["moe/0/k_dist"]) == 4
    from moelab.config import load_config
    from moelab.model.counting import flops_per_token

    c = load_config(cfg)
    f3 = flops_per_token(c.model, 32)["train"]
    assert r["flops"] < 4 * 4 * 32 * f3  # fewer than k_max experts on average


def test_grow_cli_grow_and_shrink(toy_data, tmp_path, capsys):
    from moelab.cli import main

    train(tiny_cfg(toy_data, train={"steps": 4}), tmp_path / "run")
    assert main(["grow", str(tmp_path / "run"), str(tmp_path / "g"), "--experts", "8", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "grown to 8 experts" in out and "at top-4" in out
    assert (
        main(
            ["grow", str(tmp_path / "g"), str(tmp_path / "s"), "--experts", "3", "--shrink", "merge", "--batches", "2"]
        )
        == 0
    )
    assert "quality cost" in capsys.readouterr().out
    assert main(["grow", str(tmp_path / "run"), str(tmp_path / "x"), "--experts", "99"]) == 2
    assert "--experts must be in" in capsys.readouterr().err
    args = ["grow", str(tmp_path / "run"), str(tmp_path / "y"), "--experts", "8", "--router-noise", "-1"]
    assert main(args) == 2
    assert "--noise / --router-noise / --split-noise: expected >= 0" in capsys.readouterr().err
    assert main([*args[:-2], "--split-noise", "-0.5"]) == 2
    assert "--split-noise: expected >= 0, got 0.01 / None / -0.5" in capsys.readouterr().err
    args[-1] = "0.1"
    assert (
        main([*args, "--split-noise", "0.2", "--batches", "2"]) == 0 and "grown to 8 experts" in capsys.readouterr().out
    )
    assert main(["grow", str(tmp_path / "run"), str(tmp_path / "x"), "--experts", "99"]) == 2
    assert "--experts must be in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.grow_at=[0]", "schedule.grow_at: expected a list of positive optimizer steps"),
        ("schedule.grow_noise=-1", "schedule.grow_anneal_steps / grow_noise: expected >= 0"),
        ("schedule.grow_router_noise=-0.1", "schedule.grow_router_noise: expected >= 0 or null"),
        ("schedule.grow_split_noise=-0.1", "schedule.grow_split_noise: expected >= 0"),
        ("moe.router=hierarchical", "schedule.grow_at: growing experts does not support router 'hierarchical'"),
    ],
)
def test_grow_config_errors_are_one_line(override, message):
    from moelab.config import load_config
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(None, ["schedule.grow_at=[5]", override])
    assert str(e.value).count("\n") == 0 and message in str(e.value)
