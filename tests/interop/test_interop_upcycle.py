"""Sparse upcycling: with --noise 0 the MoE model computes the dense model's logits exactly."""

import pytest
import torch
from interop_helpers import hf_logits, hf_model, ml_logits, moelab_checkpoint, random_ids

from moelab.checkpoint import load_model
from moelab.config import MoEConfig
from moelab.interop.upcycle import parse_layers, upcycle_model

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_upcycled_hf_dense_model_equals_dense_logits(arch, tmp_path, cli):
    pytest.importorskip("transformers")
    dense = hf_model(arch, seed=4)
    dense.save_pretrained(tmp_path / "dense")
    code, out, err = cli("upcycle", tmp_path / "dense", tmp_path / "moe", "--experts", 4, "--top-k", 2)
    assert code == 0, err
    assert "layers [0, 1, 2] now have 4 experts" in out
    model, cfg, _ = load_model(tmp_path / "moe")
    assert cfg.model.moe_layer_ids() == [0, 1, 2] and cfg.model.moe.expert_dim == 48
    ids = random_ids(128)
    ref = hf_logits(dense, ids)
    assert ref.abs().max() > 1.0
    assert (ml_logits(model, ids) - ref).abs().max() < 1e-4
    # the experts really are used: their routing is not degenerate, and they are identical copies
    ffn = model.layers[1].ffn
    assert torch.equal(ffn.experts.gate_up[0], ffn.experts.gate_up[3])
    routing = model(ids).routing[1].tokens_per_expert
    assert (routing > 0).sum() >= 2


def test_upcycle_moelab_run_with_layer_pattern_and_noise(tmp_path, cli):
    dense_ckpt = moelab_checkpoint(tmp_path / "dense", n_layers=4, moe=MoEConfig(layers="none"))
    dense, _, _ = load_model(dense_ckpt)
    code, out, err = cli("upcycle", dense_ckpt, tmp_path / "moe", "--experts", 8, "--top-k", 2, "--layers", "every:2")
    assert code == 0, err
    moe, cfg, _ = load_model(tmp_path / "moe")
    assert cfg.model.moe_layer_ids() == [1, 3] and list(moe.moe_layers) == [1, 3]
    ids = random_ids(128)
    assert (ml_logits(moe, ids) - ml_logits(dense, ids)).abs().max() < 1e-4

    code, _, err = cli(
        "upcycle", dense_ckpt, tmp_path / "noisy", "--experts", 8, "--top-k", 2, "--layers", "0,2", "--noise", 0.05
    )
    assert code == 0, err
    noisy, cfg, _ = load_model(tmp_path / "noisy")
    assert cfg.model.moe_layer_ids() == [0, 2]
    w = noisy.layers[0].ffn.experts.gate_up
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - w[1]).std() / w[0].std()
    assert 0.03 < rel < 0.1  # two independent draws at 5% of the weight's std: sqrt(2) * 0.05
    assert (ml_logits(noisy, ids) - ml_logits(dense, ids)).abs().max() > 1e-3


def test_upcycle_model_api_keeps_dense_weights():
    from moelab.config import ModelConfig
    from moelab.model import Transformer

    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, ffn_dim=40, max_seq_len=32, moe=MoEConfig(layers="none")
    )
    dense = Transformer(cfg).eval()
    moe, new_cfg = upcycle_model(dense, cfg, experts=3, top_k=1, layers=parse_layers("1"))
    assert new_cfg.moe_layer_ids() == [1] and cfg.moe_layer_ids() == []  # input config untouched
    assert torch.equal(moe.layers[0].ffn.up_proj.weight, dense.layers[0].ffn.up_proj.weight)
    assert torch.equal(moe.layers[1].ffn.experts.down[2], dense.layers[1].ffn.down_proj.weight)
    ids = random_ids(64, (2, 10))
    assert (ml_logits(moe, ids) - ml_logits(dense, ids)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--experts", 2, "--top-k", 3], "1 <= --top-k <= --experts"),
        (["--experts", 2, "--top-k", 1, "--layers", "9"], "--layers: layer indices must be in [0, 2)"),
        (["--experts", 2, "--top-k", 1, "--layers", "sometimes"], "--layers: expected 'all'"),
        (["--experts", 2, "--top-k", 1, "--noise", -1], "--noise must be >= 0"),
    ],
)
def test_upcycle_bad_arguments(tmp_path, cli, args, needle):
    dense_ckpt = moelab_checkpoint(tmp_path / "dense", moe=MoEConfig(layers="none"))
    code, _, err = cli("upcycle", dense_ckpt, tmp_path / "out", *args)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_upcycle_refuses_a_model_that_is_already_moe(tmp_path, cli):
    ckpt = moelab_checkpoint(tmp_path / "moe")
    code, _, err = cli("upcycle", ckpt, tmp_path / "out", "--experts", 4, "--top-k", 2)
    assert code == 2 and "already has MoE layers [0, 1]" in err
