"""`moelab bench train` and `moelab bench quality` on tiny shapes (the real runs are in BENCHMARKS.md)."""

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


def test_bench_quality_curves_and_plot(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("".join(f"Speaker {i}:\nline {i} of the play, and more words.\n\n" for i in range(400)))
    out, plot = tmp_path / "quality.json", tmp_path / "quality.png"
    shrink = [
        "model.d_model=32",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.n_layers=1",
        "model.ffn_dim=64",
        "model.moe.expert_dim=32",
        "model.max_seq_len=32",
        "data.seq_len=32",
        "train.batch_size=2",
        "eval.batches=2",
        "train.warmup_steps=2",
    ]
    rc = main(
        [
            "bench",
            "quality",
            "--data",
            str(text),
            "--minutes",
            "0.05",
            "--evals",
            "2",
            "--models",
            "moe",
            "hf",
            "--threads",
            "1",
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--plot",
            str(plot),
            *[a for s in shrink for a in ("--set", s)],
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"moe", "hf"}
    finals = {name: m["curve"][-1]["val/bpb"] for name, m in res["models"].items()}
    assert res["winner"] == min(finals, key=finals.get)  # the lowest final val bpb, not just any model
    for m in res["models"].values():
        assert m["curve"] and all(c["val/bpb"] > 0 for c in m["curve"])
        assert m["steps_done"] == m["curve"][-1]["step"] >= 1 and m["steps_planned"] >= 20
    assert plot.stat().st_size > 1000
