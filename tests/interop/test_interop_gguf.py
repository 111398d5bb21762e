"""GGUF export: file structure, the q/k RoPE permutation, refusals, and (when llama-cpp-python is
installed) llama.cpp's own tokenizer and greedy continuation against moelab's."""

import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from interop_helpers import SHAKESPEARE, greedy, ml_logits, moelab_checkpoint

from moelab.checkpoint import load_model
from moelab.config import MoEConfig
from moelab.data.tokenizer_training import train_sentencepiece
from moelab.interop.gguf import TOLERANCES, llama_cpp_available, permute_rope
from moelab.model.layers import apply_rope, rope_cache
from moelab.tokenizer import ByteTokenizer, Tokenizer

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)

gguf = pytest.importorskip("gguf")

MOE = dict(num_experts=4, top_k=2, expert_dim=32)
VARIANTS = {  # name -> (model kwargs, llama.cpp architecture)
    "mixtral_like": ({"moe": MoEConfig(**MOE)}, "llama"),
    "dense_tied_bias": ({"moe": MoEConfig(layers="none"), "tie_embeddings": True, "qkv_bias": True}, "llama"),
    "qwen2moe_like": (
        {
            "qkv_bias": True,
            "moe": MoEConfig(
                **MOE, normalize=False, num_shared_experts=1, shared_expert_dim=40, shared_expert_gate=True
            ),
        },
        "qwen2moe",
    ),
    "qwen3moe_like": ({"qk_norm": "head", "head_dim": 24, "moe": MoEConfig(**MOE)}, "qwen3moe"),
    "olmoe_like": ({"qk_norm": "full", "n_kv_heads": 4, "moe": MoEConfig(**MOE, normalize=False)}, "olmoe"),
    "mixtral_like_tied": ({"tie_embeddings": True, "moe": MoEConfig(**MOE)}, "llama"),
    # ungated shared experts (configs/small.yaml): two shared experts of the routed width, either top-k kind
    "shared_ungated": ({"moe": MoEConfig(**MOE, num_shared_experts=2)}, "bailingmoe"),
    "shared_ungated_unnormalised_tied": (
        {
            "tie_embeddings": True,
            "qkv_bias": True,
            "moe": MoEConfig(**MOE, normalize=False, num_shared_experts=1, shared_expert_dim=64),
        },
        "bailingmoe",
    ),
}
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory, shakespeare_text):
    tok = train_sentencepiece([shakespeare_text[:200_000]], 400)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def shakespeare_text():
    path = SHAKESPEARE
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    return path.read_text(encoding="utf-8")


def _export(cli, ckpt, out, *extra):
    code, stdout, err = cli("export", "gguf", ckpt, out, *extra)
    assert code == 0, err
    return stdout


@given(n_head=st.integers(1, 4), half=st.integers(1, 8), seq=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_permutation_turns_rotate_half_rope_into_interleaved_rope(n_head, half, seq, seed):
    """llama.cpp's `llama` arch rotates pairs (2i, 2i+1); moelab rotates (i, i + Dh/2). With q rows
    permuted per head, llama.cpp's rotated q equals moelab's, permuted the same way."""
    gen = torch.Generator().manual_seed(seed)
    hd, d = 2 * half, 8
    w, x = torch.randn(n_head * hd, d, generator=gen), torch.randn(seq, d, generator=gen)
    cos, sin = rope_cache(seq, hd, 10000.0)
    ours = apply_rope((x @ w.T).view(seq, n_head, hd).transpose(0, 1), cos, sin)  # [H, S, Dh]
    theirs = (x @ permute_rope(w, n_head).T).view(seq, n_head, hd).transpose(0, 1)
    pairs = theirs.reshape(n_head, seq, half, 2)
    c, s = cos[:, :half][None], sin[:, :half][None]
    rotated = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    expected = permute_rope(ours.transpose(0, 1).reshape(seq, n_head * hd).T, n_head).T
    assert torch.allclose(rotated.reshape(n_head, seq, hd).transpose(0, 1).reshape(seq, -1), expected, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_structure_and_llama_cpp_parity(variant, tmp_path, cli, sp_tokenizer):
    model_kw, arch = VARIANTS[variant]
    ckpt = moelab_checkpoint(tmp_path / "ck", sp_tokenizer, vocab_size=400, **model_kw)
    out = _export(cli, ckpt, tmp_path / "m.gguf")
    assert f"GGUF ({arch}, f32)" in out
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].data) == 400
    names = {t.name for t in reader.tensors}
    model, cfg, _ = load_model(ckpt)
    if cfg.model.moe_layer_ids():
        exps = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight")
        assert exps.shape.tolist() == [64, 32, 4]  # ggml order: [D, F, E]
    else:
        assert "blk.0.ffn_up.weight" in names
    if llama_cpp_available():
        assert "parity vs llama.cpp" in out and "identical" in out
        assert "tokenizes and detokenizes" in out


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_cpp_greedy_continuation_equals_moelab(variant, tmp_path, cli, sp_tokenizer):
    from moelab.interop.llama_cpp_check import llama_greedy, open_llama

    model_kw, _ = VARIANTS[variant]
    ckpt = moelab_checkpoint(tmp_path / "ck", sp_tokenizer, vocab_size=400, max_seq_len=128, **model_kw)
    _export(cli, ckpt, tmp_path / "m.gguf")
    model, cfg, _ = load_model(ckpt)
    tok = Tokenizer.load(sp_tokenizer)
    llm = open_llama(tmp_path / "m.gguf", 128)
    try:
        ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
        assert ids == tok.encode(PROMPT)
        theirs = llama_greedy(llm, ids, 32)  # incremental decoding with llama.cpp's KV cache
        seen = len(ids) + len(theirs) - 1  # every position llama.cpp computed logits for
        their_logits = torch.from_numpy(np.array(llm.scores[:seen], dtype=np.float32))
    finally:
        llm.close()
    ours = greedy(lambda x: ml_logits(model, x), torch.tensor([ids]), 32)
    assert theirs == ours
    our_logits = ml_logits(model, torch.tensor([ids + ours[:-1]]))[0]
    delta, scale = (our_logits - their_logits).abs().max().item(), max(1.0, our_logits.abs().max().item())
    assert delta <= TOLERANCES["f32"] * scale, (delta, scale)
    # Random tied models tend to repeat the input token (its own embedding dominates the logits); the
    # logit check above over all 47 positions is what makes those variants discriminating.
    assert len(set(ours)) > 3 or cfg.model.tie_embeddings  # a real continuation, not one repeated token


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("variant", ["mixtral_like", "shared_ungated"])
def test_rounded_exports_pass_their_check_and_run(variant, dtype, tmp_path, cli, sp_tokenizer):
    """mixtral_like's 2x16 check tokens include router near-ties (margins under 0.001 and 0.005) that f16 and
    q8_0 flip: the max |delta| there is 0.33 (f16, 10x its tolerance) and 0.65 (q8_0), while the median
    position is at 0.002 / 0.05. Before the median rule these correct exports were refused."""
    model_kw, _ = VARIANTS[variant]
    ckpt = moelab_checkpoint(tmp_path / "ck", sp_tokenizer, vocab_size=400, max_seq_len=128, **model_kw)
    out = _export(cli, ckpt, tmp_path / "m.gguf", "--dtype", dtype)
    if not llama_cpp_available():
        return
    from moelab.interop.llama_cpp_check import llama_greedy, open_llama

    assert "parity vs llama.cpp" in out
    llm = open_llama(tmp_path / "m.gguf", 128)
    try:
        ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
        assert len(llama_greedy(llm, ids, 32)) == 32
    finally:
        llm.close()


def test_rounded_check_judges_the_median_position():
    from moelab.errors import UserError
    from moelab.interop.parity import ParityReport

    report = ParityReport(
        max_abs_delta=0.5, max_abs_logit=3.0, shape=(2, 16), greedy_ours=[1], greedy_theirs=[1], median_abs_delta=0.002
    )
    report.check(1e-2, "f16", rounded=True)
    with pytest.raises(UserError, match="differ by 0.5 > tolerance 0.03"):
        report.check(1e-2, "f32")
    report.median_abs_delta = 0.04
    with pytest.raises(UserError, match="at the median position > tolerance 0.03"):
        report.check(1e-2, "f16", rounded=True)


def test_read_back_refuses_a_mis_encoded_tensor(tmp_path, monkeypatch):
    import moelab.interop.gguf as gg

    model, _, _ = load_model(moelab_checkpoint(tmp_path / "ck", ByteTokenizer().save(tmp_path / "tok"), vocab_size=320))
    real = gg._encode

    def swapped(name, t, dtype):  # a writer that lays one matrix out transposed (same shape: 64 x 64)
        return real(name, t.T.contiguous() if name == "blk.1.attn_output.weight" else t, dtype)

    monkeypatch.setattr(gg, "_encode", swapped)
    for dtype in ("f32", "f16", "q8_0"):
        with pytest.raises(RuntimeError, match="blk.1.attn_output.weight .* does not decode to its source"):
            gg.write_model_gguf(tmp_path / f"{dtype}.gguf", model, dtype=dtype)


def test_byte_tokenizer_and_quantised_types(tmp_path, cli):
    tok_dir = ByteTokenizer().save(tmp_path / "tok")
    ckpt = moelab_checkpoint(tmp_path / "ck", tok_dir, vocab_size=320)
    for dtype, expect in (("f16", gguf.GGMLQuantizationType.F16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        _export(cli, ckpt, tmp_path / f"{dtype}.gguf", "--dtype", dtype)
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / f"{dtype}.gguf")).tensors}
        assert types["blk.0.ffn_down_exps.weight"] == expect
        assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32  # router stays f32
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    tokens = gguf.GGUFReader(str(tmp_path / "f16.gguf")).fields["tokenizer.ggml.tokens"]
    pieces = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert pieces[0x20] == "\u2581" and pieces[0x41] == "<0x41>" and pieces[256] == "<|endoftext|>"
    assert len(pieces) == 320 and pieces[-1] == "[PAD319]"


@pytest.mark.parametrize(
    "model_kw,needle",
    [
        ({"moe": MoEConfig(**MOE, layers=[1])}, "layers [0] are dense but others are MoE"),
        ({"moe": MoEConfig(**MOE, router="gumbel")}, "router 'gumbel'"),
        ({"qk_norm": "full", "moe": MoEConfig(**MOE, normalize=False)}, "full-width qk-norm with kv_heads 2/4"),
        ({"moe": MoEConfig(**MOE, normalize=False)}, "un-normalised top-k weights without qk-norm or a shared expert"),
        (
            {"moe": MoEConfig(**MOE, num_shared_experts=1, shared_expert_gate=True)},
            "a sigmoid-gated shared expert with renormalised top-k weights",
        ),
        (
            {"moe": MoEConfig(**MOE, num_shared_experts=1, shared_expert_dim=40)},
            "an ungated shared expert of width 40, not a multiple of the expert width 32",
        ),
        ({"qk_norm": "head", "moe": MoEConfig(**MOE, num_shared_experts=1)}, "shared experts with qk_norm='head'"),
    ],
)
def test_gguf_refuses_inexpressible_models(tmp_path, cli, model_kw, needle):
    ckpt = moelab_checkpoint(tmp_path / "ck", ByteTokenizer().save(tmp_path / "tok"), vocab_size=257, **model_kw)
    code, _, err = cli("export", "gguf", ckpt, tmp_path / "m.gguf")
    assert code == 2 and needle in err and err.startswith("moelab export: error: cannot export as GGUF"), err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


def test_gguf_needs_a_tokenizer_and_a_free_name(tmp_path, cli):
    ckpt = moelab_checkpoint(tmp_path / "ck")
    code, _, err = cli("export", "gguf", ckpt, tmp_path / "m.gguf")
    assert code == 2 and "no tokenizer/ in the checkpoint" in err
    (tmp_path / "taken.gguf").write_text("x")
    code, _, err = cli("export", "gguf", ckpt, tmp_path / "taken.gguf")
    assert code == 2 and "already exists" in err and (tmp_path / "taken.gguf").read_text() == "x"


def test_gguf_overwrite_replaces_only_a_gguf_moelab_wrote(tmp_path, cli):
    ckpt = moelab_checkpoint(tmp_path / "ck", ByteTokenizer().save(tmp_path / "tok"), vocab_size=257)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = cli("export", "gguf", ckpt, notes, "--overwrite", "--no-check")
    assert code == 2 and "refusing to replace it: --overwrite only replaces a GGUF file moelab wrote" in err, err
    assert notes.read_text() == "mine"
    out = tmp_path / "m.gguf"
    assert cli("export", "gguf", ckpt, out, "--no-check")[0] == 0
    assert cli("export", "gguf", ckpt, out, "--overwrite", "--no-check")[0] == 0  # its own file: replaced
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    (tmp_path / "d").mkdir()
    code, _, err = cli("export", "gguf", ckpt, tmp_path / "d", "--overwrite")
    assert code == 2 and err.endswith(f"{tmp_path / 'd'}: is a directory; expected the name of a .gguf file to write\n")
    code, _, err = cli("export", "gguf", ckpt, notes / "x.gguf")
    assert code == 2 and f"cannot write the output file ({notes} is not a directory)" in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
