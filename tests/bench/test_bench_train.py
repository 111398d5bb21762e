"""`moelab bench train` on tiny shapes (the real runs are in BENCHMARKS.md; bench quality: test_bench_quality.py)."""

import json

import pytest
import yaml

from moelab.cli import main

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)

TINY = {
    "model": {
        "vocab_size": 264,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "max_seq_len": 32,
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
    },
    "data": {"seq_len": 32},
    "train": {"batch_size": 2},
}


def test_bench_train_compares_with_transformers(tmp_path, capsys):
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "train.json"
    rc = main(
        [
            "bench",
            "train",
            "--config",
            str(cfg),
            "--compare",
            "hf",
            "--dtypes",
            "float32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    r = res["configs"][str(cfg)]
    assert set(r["variants"]) == {"moelab/float32", "hf/float32"}
    for v in r["variants"].values():
        assert v["tokens_per_s"] > 0 and 0 < v["mfu"] < 1 and v["peak_rss_bytes"] > 50 * 2**20
    assert "grouped_mm" in r["variants"]["hf/float32"]["impl"]  # which transformers expert path was timed
    assert r["ratios"]["float32"]["speed_moelab_over_hf"] > 0
    assert "moelab / transformers speed" in capsys.readouterr().out


def test_bench_train_twin_measures_moe_over_dense_in_wall_and_cpu_time(tmp_path, capsys):
    from moelab.bench.train import dense_twin
    from moelab.config import load_config
    from moelab.model.counting import count_params

    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    twin = dense_twin(load_config(cfg))
    assert twin.model.moe_layer_ids() == [] and twin.model.ffn_dim == 2 * 32  # top-2 x expert_dim 32
    assert count_params(twin.model).active == pytest.approx(count_params(load_config(cfg).model).active, rel=0.02)
    out = tmp_path / "train.json"
    args = ["bench", "train", "--config", str(cfg), "--twin", "--dtypes", "float32", "--steps", "2"]
    assert main([*args, "--warmup", "1", "--repeats", "2", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["configs"]) == {str(cfg), "micro-twin"}
    r = res["moe_over_dense"][f"{cfg}/float32"]
    assert len(r["rounds"]) == len(r["cpu_rounds"]) == 2 and r["cpu_time_ratio"] > 0 and r["step_time_ratio"] > 0
    printed = capsys.readouterr().out
    assert "process CPU time" in printed and "per round" in printed


def test_bench_train_profile_records_where_a_step_goes(tmp_path, capsys):
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "train.json"
    args = ["bench", "train", "--config", str(cfg), "--dtypes", "float32", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--repeats", "2", "--threads", "1", "--profile", "--json", str(out)]) == 0
    v = json.loads(out.read_text())["configs"][str(cfg)]["variants"]["moelab/float32"]
    prof = v["profile"]  # profiled in the first round only
    assert prof["wall_s"] > 0 and "aten::" in prof["table"] and "Self CPU" in prof["table"]
    assert "one profiled step" in capsys.readouterr().out


def test_profile_summary_line_on_a_gpu(capsys):
    from moelab.bench.train import _print_profile

    _print_profile("gpu-fine moelab/bfloat16", {"wall_s": 0.2, "device_busy_s": 0.05, "kernels": 1234, "table": "T"})
    assert "200.0 ms wall, device busy 50.0 ms (25%), 1234 kernels\nT" in capsys.readouterr().out
