"""Bad HF input and inexpressible exports: each one clear line, exit 2, nothing written."""

import json

import pytest
import torch
from interop_helpers import hf_model, moelab_checkpoint
from safetensors.torch import load_file, save_file

from moelab.config import MoEConfig

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    hf_model("mixtral").save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, **changes):
    data = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    (path / "config.json").write_text(json.dumps(data))


def _edit_weights(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def _refused(cli, tmp_path, src, *needles):
    out = tmp_path / "out"
    code, _, err = cli("import", "hf", src, out)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln]
    assert lines and all(ln.startswith("moelab import: error: ") for ln in lines)
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers
    return err


def test_truncated_safetensors(mixtral_dir, tmp_path, cli):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _refused(cli, tmp_path, bad, "model.safetensors", "not a readable safetensors file")


def test_corrupt_safetensors_header(mixtral_dir, tmp_path, cli):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _refused(cli, tmp_path, bad, "not a readable safetensors file")


def test_wrong_shape_names_tensor_and_file(mixtral_dir, tmp_path, cli):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    name = "model.layers.1.self_attn.q_proj.weight"
    _edit_weights(bad, lambda s: s.__setitem__(name, torch.zeros(32, 64)))
    _refused(cli, tmp_path, bad, name, "has shape [32, 64], expected [64, 64]")


def test_missing_expert_and_extra_tensor(mixtral_dir, tmp_path, cli):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    gone = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    _edit_weights(bad, lambda s: (s.pop(gone), s.__setitem__("model.layers.0.mystery.weight", torch.zeros(2))))
    _refused(cli, tmp_path, bad, f"missing tensors {gone}", "unexpected tensors", "model.layers.0.mystery.weight")


def test_config_mismatch_more_experts_than_stored(mixtral_dir, tmp_path, cli):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    _edit_config(bad, num_local_experts=6)  # experts 4 and 5 would be left uninitialised
    _refused(cli, tmp_path, bad, "experts.4.w1.weight")


def test_unknown_architecture(mixtral_dir, tmp_path, cli):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    _edit_config(bad, model_type="mixtrall")
    _refused(cli, tmp_path, bad, "unsupported architecture model_type='mixtrall'", "mixtral, qwen2_moe")


@pytest.mark.parametrize("field", ["hidden_size", "num_experts_per_tok", "model_type"])
def test_missing_config_field(mixtral_dir, tmp_path, cli, field):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    _edit_config(bad, **{field: None})
    _refused(cli, tmp_path, bad, "config.json", f"missing field '{field}'")


def test_ill_typed_field_and_invalid_json(mixtral_dir, tmp_path, cli):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    _edit_config(bad, hidden_size="64")
    _refused(cli, tmp_path, bad, "field 'hidden_size' expected int, got str")
    (bad / "config.json").write_text("{not json")
    _refused(cli, tmp_path, bad, "config.json: not valid JSON")


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"sliding_window": 16}, "sliding_window=16 is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_inexpressible_features_refused(mixtral_dir, tmp_path, cli, change, needle):
    bad = _copy(mixtral_dir, tmp_path / "bad")
    _edit_config(bad, **change)
    _refused(cli, tmp_path, bad, needle)


def test_nonzero_o_proj_bias_refused(tmp_path, cli):
    model = hf_model("olmoe", attention_bias=True)
    model.save_pretrained(tmp_path / "hf")
    _refused(cli, tmp_path, tmp_path / "hf", "self_attn.o_proj.bias is not zero")


def test_bad_index(mixtral_dir, tmp_path, cli):
    sharded = tmp_path / "sharded"
    hf_model("mixtral").save_pretrained(sharded, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00001-of-00009.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(cli, tmp_path, sharded, "model-00001-of-00009.safetensors: shard file not found")
    (sharded / "model.safetensors.index.json").write_text("[]")
    _refused(cli, tmp_path, sharded, "not a valid safetensors index")


def test_no_weights_and_existing_output(mixtral_dir, tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((mixtral_dir / "config.json").read_text())
    _refused(cli, tmp_path, empty, "no model.safetensors or model.safetensors.index.json")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    code, _, err = cli("import", "hf", mixtral_dir, tmp_path / "taken", "--overwrite")
    assert code == 2 and "refusing to replace it" in err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "arch,model_kw,needle",
    [
        (
            "mixtral",
            {"moe": MoEConfig(num_experts=4, top_k=2, expert_dim=32, router="gumbel")},
            "router 'gumbel' cannot be expressed as mixtral",
        ),
        (
            "mixtral",
            {"moe": MoEConfig(num_experts=4, top_k=2, expert_dim=32, normalize=False)},
            "mixtral always renormalises",
        ),
        ("mixtral", {"moe": MoEConfig(num_experts=4, top_k=2, expert_dim=32, layers=[1])}, "layers [0] are dense"),
        ("mixtral", {"qk_norm": "head"}, "qk_norm='head' cannot be expressed as mixtral"),
        ("qwen2_moe", {}, "qwen2_moe needs a sigmoid-gated shared expert"),
        (
            "olmoe",
            {"moe": MoEConfig(num_experts=4, top_k=2, expert_dim=32, capacity_factor=1.25), "qk_norm": "full"},
            "transformers is dropless",
        ),
        ("llama", {}, "llama is a dense architecture"),
    ],
)
def test_export_refuses_what_the_target_cannot_express(tmp_path, cli, arch, model_kw, needle):
    ckpt = moelab_checkpoint(tmp_path / "ck", **model_kw)
    code, _, err = cli("export", "hf", ckpt, tmp_path / "out", "--arch", arch)
    assert code == 2 and needle in err, err
    assert err.startswith(f"moelab export: error: cannot export as {arch}: ")
    assert not (tmp_path / "out").exists()


def test_export_without_a_fitting_architecture_explains_each(tmp_path, cli):
    ckpt = moelab_checkpoint(tmp_path / "ck", moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, router="sigmoid"))
    code, _, err = cli("export", "hf", ckpt, tmp_path / "out")
    assert code == 2 and "no Hugging Face architecture expresses this model" in err
    for arch in ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe"):
        assert f"error: {arch}: " in err
    assert not (tmp_path / "out").exists()


def test_parity_check_refuses_wrong_experts(mixtral_dir, tmp_path, cli, monkeypatch):
    """The safety net: if the mapping loaded the wrong experts, the logit check stops the import."""
    import moelab.interop.hf as hf

    real = hf.from_hf_state

    def swapped(*args, **kwargs):
        state = real(*args, **kwargs)
        w = state["layers.1.ffn.experts.gate_up"]
        state["layers.1.ffn.experts.gate_up"] = w[[1, 0, 2, 3]]
        return state

    monkeypatch.setattr(hf, "from_hf_state", swapped)
    _refused(cli, tmp_path, mixtral_dir, "logits differ by", "nothing was written")


def test_transformers_never_loaded_tensor_is_refused(mixtral_dir, tmp_path):
    from moelab.errors import UserError
    from moelab.interop.hf_maps import ARCHS
    from moelab.interop.parity import load_transformers_model

    bad = _copy(mixtral_dir, tmp_path / "bad")
    _edit_weights(bad, lambda s: s.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(UserError, match=r"never loaded \(left at random init\): model.layers.1.post_attention"):
        load_transformers_model(bad, ARCHS["mixtral"])
    _edit_weights(bad, lambda s: s.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(UserError, match="transformers cannot load it"):  # 5.x fails to stack the experts
        load_transformers_model(bad, ARCHS["mixtral"])
