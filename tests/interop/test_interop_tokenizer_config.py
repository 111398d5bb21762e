"""Tokenizer files and config.json fields across the HF boundary; imported runs generate and train."""

import json

import pytest
from interop_helpers import SHAKESPEARE, moelab_checkpoint

from moelab.checkpoint import load_model
from moelab.config import MoEConfig
from moelab.data.tokenizer_training import train_sentencepiece
from moelab.interop.hf_config import HF_DEFAULTS
from moelab.tokenizer import ByteTokenizer, Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def text():
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, text):
    return train_sentencepiece([text[:200_000]], 500).save(tmp_path_factory.mktemp("sp") / "tokenizer")


def test_hf_defaults_match_transformers_classes():
    classes = {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
    }
    for arch, defaults in HF_DEFAULTS.items():
        fields = classes[arch].__dataclass_fields__
        for key, value in defaults.items():
            if key == "rope_theta":
                assert classes[arch].default_theta == value, arch
            else:
                assert fields[key].default == value, (arch, key)


@pytest.mark.parametrize("kind", ["sentencepiece", "byte"])
def test_exported_tokenizer_reproduces_moelab_ids(kind, tmp_path, cli, text, sp_dir):
    tok_dir = sp_dir if kind == "sentencepiece" else ByteTokenizer().save(tmp_path / "tok")
    tok = Tokenizer.load(tok_dir)
    ckpt = moelab_checkpoint(tmp_path / "ck", tok_dir, vocab_size=512)
    code, out, err = cli("export", "hf", ckpt, tmp_path / "hf")
    assert code == 0, err
    assert f"tokenizer files written ({kind})" in out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tok.eod_id
    for old, new in (("num_experts", "num_local_experts"), ("rope_theta", "rope_parameters"), ("torch_dtype", "dtype")):
        assert old in config and new in config  # read by transformers 4.x and 5.x alike
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = text[300_000:320_000] + "\n\tcaf\u00e9  \u4e2d\u6587 12345"
    ids = hf_tok.encode(sample, add_special_tokens=False)
    assert ids == tok.encode(sample)
    assert hf_tok.decode(ids) == sample
    assert hf_tok.eos_token_id == tok.eod_id


def test_sentencepiece_round_trip_keeps_fingerprint_and_generates(tmp_path, cli, sp_dir):
    from moelab.infer.generate import generate, load

    ckpt = moelab_checkpoint(tmp_path / "ck", sp_dir, vocab_size=512)
    assert cli("export", "hf", ckpt, tmp_path / "hf")[0] == 0
    code, out, err = cli("import", "hf", tmp_path / "hf", tmp_path / "back")
    assert code == 0, err
    assert "tokenizer/ imported from tokenizer.model" in out
    assert Tokenizer.load(tmp_path / "back" / "tokenizer").fingerprint == Tokenizer.load(sp_dir).fingerprint
    outs = []
    for path in (ckpt, tmp_path / "back"):
        model, tok = load(path)
        outs.append(generate(model, tok, ["First Citizen:"], max_new_tokens=12, temperature=0.0))
    assert outs[0] == outs[1] and outs[0][0]
    code, out, err = cli(
        "generate", tmp_path / "back", "--prompt", "First Citizen:", "--max-new-tokens", 4, "--temperature", 0
    )
    assert code == 0 and out.startswith("First Citizen:"), err


def test_import_llama_style_sentencepiece_model(tmp_path, text):
    import io

    import sentencepiece as spm

    from moelab.interop.hf_tokenizer import import_tokenizer

    buf = io.BytesIO()  # sentencepiece defaults: <unk>=0, <s>=1, </s>=2, dummy prefix
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text[:50_000].splitlines()), model_writer=buf, vocab_size=300, minloglevel=2
    )
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(buf.getvalue())
    note = import_tokenizer(tmp_path / "hf", tmp_path / "tok", 320)
    assert "imported" in note and "'</s>'" in note
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.eod_id == 2 and tok.vocab_size == 300
    assert "has 300 pieces but the model only 100 ids" in import_tokenizer(tmp_path / "hf", tmp_path / "tok2", 100)
    assert not (tmp_path / "tok2").exists()


def test_upcycled_checkpoint_trains_with_init_from(tmp_path, cli, text):
    tok_dir = ByteTokenizer().save(tmp_path / "tok")
    (tmp_path / "corpus.txt").write_text(text[:60_000], encoding="utf-8")
    code, _, err = cli(
        "prepare",
        "--tokenizer",
        tok_dir,
        "--input",
        tmp_path / "corpus.txt",
        "--out",
        tmp_path / "data",
        "--doc-boundary",
        "blank",
        "--quiet",
    )
    assert code == 0, err
    dense = moelab_checkpoint(tmp_path / "dense", tok_dir, vocab_size=257, moe=MoEConfig(layers="none"))
    assert cli("upcycle", dense, tmp_path / "moe", "--experts", 4, "--top-k", 2)[0] == 0
    code, out, err = cli(
        "train",
        tmp_path / "moe" / "config.yaml",
        "--init-from",
        tmp_path / "moe",
        "--run-dir",
        tmp_path / "run",
        "--set",
        f"data.path={tmp_path / 'data'}",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=2",
        "--set",
        "data.seq_len=16",
        "--set",
        "eval.batches=1",
        "--set",
        "train.warmup_steps=0",
        "--no-progress",
    )
    assert code == 0, err
    model, cfg, _ = load_model(tmp_path / "run")
    assert cfg.model.moe_layer_ids() == [0, 1] and cfg.model.moe.num_experts == 4
