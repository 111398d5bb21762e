"""`moelab bench dynamic` at paired seeds: tiny end to end (the real runs are in BENCHMARKS.md) and the
paired statistics."""

import json
import math
import os

import pytest
import torch

from moelab.bench.dynamic_summary import _spearman, paired_stats
from moelab.cli import main


def test_paired_stats_claims_only_what_every_seed_agrees_on():
    same_sign = paired_stats([-0.05, -0.051, -0.049])
    assert same_sign["beyond_noise"] and same_sign["mean"] == pytest.approx(-0.05)
    assert same_sign["t"] == pytest.approx(-0.05 / (0.001 / math.sqrt(3)))
    mixed = paired_stats([-0.09, 0.09, -0.01])
    assert not mixed["beyond_noise"] and mixed["t_crit"] == pytest.approx(4.303)
    assert paired_stats([0.3])["beyond_noise"] is False  # one seed never claims anything
    assert paired_stats([0.1, 0.1])["t"] == math.inf
    assert _spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.slow
def test_bench_dynamic_pairs_seeds_and_the_grown_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the JSON's data path is written relative to the working directory
    threads = torch.get_num_threads()
    out = tmp_path / "dyn.json"
    args = ["bench", "dynamic", "--steps", "20", "--grow-at", "11", "--seeds", "0", "1"]  # logs every 10
    args += ["--variants", "top2", "grow", "--work-dir", "w", "--json", str(out)]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["seeds"] == [0, 1] and res["grow_at"] == 11
    assert res["config"]["data"]["path"] == os.path.join("w", "data")  # never an absolute (/tmp) path
    assert str(tmp_path) not in out.read_text()
    g = res["paired"]["grow"]
    assert len(g["delta_bpb"]) == 2 and g["delta_bpb_mean"] == pytest.approx(sum(g["delta_bpb"]) / 2)
    for seed, d in zip((0, 1), g["delta_bpb"], strict=True):
        assert d == pytest.approx(res["runs"]["grow"][str(seed)]["val_bpb"] - res["runs"]["top2"][str(seed)]["val_bpb"])
    # the grown run is the 8-expert run, step for step, until it grows: the comparison is paired
    assert g["paired_identical_until"] == [0.0, 0.0]
    assert res["runs"]["grow"]["0"]["experts"] == 16 and abs(g["grow_rel_change"][0]) < 0.01
    assert "grow - top2: bpb" in capsys.readouterr().out
    assert main(["bench", "dynamic", "--steps", "12", "--grow-at", "12", "--work-dir", "w"]) == 2
    assert "--grow-at: expected a step in (0, --steps=12)" in capsys.readouterr().err
