"""Tiny random HF models (built locally) -> moelab: logits within 1e-4 and identical greedy
continuations; moelab -> HF -> moelab is bit-exact; sharded and fused-expert files read the same."""

import json

import pytest
import torch
from interop_helpers import greedy, hf_logits, hf_model, ml_logits, moelab_checkpoint, random_ids

from moelab.checkpoint import load_model
from moelab.interop.hf import read_hf_model

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)

pytest.importorskip("transformers")

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _check_parity(ours, theirs, vocab):
    ids = random_ids(vocab)
    a, b = ml_logits(ours, ids), hf_logits(theirs, ids)
    assert a.abs().max() > 1.0  # decisive routing, not near-zero logits
    assert (a - b).abs().max() < 1e-4
    prompt = ids[:1, :6]
    assert greedy(lambda x: ml_logits(ours, x), prompt, 12) == greedy(lambda x: hf_logits(theirs, x), prompt, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_import_matches_transformers_and_export_round_trips(arch, tmp_path, cli):
    theirs = hf_model(arch)
    theirs.save_pretrained(tmp_path / "hf")
    code, out, err = cli("import", "hf", tmp_path / "hf", tmp_path / "ml")
    assert code == 0, err
    assert "max |delta logit|" in out and "identical" in out
    ours, cfg, _ = load_model(tmp_path / "ml")
    _check_parity(ours, theirs, cfg.model.vocab_size)

    code, out, err = cli("export", "hf", tmp_path / "ml", tmp_path / "hf2", "--arch", arch)
    assert code == 0, err
    assert f"as {arch}" in out
    code, _, err = cli("import", "hf", tmp_path / "hf2", tmp_path / "ml2")
    assert code == 0, err
    again, cfg2, _ = load_model(tmp_path / "ml2")
    assert cfg2.model == cfg.model
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = random_ids(cfg.model.vocab_size)
    assert torch.equal(ml_logits(ours, ids), ml_logits(again, ids))


def test_exported_directory_loads_in_transformers_with_all_weights(tmp_path, cli):
    import transformers

    theirs = hf_model("qwen2_moe", seed=3)
    theirs.save_pretrained(tmp_path / "hf")
    assert cli("import", "hf", tmp_path / "hf", tmp_path / "ml")[0] == 0
    assert cli("export", "hf", tmp_path / "ml", tmp_path / "out")[0] == 0  # auto: shared expert -> qwen2_moe
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = random_ids(128)
    assert (hf_logits(reloaded.eval(), ids) - hf_logits(theirs, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_sharded_and_fused_layouts_read_identically(arch, tmp_path):
    theirs = hf_model(arch, seed=1)
    theirs.save_pretrained(tmp_path / "single")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    theirs.save_pretrained(tmp_path / "fused", save_original_format=False)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fused" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())
    models = {name: read_hf_model(tmp_path / name)[0] for name in ("single", "sharded", "fused")}
    ref = models["single"].state_dict()
    for name in ("sharded", "fused"):
        got = models[name].state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    _check_parity(models["fused"], theirs, 128)


def test_tied_embeddings_and_bf16_export(tmp_path, cli):
    theirs = hf_model("olmoe", seed=2, tie_word_embeddings=True)
    theirs.save_pretrained(tmp_path / "hf")
    assert cli("import", "hf", tmp_path / "hf", tmp_path / "ml")[0] == 0
    ours, cfg, _ = load_model(tmp_path / "ml")
    assert cfg.model.tie_embeddings and cfg.model.qk_norm == "full"
    _check_parity(ours, theirs, 128)
    code, out, err = cli("export", "hf", tmp_path / "ml", tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0, err
    back, _, _, _ = read_hf_model(tmp_path / "bf16")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k


def test_qwen2_moe_export_without_biases_writes_zeros_and_reimports_without(tmp_path, cli):
    from moelab.config import MoEConfig

    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_dim=32,
        normalize=False,
        num_shared_experts=2,
        shared_expert_dim=16,
        shared_expert_gate=True,
        layers=[0],
    )
    ckpt = moelab_checkpoint(tmp_path / "ck", moe=moe)
    code, out, err = cli("export", "hf", ckpt, tmp_path / "hf", "--max-shard-size", "30KB")
    assert code == 0 and "as qwen2_moe" in out, err  # chosen automatically: gated shared expert
    assert len(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]) > 20
    assert len(list((tmp_path / "hf").glob("model-000*-of-000*.safetensors"))) > 2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["qkv_bias"] is True and config["mlp_only_layers"] == [1]
    assert config["shared_expert_intermediate_size"] == 32 and config["norm_topk_prob"] is False
    from moelab.interop.safetensors_dir import TensorSource

    with TensorSource(tmp_path / "hf") as src:
        assert not src.peek("model.layers.1.self_attn.k_proj.bias").any()
    assert cli("import", "hf", tmp_path / "hf", tmp_path / "back")[0] == 0
    original, cfg, _ = load_model(ckpt)
    back, cfg_back, _ = load_model(tmp_path / "back")
    assert not cfg_back.model.qkv_bias and cfg_back.model.moe_layer_ids() == [0]
    ids = random_ids(128)
    assert torch.equal(ml_logits(original, ids), ml_logits(back, ids))
