"""The whole model: shape contract, causality, determinism, per-layer placement, counting."""

import pytest
import torch

from moelab import Config, ModelConfig, MoEConfig, MoELayer, Transformer, load_config
from moelab.config import ROUTERS
from moelab.model.counting import count_params, flops_per_token
from moelab.model.layers import SwiGLU


def tiny(**moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=32,
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16, **moe),
    )


def test_output_contract():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(0, 97, (2, 10))
    out = model(idx, targets=idx)
    assert out.logits.shape == (2, 10, 97)
    assert set(out.aux_losses) == {"load_balance", "z_loss"}  # cv, variance: coefficient 0, not computed
    assert sorted(out.routing) == [0, 1, 2]
    stats = out.routing[0]
    assert stats.tokens_per_expert.shape == (4,) and stats.tokens_per_expert.sum() == 2 * 10 * 2
    expected = out.ce_loss + 0.01 * out.aux_losses["load_balance"] + 0.001 * out.aux_losses["z_loss"]
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_object_accepted_and_no_targets_means_no_loss():
    model = Transformer(Config(model=tiny()))
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert out.loss is None and out.ce_loss is None


@pytest.mark.parametrize("router", [r for r in ROUTERS if r != "expert_choice"])
def test_causal_changing_future_tokens_never_changes_past_logits(router):
    torch.manual_seed(0)
    model = Transformer(tiny(router=router)).eval()
    idx = torch.randint(0, 97, (1, 16))
    other = idx.clone()
    other[0, 9:] = torch.randint(0, 97, (7,))
    a, b = model(idx).logits, model(other).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_capacity_dropping_is_not_causal_but_is_reported():
    # With a capacity, which assignments survive depends on the whole batch: documented, measured.
    model = Transformer(tiny(capacity_factor=0.5)).train()
    out = model(torch.randint(0, 97, (2, 16)))
    assert all(r.dropped > 0 for r in out.routing.values())
    assert all(0 < r.dropped_fraction < 1 for r in out.routing.values())


def test_determinism_under_seed():
    def build_and_run():
        torch.manual_seed(42)
        model = Transformer(tiny(router="noisy_topk")).train()
        torch.manual_seed(7)
        return model(torch.arange(20).view(2, 10), targets=torch.arange(20).view(2, 10)).loss

    assert torch.equal(build_and_run(), build_and_run())


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("all", [0, 1, 2, 3]),
        ("none", []),
        ("every:2", [1, 3]),
        ("first_dense:1", [1, 2, 3]),
        ([2], [2]),
    ],
)
def test_moe_layer_placement(layers, expected):
    cfg = ModelConfig(
        vocab_size=50,
        d_model=16,
        n_layers=4,
        n_heads=2,
        ffn_dim=24,
        max_seq_len=8,
        moe=MoEConfig(num_experts=2, top_k=1, expert_dim=8, layers=layers),
    )
    model = Transformer(cfg)
    assert [i for i, b in enumerate(model.layers) if isinstance(b.ffn, MoELayer)] == expected
    assert all(isinstance(b.ffn, SwiGLU) for i, b in enumerate(model.layers) if i not in expected)
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert sorted(out.routing) == expected
    assert (out.aux_losses == {}) == (expected == [])


@pytest.mark.parametrize("preset", ["demo", "tiny", "tiny-fine", "tiny-dense", "small", "small-dense", "large"])
def test_counting_matches_built_model(preset):
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / f"{preset}.yaml").model
    pc = count_params(cfg)
    with torch.device("meta"):  # no memory, no init cost: only shapes
        model = Transformer(cfg)
    assert pc.total == sum(p.numel() for p in model.parameters())
    assert flops_per_token(cfg)["train"] == 3 * flops_per_token(cfg)["inference"]


def test_tiny_preset_sizes_match_the_issue():
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "tiny.yaml").model
    assert round(count_params(cfg).total / 1e6, 1) == 17.6


def test_tied_embeddings_share_one_tensor_and_count_once():
    cfg = tiny()
    cfg.tie_embeddings = True
    model = Transformer(cfg)
    assert model.lm_head.weight is model.embed.weight
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_init_rules():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=256,
        n_layers=8,
        n_heads=4,
        ffn_dim=512,
        max_seq_len=8,
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=256, num_shared_experts=1, shared_expert_gate=True),
    )
    model = Transformer(cfg)
    layer = model.layers[0]
    assert torch.all(layer.attn_norm.weight == 1)
    assert torch.all(layer.ffn.shared_gate.weight == 0)
    assert layer.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.ffn.experts.down.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert layer.ffn.experts.gate_up.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("router", ["softmax_topk", "hierarchical"])
def test_router_init_std_sets_only_the_router_gates(router):
    moe = dict(num_experts=8, top_k=2, expert_dim=32, router=router, num_groups=2 if router == "hierarchical" else 1)
    base = dict(vocab_size=64, d_model=256, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=8)
    torch.manual_seed(0)
    default = Transformer(ModelConfig(**base, moe=MoEConfig(**moe)))
    torch.manual_seed(0)
    small = Transformer(ModelConfig(**base, moe=MoEConfig(**moe, router_init_std=1e-3)))
    gates = {n for n, _ in small.named_parameters() if n.endswith(("router.weight", "router.group_weight"))}
    assert len(gates) == (4 if router == "hierarchical" else 2)
    other = dict(default.named_parameters())
    for name, p in small.named_parameters():
        if name in gates:
            assert p.std().item() == pytest.approx(1e-3, rel=0.1)
            assert other[name].std().item() == pytest.approx(0.02, rel=0.1)  # None = model.init_std
        else:
            assert torch.equal(p, other[name]), name  # nothing else moves, nor does the RNG stream before it


def test_router_init_std_must_not_be_negative():
    from moelab.config import from_dict
    from moelab.errors import UserError

    with pytest.raises(UserError, match=r"model.moe.router_init_std: expected >= 0 or null"):
        from_dict(Config, {"model": {"moe": {"router_init_std": -0.1}}})
