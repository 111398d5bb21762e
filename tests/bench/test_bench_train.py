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
