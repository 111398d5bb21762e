"""`moelab bench dynamic` at paired seeds: tiny end to end (the real runs are in BENCHMARKS.md) and the
paired statistics."""

import json
import math
import os

import pytest
import torch

from moelab.bench.dynamic_summary import _spearman, paired_stats, paired_summary
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


def _row(loss: dict, k: dict | None = None, bpb: float = 0.7) -> dict:
    mean_k = sum(k.values()) / len(k) if k else 2.0
    return {
        "val_bpb": bpb,
        "train_flops": 1.0,
        "mi_over_chance": 0.0,
        "expert_output_similarity": 0.0,
        "experts_per_token": mean_k,
        "experts_per_token_by_domain": k or dict.fromkeys(loss, 2.0),
        "loss_by_domain": loss,
    }


def test_adaptive_k_is_judged_against_where_more_experts_pay_not_raw_loss(tmp_path):
    doms = ["a", "b", "c", "d", "e"]
    # raw loss: a hardest; gain of top-4 over top-1: e pays most, a least (irreducible loss)
    top2 = {d: x for d, x in zip(doms, [2.0, 1.0, 0.5, 0.3, 0.2], strict=True)}
    gain = {d: x for d, x in zip(doms, [0.0, 0.01, 0.02, 0.03, 0.04], strict=True)}
    top1 = {d: top2[d] + gain[d] for d in doms}
    top4 = dict(top2)
    follows_gain = {d: 2.0 + 0.1 * i + 0.01 for i, d in enumerate(doms)}
    # one seed with a large spread that follows the gain, one with a small spread that does not: the
    # mean over seeds still follows the gain, but a claim needs every seed
    big = {d: 2.0 + 0.5 * i for i, d in enumerate(doms)}
    small_reversed = {d: 2.1 - 0.01 * i for i, d in enumerate(doms)}
    runs = {
        "top2": {s: _row(top2) for s in ("0", "1")},
        "top1": {s: _row(top1) for s in ("0", "1")},
        "top4": {s: _row(top4) for s in ("0", "1")},
        "good": {s: _row(top2, follows_gain) for s in ("0", "1")},
        "mixed": {"0": _row(top2, big), "1": _row(top2, small_reversed)},
        "wrong": {s: _row(top2, {d: 4.01 - v for d, v in follows_gain.items()}) for s in ("0", "1")},
        # one adjacent swap (rho 0.9) is still the one-sided 5% point for 5 domains; two are not (0.8)
        "one_swap": {s: _row(top2, {**follows_gain, "a": 2.11, "b": 2.01}) for s in ("0", "1")},
        "two_swaps": {s: _row(top2, {**follows_gain, "a": 2.11, "b": 2.01, "c": 2.31, "d": 2.21}) for s in ("0", "1")},
    }
    out = paired_summary(runs, [0, 1], tmp_path, 10)
    assert out["top2"]["gain_by_domain"] == pytest.approx(gain)
    good = out["good"]
    assert good["spearman_k_vs_gain"] == pytest.approx(1.0) and good["direction_met"]
    assert good["spearman_k_vs_loss"] == pytest.approx(-1.0)  # the old, loss-based reading says "wrong way"
    assert good["k_domain_effect"]["e"]["mean"] == pytest.approx(0.2) and good["k_domain_effect"]["e"]["sd"] == 0
    mixed = out["mixed"]
    assert mixed["spearman_k_vs_gain"] == pytest.approx(1.0) and mixed["spearman_k_vs_gain_per_seed"][1] < 0
    assert not mixed["direction_met"]
    assert out["wrong"]["spearman_k_vs_gain"] == pytest.approx(-1.0) and not out["wrong"]["direction_met"]
    assert out["one_swap"]["spearman_crit"] == 0.9 and out["one_swap"]["spearman_k_vs_gain"] == pytest.approx(0.9)
    assert out["one_swap"]["direction_met"] and not out["two_swaps"]["direction_met"]
    assert "direction_met" not in out["top1"]  # fixed k: nothing to judge
    del runs["top4"]  # without the references only the raw-loss reading is made
    assert "spearman_k_vs_gain" not in paired_summary(runs, [0, 1], tmp_path, 10)["good"]


@pytest.mark.slow
def test_bench_dynamic_pairs_seeds_and_the_grown_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the JSON's data path is written relative to the working directory
    threads = torch.get_num_threads()
    out = tmp_path / "dyn.json"
    args = ["bench", "dynamic", "--steps", "20", "--grow-at", "11", "--seeds", "0", "1"]  # logs every 10
    args += ["--variants", "top2", "grow", "grow_split", "--work-dir", "w", "--json", str(out)]
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
    sp = res["paired"]["grow_split"]  # opposite expert-weight noise: still paired until the growth
    assert sp["paired_identical_until"] == [0.0, 0.0] and res["runs"]["grow_split"]["0"]["experts"] == 16
    assert sp["sibling_weight_cos2"] < g["sibling_weight_cos2"]  # the halves start apart
    assert "grow - top2: bpb" in capsys.readouterr().out
    assert main(["bench", "dynamic", "--steps", "12", "--grow-at", "12", "--work-dir", "w"]) == 2
    assert "--grow-at: expected a step in (0, --steps=12)" in capsys.readouterr().err
    assert main(["bench", "dynamic", "--grow-split-noise", "-1", "--work-dir", "w"]) == 2
    assert "--grow-router-noise / --grow-split-noise: expected >= 0" in capsys.readouterr().err
