"""Measurements that mean what they say (issue 19): validation over the whole split with bits/byte from the
bytes evaluated, the token-conditioned specialisation null, and the smaller reporting fixes."""

import contextlib
import io
import math
import os

import numpy as np
import pytest
import torch
from train_helpers import tiny_cfg, write_yaml

from moelab.analysis import stats
from moelab.data import prepare
from moelab.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """Two sources stored one after the other in val.bin: short one-line documents (an EOD every ~8 bytes:
    fewer bytes per token) and long prose (one EOD per file)."""
    root = tmp_path_factory.mktemp("dom")
    (root / "a").mkdir()
    (root / "b").mkdir()
    for d in range(10):
        (root / "a" / f"short{d}.txt").write_text("".join(f"x = {i + 300 * d}\n" for i in range(300)))
    for d in range(160):
        (root / "b" / f"prose{d}.txt").write_text(f"{d} the quick brown fox jumps over the lazy dog. " * 6 + "\n")
    out = root / "data"
    prepare([str(root / "a"), str(root / "b")], "byte", out, val_fraction=0.25, doc_boundary="line", workers=0)
    return out


def test_validation_spreads_over_the_whole_split_and_counts_bytes_evaluated(two_domains, tmp_path):
    from moelab.train.loop import Trainer

    cfg = tiny_cfg(two_domains, eval={"batches": 2}, train={"steps": 1})
    t = Trainer(cfg, tmp_path / "run")
    val = t.data.val
    seen = [int(x[0, 0]) for x, _ in t.data.val_batches(4, 2, torch.device("cpu"))]
    assert len(seen) == 2
    # 8 windows spread evenly: the last batch reaches the end of the split (the second source), where the
    # first 8 windows would all lie in the first source
    all_starts = np.arange(0, len(val) - 32, 32)
    starts = all_starts[np.linspace(0, len(all_starts) - 1, 8).round().astype(int)]
    assert starts[-1] > len(val) * 0.9
    xs = torch.cat([x for x, _ in t.data.val_batches(4, 2, torch.device("cpu"))])
    assert torch.equal(xs[-1], torch.from_numpy(val.tokens[starts[-1] : starts[-1] + 32].astype(np.int64)))
    # bits per byte: nats over the bytes of exactly the targets evaluated (EOD = 0 bytes), not the split average
    res = t._evaluate()
    nats = n = nbytes = 0.0
    t.model.eval()
    with torch.no_grad():
        for x, y in t.data.val_batches(4, 2, torch.device("cpu")):
            out = t.model(x, y, return_logits=False)
            nats += float(out.ce_loss) * y.numel()
            n += y.numel()
            nbytes += float((y < 256).sum())
    assert res["val/loss"] == pytest.approx(nats / n, rel=1e-5)
    assert res["val/bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    # the two sources differ in bytes per token, so a split-wide average misstates a partial sample's bytes
    per_window = {
        t.data.target_bytes(y[i : i + 1])
        for x, y in t.data.val_batches(4, 2, torch.device("cpu"))
        for i in range(len(y))
    }
    assert max(per_window) - min(per_window) > 2


def test_byte_lengths_add_up_to_the_text(tmp_path):
    text = "héllo wörld\n"
    tok = ByteTokenizer()
    assert int(tok.byte_lengths()[tok.encode(text)].sum()) == len(text.encode())
    assert tok.byte_lengths()[tok.eod_id] == 0


def test_token_conditioned_null_separates_token_identity_from_specialisation():
    g = torch.Generator().manual_seed(0)
    n, e, m = 6000, 4, 2
    tokens = torch.randint(0, 20, (n,), generator=g)
    # domain mostly follows the token (tokens < 10 are domain 0's), experts follow the token only
    domain = torch.where(torch.rand(n, generator=g) < 0.9, (tokens >= 10).long(), (tokens < 10).long())
    by_token = ((tokens >= 10).long() * 2 + tokens % 2)[:, None]  # top-1
    mi = stats.mutual_information(stats.domain_expert_counts(by_token, domain, m, e))
    plain = stats.shuffled_mutual_information(by_token, domain, m, e)
    tok_null = stats.token_conditioned_mutual_information(by_token, domain, tokens, m, e)
    assert mi > 0.1 and plain < 0.01  # the plain shuffle calls this specialisation
    assert tok_null == pytest.approx(mi, abs=0.01)  # the token null explains it all
    # routing that reads the domain itself (context) stands above the token null
    by_domain = torch.stack([domain * 2, domain * 2 + 1], 1)
    mi2 = stats.mutual_information(stats.domain_expert_counts(by_domain, domain, m, e))
    null2 = stats.token_conditioned_mutual_information(by_domain, domain, tokens, m, e)
    assert mi2 - null2 > 0.3


def test_report_escapes_carriage_returns():
    from moelab.analysis.report import _token

    html = _token({"id": 13, "text": "a\r\n\x0b", "count": 3, "share": 0.5})
    assert "\r" not in html and "\x0b" not in html and "\\r\\n" in html


def test_line_boundary_drops_a_trailing_carriage_return(tmp_path):
    from moelab.data.corpus import iter_pieces

    f = tmp_path / "crlf.txt"
    f.write_bytes(b"first line\r\nsecond\r\n\r\n")
    assert [t for t, _ in iter_pieces(f, "line")] == ["first line", "second"]


def test_warns_on_a_vocabulary_far_too_large(tmp_path, capsys):
    from moelab.data.preparation import check_vocab_fits

    np.arange(2000, dtype=np.uint16).repeat(1).tofile(tmp_path / "train.bin")
    meta = {
        "dtype": "uint16",
        "tokenizer": {"vocab_size": 8000},
        "splits": {"train": {"file": "train.bin", "tokens": 2000}},
    }
    assert check_vocab_fits(tmp_path, meta) == 8000
    assert "far too large" in capsys.readouterr().err
    np.tile(np.arange(1000, dtype=np.uint16), 20).tofile(tmp_path / "train.bin")
    meta = {
        "dtype": "uint16",
        "tokenizer": {"vocab_size": 1000},
        "splits": {"train": {"file": "train.bin", "tokens": 20000}},
    }
    assert check_vocab_fits(tmp_path, meta) == 0
    assert capsys.readouterr().err == ""


def test_max_seconds_stop_says_why(toy_data, tmp_path):
    from moelab.cli import main

    cfg = write_yaml(
        tmp_path / "c.yaml", tiny_cfg(toy_data, train={"steps": 1000, "max_seconds": 0.001}, checkpoint={"every": 0})
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "done: step 1 (stopped early: train.max_seconds" in out.getvalue()


def test_plots_name_soft_cv_apart_show_chance_bars_and_keep_token_labels_apart():
    from moelab.analysis import plots

    recs = [
        {
            "step": s,
            "train/aux/cv": 0.3,
            "moe/0/cv": 0.2,
            "moe/0/dead": 0,
            "moe/0/dropped_frac": 0.0,
            "moe/0/load": [0.5, 0.5],
        }
        for s in (1, 2)
    ]
    aux_title = plots.aux_curves(recs).axes[0].get_title()
    hard_title = plots.balance_over_time(recs).axes[0].get_title()
    assert "soft" in aux_title and "hard" in hard_title and aux_title != hard_title
    layer = {"layer": 0, "mutual_information": 0.6, "mi_chance": 0.0002, "mi_token_null": 0.4, "mi_untrained": 0.3}
    fig = plots.specialisation_summary({"layers": [layer], "domains": [{}, {}], "domain_entropy": 1.0})
    ax = fig.axes[0]
    chance = [p for p in ax.patches if p.get_label() == "null: shuffled sources" or p.get_height() < 0.05]
    assert chance and all(p.get_height() >= 0.005 * ax.get_ylim()[1] for p in chance)
    runs = [
        {
            "name": n,
            "records": [
                {"step": s, "tokens": s * 123_456, "flops": s * 3.3e12, "elapsed_s": s * 1.5, "val/bpb": 3 - s / 100}
                for s in range(1, 40)
            ],
        }
        for n in ("a", "b")
    ]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.compare_curves(runs)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes[:2]:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
        assert all(len(t.get_text()) <= 5 for t in ax.get_xticklabels())


def test_compare_outputs_get_ordinary_modes(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "analysis"))
    from analysis_runs import make_run, metrics_records, tiny_config

    from moelab.analysis.compare import write_comparison

    runs = [make_run(tmp_path / n, tiny_config(), metrics_records([0])) for n in ("a", "b")]
    old = os.umask(0o022)
    try:
        path, _ = write_comparison(runs, tmp_path / "cmp")
    finally:
        os.umask(old)
    for f in path.parent.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_budget_seconds_run_stops_on_time_with_its_schedule_finished(toy_data, tmp_path):
    import json

    from moelab.cli import main

    cfg = write_yaml(
        tmp_path / "c.yaml",
        tiny_cfg(
            toy_data,
            train={"steps": 100_000, "budget_seconds": 1.0, "warmup_steps": 2, "lr": 1e-2, "min_lr": 1e-3},
            checkpoint={"every": 0},
            log={"every": 1},
        ),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "(train.budget_seconds spent:" in out.getvalue()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]
    assert last["stopped"] == "budget_seconds" and 1.0 <= last["elapsed_s"] < 100_000
    assert last["step"] < 100_000
    # the schedule ends with the budget: the last step's LR is near min_lr, not the peak
    lrs = [r["lr"] for r in recs if "lr" in r]
    assert max(lrs) > 5e-3 and lrs[-1] < 2e-3
