"""The generation and serving benchmarks run end to end on toy sizes and write sane JSON."""

import json

import pytest

from moelab.cli import main

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)

TOY = """model:
  vocab_size: 300
  d_model: 32
  n_layers: 2
  n_heads: 4
  n_kv_heads: 2
  ffn_dim: 64
  max_seq_len: 64
  moe: {num_experts: 4, top_k: 2, expert_dim: 32}
data:
  seq_len: 64
"""


@pytest.fixture
def toy_config(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    return path


def test_bench_generate_with_transformers(toy_config, tmp_path):
    out = tmp_path / "g.json"
    assert (
        main(
            [
                "bench",
                "generate",
                "--configs",
                str(toy_config),
                "--prompt-len",
                "16",
                "--new-tokens",
                "6",
                "--batch-sizes",
                "1",
                "2",
                "--repeats",
                "1",
                "--compare",
                "hf",
                "--compile",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["models"]["toy"]
    assert res["greedy_match_hf"] is True  # both sides run the same weights
    assert res["greedy_match_moelab_compiled"] is True
    assert {"decode_tok_s_b1", "decode_tok_s_b2"} <= set(res["ratio_moelab_compiled_over_moelab"])
    assert {"decode_tok_s_b1", "decode_tok_s_b2"} <= set(res["ratio_moelab_compiled_over_hf"])
    assert "ratio_moelab_over_moelab_compiled" not in res
    for side in ("moelab", "moelab_compiled", "hf"):
        row = res[side]
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s_b1"] > 0 and row["decode_tok_s_b2"] > 0
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
    assert {"prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b2_cpu"} <= set(res["ratio_moelab_over_hf"])


def test_bench_serve_has_no_errors(toy_config, tmp_path):
    out = tmp_path / "s.json"
    assert (
        main(
            [
                "bench",
                "serve",
                "--config",
                str(toy_config),
                "--clients",
                "1",
                "3",
                "--duration",
                "2",
                "--max-tokens",
                "6",
                "--max-batch",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    levels = json.loads(out.read_text())["levels"]
    assert [lv["clients"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["errors"] == 0 and lv["requests"] > 0 and lv["tokens_per_s"] > 0
        assert lv["ttft_ms_p50"] <= lv["e2e_ms_p99"]


def test_bench_generate_llamacpp_missing_is_one_clear_line(toy_config, tmp_path, monkeypatch, capsys):
    import moelab.interop.gguf

    monkeypatch.setattr(moelab.interop.gguf, "llama_cpp_available", lambda: False)
    out = tmp_path / "g.json"
    assert (
        main(
            [
                "bench",
                "generate",
                "--configs",
                str(toy_config),
                "--prompt-len",
                "8",
                "--new-tokens",
                "3",
                "--batch-sizes",
                "1",
                "--repeats",
                "1",
                "--compare",
                "llamacpp",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "llama.cpp" in ln]
    assert lines == [
        "[toy] llama.cpp comparison skipped: llama-cpp-python is not installed "
        "(pip install 'moelab[llamacpp]'; it compiles llama.cpp for ~10 min)"
    ]
    res = json.loads(out.read_text())["models"]["toy"]
    assert "llamacpp" not in res and res["moelab"]["decode_tok_s_b1"] > 0
    assert "not installed" in res["llamacpp_skipped"]


def test_bench_generate_with_llama_cpp(toy_config, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")
    out = tmp_path / "g.json"
    assert (
        main(
            [
                "bench",
                "generate",
                "--configs",
                str(toy_config),
                "--prompt-len",
                "16",
                "--new-tokens",
                "6",
                "--batch-sizes",
                "1",
                "2",
                "--repeats",
                "1",
                "--compare",
                "llamacpp",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    res = data["models"]["toy"]
    assert data["llama_cpp_python"] and res["greedy_match_llamacpp"] is True  # same weights, fp32 both sides
    row = res["llamacpp"]
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s_b1"] > 0 and "decode_tok_s_b2" not in row
    assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
    assert {"prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b1_cpu"} <= set(res["ratio_moelab_over_llamacpp"])
