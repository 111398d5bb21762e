"""`moelab report` and `moelab compare` on hand-built runs: the HTML is self-contained and complete,
bad runs give one clear line and exit 2."""

import json
import re

import numpy as np
import pytest
from analysis_runs import PNG_MAGIC, embedded_pngs, make_run, metrics_records, tiny_config

from moelab.analysis import compare, plots, runlog
from moelab.cli import main


def visible_titles(fig) -> list[str]:
    """Titles of a figure's panels (colour bars have none)."""
    return [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]


def test_report_cli_builds_self_contained_html(moe_run, capsys):
    assert main(["report", str(moe_run)]) == 0
    path = moe_run / "report" / "report.html"
    assert f"report: {path}" in capsys.readouterr().out
    html = path.read_text()
    imgs = embedded_pngs(html)
    # curves, aux losses, load heatmaps, balance over time
    assert len(imgs) == 4 and all(i.startswith(PNG_MAGIC) for i in imgs)
    assert html.count("<img") == 4  # nothing but data URIs
    assert not re.search(r'src="(?!data:)', html)
    for name in ("training_curves", "training_aux", "training_load", "training_balance"):
        assert (moe_run / "report" / f"{name}.png").read_bytes() in imgs
    assert "4 experts of width 32" in html and "Not run yet" in html


def test_dense_run_report_has_curves_but_no_load(dense_run):
    assert main(["report", str(dense_run)]) == 0
    html = (dense_run / "report" / "report.html").read_text()
    assert len(embedded_pngs(html)) == 2  # curves, aux (no per-layer loads)
    assert "dense run" in html


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_report_empty_metrics_is_a_user_error(moe_run, capsys, content):
    (moe_run / "metrics.jsonl").write_text(content)
    assert main(["report", str(moe_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab report: error:") and "metrics.jsonl: no training records" in err
    assert len(err.splitlines()) == 1


def test_report_bad_inputs(tmp_path, moe_run, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (moe_run / "metrics.jsonl").unlink()
    assert main(["report", str(moe_run)]) == 2
    assert "no training log" in capsys.readouterr().err
    (moe_run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    assert main(["report", str(moe_run)]) == 2
    assert "metrics.jsonl:2: not a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"step": 1}\n\xff\xfe\n{"step": 3}\n', "metrics.jsonl:2: not a JSON object (not UTF-8)"),
        (b'{"step": 1}\n{"step": 1.5}\n', "metrics.jsonl:2: expected a JSON object with an integer 'step'"),
        (b'{"step": true}\n', "metrics.jsonl:1: expected a JSON object with an integer 'step'"),
        (b'{"step": 1, "tra', "metrics.jsonl: no complete training records: line 1, the only one, is cut off"),
    ],
)
def test_report_corrupt_metrics_is_one_line(moe_run, capsys, content, message):
    (moe_run / "metrics.jsonl").write_bytes(content)
    assert main(["report", str(moe_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab report: error:") and message in err and err.count("\n") == 1


def test_report_load_lists_of_different_lengths_is_one_line(moe_run, capsys):
    recs = [{"step": 1, "moe/0/load": [0.5, 0.5]}, {"step": 2, "moe/0/load": [0.2, 0.3, 0.5]}]
    (moe_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(moe_run)]) == 2
    err = capsys.readouterr().err
    assert "step 2: moe/0/load lists 3 experts, step 1 listed 2" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("{bad", "not valid JSON"),
        ("[]", "expected a JSON object, got list"),
        ('{"layers": 3}', "missing 'tokens'"),
        ('{"tokens": 1, "num_experts": 4, "top_k": 2, "layers": []}', "'layers': expected a non-empty list"),
        ('{"tokens": 1, "num_experts": 4, "top_k": 2, "layers": [{"layer": 0}]}', "layers[0]: missing 'fraction'"),
    ],
)
def test_report_bad_analysis_json_is_one_line(moe_run, capsys, content, message):
    (moe_run / "report").mkdir()
    (moe_run / "report" / "analysis.json").write_text(content)
    assert main(["report", str(moe_run)]) == 2
    err = capsys.readouterr().err
    assert "report/analysis.json: " in err and message in err and "rerun `moelab analyze" in err
    assert err.count("\n") == 1


def test_training_figures_show_every_curve(moe_run):
    recs = runlog.read_metrics(moe_run)
    assert visible_titles(plots.training_curves(recs)) == [
        "loss",
        "val bits per byte",
        "learning rate",
        "throughput (tokens/s)",
    ]
    assert visible_titles(plots.aux_curves(recs)) == ["load_balance", "z_loss"]  # each aux loss, one panel
    heat = plots.load_heatmaps(recs)
    assert visible_titles(heat) == ["layer 0", "layer 1", "layer 2"]
    for layer, ax in enumerate(a for a in heat.axes if a.get_title()):
        # rows = experts, columns = records, values = E x load fraction
        want = np.array([r[f"moe/{layer}/load"] for r in recs]).T * 4
        np.testing.assert_allclose(ax.images[0].get_array(), want)
    bal = plots.balance_over_time(recs)
    assert [len(ax.lines) for ax in bal.axes if ax.get_title()] == [3, 3, 3]  # one line per layer
    assert all(ax.get_ylim()[0] == 0 for ax in bal.axes if ax.get_title())


def test_torn_last_line_is_skipped(moe_run):
    recs = metrics_records([0], steps=[10, 20])
    (moe_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 30, "tra')
    assert [r["step"] for r in runlog.read_metrics(moe_run)] == [10, 20]


def test_compare_equal_budget_interpolation(tmp_path):
    # run b is twice as fast per second and its FLOPs per token are half of a's
    a = make_run(tmp_path / "a", tiny_config(), metrics_records([0, 1, 2], steps=[20, 40, 60], fpt=2e6))
    b = make_run(
        tmp_path / "b", tiny_config(), metrics_records([0, 1, 2], steps=[20, 40], speed=2.0, bpb0=2.5, fpt=1e6)
    )
    comp = compare.comparison(compare.load_runs([a, b]))
    # the common token budget is b's last val point: 40 steps * 256 tokens
    assert comp["budgets"]["tokens"] == 40 * 256
    ra, rb = comp["rows"]
    assert ra["bpb_at_equal_tokens"] == pytest.approx(3.0 - 0.4) and rb["bpb_at_equal_tokens"] == pytest.approx(2.1)
    # FLOPs budget = min(a: 60*256*2e6, b: 40*256*1e6) = b's; a reached it at step 20
    assert comp["budgets"]["flops"] == 40 * 256 * 1e6
    assert ra["bpb_at_equal_flops"] == pytest.approx(3.0 - 0.2)
    # time budget = min(6.0, 2.0) s; a's first val point is at 2.0 s
    assert comp["budgets"]["elapsed_s"] == pytest.approx(2.0)
    assert ra["bpb_at_equal_elapsed_s"] == pytest.approx(2.8) and rb["bpb_at_equal_elapsed_s"] == pytest.approx(2.1)
    assert ra["final_bpb"] == pytest.approx(2.4) and ra["model"] == "MoE 4x top-2"
    # between val points: linear
    assert compare.value_at(a_recs := runlog.read_metrics(a), "step", 50) == pytest.approx(3.0 - 0.5)
    assert compare.value_at(a_recs, "step", 10) is None  # before the first val point


def test_compare_cli_moe_vs_dense(moe_run, dense_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(moe_run), str(dense_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "moe" in printed and "dense" in printed and f"report: {out / 'compare.html'}" in printed
    html = (out / "compare.html").read_text()
    assert len(embedded_pngs(html)) == 1 and (out / "compare.png").is_file()
    data = json.loads((out / "compare.json").read_text())
    assert [r["run"] for r in data["rows"]] == ["moe", "dense"]
    assert data["rows"][1]["model"] == "dense"
    assert data["rows"][0]["params_active"] < data["rows"][0]["params_total"]
    fig = plots.compare_curves(compare.load_runs([moe_run, dense_run]))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_xlabel() for ax in axes] == ["training tokens", "training FLOPs", "wall time (s)"]
    assert [len(ax.lines) for ax in axes] == [2, 2, 2]  # both runs on every panel


def test_compare_bad_inputs(moe_run, capsys):
    again = moe_run.parent / ".." / moe_run.parent.name / moe_run.name  # another spelling of the same run
    assert main(["compare", str(moe_run), str(again)]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["compare", str(moe_run), "--out", str(moe_run / "metrics.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: cannot create the output directory" in err and err.count("\n") == 1


def test_compare_run_without_val_is_a_user_error(tmp_path, moe_run, capsys):
    recs = [{k: v for k, v in r.items() if not k.startswith("val/")} for r in metrics_records([0])]
    noval = make_run(tmp_path / "noval", tiny_config(), recs)
    assert main(["compare", str(moe_run), str(noval), "--out", str(tmp_path / "c")]) == 2
    assert "no val/bpb records" in capsys.readouterr().err
