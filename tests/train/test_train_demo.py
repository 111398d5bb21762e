"""`moelab demo` end to end on a toy corpus and a shrunken model (the real demo takes ~3 minutes)."""

import pytest
from train_helpers import toy_corpus

from moelab.cli import main

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)

SMALL = [
    "model.vocab_size=300",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_dim=64",
    "model.moe.expert_dim=32",
    "model.moe.num_experts=4",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=6",
    "train.warmup_steps=2",
    "eval.every=3",
    "eval.batches=2",
    "train.peak_flops=1e11",
]


def test_demo_runs_end_to_end_and_never_overwrites(tmp_path, monkeypatch, capsys):
    corpus = toy_corpus(tmp_path / "corpus", docs=30)
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--input", str(corpus), "--minutes", "0", *[a for s in SMALL for a in ("--set", s)]]
    assert main(args) == 0
    out = capsys.readouterr().out
    for text in ("samples before training", "samples after training", "[4/4] done", "metrics:", "report:"):
        assert text in out
    run = tmp_path / "runs" / "demo"
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "step_0000006").is_dir()
    assert (run / "data" / "meta.json").is_file() and (run / "tokenizer" / "tokenizer.json").is_file()
    report = run / "report" / "report.html"  # the demo ends with the report, and says where it is
    assert f"report:        {report.relative_to(tmp_path)}" in out and (run / "report" / "analysis.json").is_file()
    assert report.read_text().count('src="data:image/png;base64,') >= 5
    assert main([*args, "--no-samples", "--minutes", "0.001"]) == 0  # a second demo goes next to the first
    assert "at most 6 steps" in capsys.readouterr().out  # a time budget, train.steps the cap
    assert (tmp_path / "runs" / "demo-2" / "metrics.jsonl").is_file()
    assert main(args + ["--run-dir", str(run)]) == 2  # an explicit existing run directory is refused
    assert "already holds a run" in capsys.readouterr().err


def test_demo_budget_trades_batch_for_steps_on_a_slow_machine(monkeypatch):
    """A busy machine fitted 42 steps of batch 16 once (samples `0x0x0x...`): below MIN_STEPS the demo
    halves the batch until enough steps fit (issue 19)."""
    from moelab.config import load_config
    from moelab.train import demo

    cfg = load_config(demo.DEMO_CONFIG)
    monkeypatch.setattr(demo, "step_seconds", lambda model, cfg, batch: batch / 16)  # 1 s per step at 16
    assert demo.fit_budget(None, cfg, 100) == (200, 8, 0.5)
    assert demo.fit_budget(None, cfg, 1000) == (600, 16, 1.0)  # fast enough: the config's batch, steps capped
    assert demo.fit_budget(None, cfg, 10)[1] == 4  # never below batch 4


def test_pylike_scores_python_above_token_soup():
    import random

    from moelab.train import pylike

    code = "def area(self, r):\n    if r is None:\n        return 0\n    return 3.14 * r * (r + 1)\n"
    assert pylike.checks(code) == {"keywords": True, "indentation": True, "brackets": True}
    assert pylike.score([code]) == 1.0
    # the null a reader could mistake for learning: the same characters shuffled
    rng = random.Random(0)
    soup = ["".join(rng.sample(code, len(code))) for _ in range(20)]
    assert pylike.score(soup) < 0.25
    assert pylike.checks("x = f(a, [b)\ny = 1\n")["brackets"] is False  # crossed brackets
    assert pylike.checks("s = 'open\nt = 2\n")["brackets"] is False  # a string left open
    assert pylike.checks("if x:\nreturn y\n")["indentation"] is False  # a block with no indent
    assert pylike.score([]) == 0.0


def test_demo_threads_follow_the_free_cores(monkeypatch):
    from moelab.train import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert demo.pick_threads() == 2
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (2.4, 0.0, 0.0))
    assert demo.pick_threads() == 1  # a busy machine: one thread, never zero


def test_demo_threads_without_a_load_average(monkeypatch):
    from moelab.train import demo

    def missing():
        raise OSError("no load average")

    monkeypatch.setattr(demo.os, "getloadavg", missing)
    assert demo.pick_threads() == demo.torch.get_num_threads()


def test_demo_budget_reuses_the_first_measurement(monkeypatch):
    from moelab.config import load_config
    from moelab.train import demo

    cfg = load_config(demo.DEMO_CONFIG)
    calls = []
    monkeypatch.setattr(demo, "step_seconds", lambda model, cfg, batch: calls.append(batch) or batch / 16)
    assert demo.fit_budget(None, cfg, 1000, first=1.0) == (600, 16, 1.0) and calls == []
    assert demo.fit_budget(None, cfg, 100, first=1.0) == (200, 8, 0.5) and calls == [8]  # only new batch sizes


def test_demo_refuses_a_negative_budget(capsys):
    from moelab.cli import main

    assert main(["demo", "--minutes", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "moelab demo: error: --minutes: expected >= 0 (0 = train.steps, no time budget), got -1"


def test_demo_dense_twin_trains_beside_the_moe_and_reports_both(tmp_path, monkeypatch, capsys):
    import json

    import yaml

    corpus = toy_corpus(tmp_path / "corpus", docs=30)
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--input", str(corpus), "--minutes", "0", "--no-samples", "--dense-twin"]
    assert main([*args, *[a for s in SMALL for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "demo"
    twin = run / "dense-twin"
    cfg = yaml.safe_load((twin / "config.yaml").read_text())
    assert cfg["model"]["moe"]["layers"] == "none" and cfg["model"]["ffn_dim"] == 2 * 32  # top_k x expert_dim
    assert cfg["data"]["path"] == str(run / "data") and cfg["train"]["steps"] == 6  # same data and steps
    recs = [json.loads(line) for line in (twin / "metrics.jsonl").read_text().splitlines()]
    twin_bpb = [r for r in recs if "val/bpb" in r][-1]["val/bpb"]
    moe_bpb = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val/bpb" in r][-1]
    line = next(x for x in out.splitlines() if x.startswith("  dense twin:"))
    assert f"val {twin_bpb:.3f} bits per byte at step 6" in line
    assert f"MoE - dense {moe_bpb['val/bpb'] - twin_bpb:+.3f}" in line
    assert "the dense twin beside it" in out


def test_demo_dense_twin_refuses_models_it_cannot_twin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["demo", "--dense-twin", "--minutes", "0", "--input", str(tmp_path)]
    assert main([*base, "--set", "model.moe.layers=none"]) == 2
    assert "is a dense model already (model.moe.layers: none)" in capsys.readouterr().err
    assert main([*base, "--set", "model.moe.layers=every:2", "--set", "model.ffn_dim=100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "has dense layers of model.ffn_dim 100; the twin needs 512 (the MoE's active width) in every layer, "
        "which would change them too"
    )
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_demo_dense_twin_failure_is_one_line_not_a_crash(tmp_path, capsys):
    import subprocess
    import sys

    from moelab.train import demo

    (tmp_path / "dense-twin.log").write_text("boom\n")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert demo.dense_twin_result(proc, tmp_path) is None
    assert (
        capsys.readouterr().out.strip()
        == f"dense twin: training failed (exit 3); its output is in {tmp_path / 'dense-twin.log'}"
    )
