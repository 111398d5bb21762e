"""`moelab analyze` end to end on a prepared two-source dataset and tiny models, one of them wired by
hand so that its first MoE layer routes each source to its own experts."""

import dataclasses
import json
import math

import pytest
import torch
from analysis_runs import PNG_MAGIC, embedded_pngs, run_with_data, tiny_config

from moelab.analysis import run as analysis_run
from moelab.analysis.collect import HeldOut, collect_routing
from moelab.analysis.trace import summarise
from moelab.checkpoint import load_model, save_checkpoint
from moelab.cli import main


def test_analyze_end_to_end(analyzed):
    run, out = analyzed
    assert "I(src;exp)" in out and f"report: {run / 'report' / 'report.html'}" in out
    a = json.loads((run / "report" / "analysis.json").read_text())
    seq = a["seq_len"]
    assert seq == 16 and a["tokens"] == 640 and a["num_experts"] == 4 and a["top_k"] == 2
    assert [d["name"] for d in a["domains"]] == ["digits.txt", "letters.txt"]
    assert sum(d["tokens"] for d in a["domains"]) == 640
    # windows are spread over the whole val split (2/3 of it is digits by construction)
    assert 0.5 < a["domains"][0]["tokens"] / 640 < 0.8
    for lay in a["layers"]:
        assert sum(lay["counts"]) == 640 * 2  # dropless: every assignment kept
        assert sum(lay["fraction"]) == pytest.approx(1.0)
        assert len(lay["coactivation"]) == 4 and lay["dropped_fraction"] == 0.0
        assert 0 <= lay["mutual_information"] <= a["domain_entropy"] + 1e-9
    first = a["layers"][0]
    digits, letters = first["domain_distribution"]
    assert digits[0] == pytest.approx(0.5) and digits[1] == pytest.approx(0.5)  # digits only use experts 0, 1
    assert letters[2] + letters[3] > 0.9  # letters use 2, 3 (their newlines/end-of-document go to 0, 1)
    assert first["mutual_information"] > 0.6 * a["domain_entropy"]
    assert first["mutual_information"] > 20 * first["mi_chance"]
    # every token's router puts ~all its mass on its source's two experts: entropy ln 2 of ln 4
    assert first["router_entropy_nats"] == pytest.approx(math.log(2), abs=0.02)
    assert first["max_router_entropy_nats"] == pytest.approx(math.log(4))
    assert first["coactivation"][0][1] == pytest.approx(
        a["domains"][0]["tokens"] / 640 + letters[0] * a["domains"][1]["tokens"] / 640, abs=0.02
    )
    # expert 2's most frequent tokens are letters, rendered as text
    texts = [t["text"] for t in first["top_tokens"]["frequent"][2]]
    assert texts and set(texts) <= set("abcdefghij")
    assert [(t["from"], t["to"]) for t in a["transitions"]] == [(0, 1), (1, 2)]
    html = (run / "report" / "report.html").read_text()
    imgs = embedded_pngs(html)
    # 4 training + utilisation, specialisation, domains, co-activation, transitions
    assert len(imgs) == 9 and all(i.startswith(PNG_MAGIC) for i in imgs)
    assert "Top tokens per expert" in html and "digits.txt" in html
    for name in ("utilisation", "specialisation", "domains", "coactivation", "transitions"):
        assert (run / "report" / f"analysis_{name}.png").read_bytes() in imgs


def test_report_after_analyze_keeps_the_analysis(analyzed):
    run, _ = analyzed
    before = json.loads((run / "report" / "analysis.json").read_text())
    assert main(["report", str(run)]) == 0
    html = (run / "report" / "report.html").read_text()
    assert len(embedded_pngs(html)) == 9 and "Not run yet" not in html
    assert json.loads((run / "report" / "analysis.json").read_text()) == before


def test_analyze_dense_run_is_a_user_error(tmp_path, dataset, capsys):
    run = run_with_data(tmp_path / "dense", dataset, moe_layers="none")
    assert main(["analyze", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MoE layers" in err and err.startswith("moelab analyze: error:")


def test_analyze_bad_inputs(tmp_path, dataset, capsys):
    run = run_with_data(tmp_path / "run", dataset)
    assert main(["analyze", str(run), "--data", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "expected a dataset directory" in capsys.readouterr().err
    assert main(["analyze", str(run), "--tokens", "3", "--device", "cpu"]) == 2
    assert "--tokens: expected at least one window" in capsys.readouterr().err
    for bad in ("0", "-5"):
        assert main(["analyze", str(run), "--tokens", bad, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err == f"moelab analyze: error: --tokens: expected a positive number of tokens, got {bad}\n"
    assert main(["analyze", str(run), "--device", "tpu"]) == 2
    assert "error: --device: expected auto, cpu" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "norun")]) == 2
    assert "no such run or checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    assert "no complete checkpoint found" in capsys.readouterr().err


def test_analyze_with_a_corrupt_training_log_says_why_the_curves_are_missing(tmp_path, dataset):
    run = run_with_data(tmp_path / "run", dataset)
    (run / "metrics.jsonl").write_text('{"step": 10}\nnot json\n{"step": 20}\n')
    assert main(["analyze", str(run), "--tokens", "64", "--device", "cpu"]) == 0
    html = (run / "report" / "report.html").read_text()
    assert "No training curves:" in html and "metrics.jsonl:2: not a JSON object" in html


def test_collect_routing_with_capacity_counts_only_kept_assignments():
    # capacity 0.5 drops about half of the assignments; the analysis must agree with the layer's own counters
    cfg = tiny_config()
    cfg.model.moe = dataclasses.replace(cfg.model.moe, capacity_factor=0.5)
    torch.manual_seed(0)
    from moelab.model import Transformer

    model = Transformer(cfg.model).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (6 * 16,))
    a = summarise(collect_routing(model, HeldOut(tokens), 16, batch_size=2))
    kept = {i: torch.zeros(4, dtype=torch.float64) for i in model.moe_layers}
    dropped = dict.fromkeys(model.moe_layers, 0.0)
    with torch.inference_mode():
        for x in tokens.view(6, 16).split(2):
            for i, st in model(x).routing.items():
                kept[i] += st.tokens_per_expert.double()
                dropped[i] += float(st.dropped)
    for lay in a["layers"]:
        i = lay["layer"]
        assert lay["counts"] == kept[i].tolist()
        assert lay["dropped_fraction"] == pytest.approx(dropped[i] / (96 * 2)) and lay["dropped_fraction"] > 0.2
        assert sum(lay["counts"]) == pytest.approx(96 * 2 * (1 - lay["dropped_fraction"]))


def test_analyze_refuses_data_from_another_tokenizer(tmp_path, dataset, capsys):
    run = run_with_data(tmp_path / "run", dataset)
    meta = json.loads((run / "tokenizer" / "tokenizer.json").read_text())
    from moelab.tokenizer import ByteTokenizer

    other = ByteTokenizer(["<|endoftext|>", "<|pad|>"])
    other.save(tmp_path / "other_tok")
    ckpt = run / "checkpoints" / "step_0000050"
    model, cfg, _ = load_model(ckpt)
    save_checkpoint(ckpt, model, cfg, tmp_path / "other_tok")
    assert meta["fingerprint"] != other.fingerprint
    assert main(["analyze", str(run), "--device", "cpu"]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err


def test_group_sources():
    src = [
        {"path": f"/x/lib/{d}/f{i}.py", "input": "stdlib", "val": {"offset": 10 * (3 * j + i), "tokens": 10}}
        for j, d in enumerate(["a", "b", "c"])
        for i in range(3)
    ]
    spans = analysis_run.group_sources(src, "val", "file")
    assert spans[0] == ("a/f0.py", 0, 10) and len({s[0] for s in spans}) == 9
    assert [s[0] for s in analysis_run.group_sources(src, "val", "dir")] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert {s[0] for s in analysis_run.group_sources(src, "val", "input")} == {"stdlib"}
    big = [{"path": f"/x/{i}.txt", "val": {"offset": i, "tokens": 1 + i}} for i in range(40)]
    names = [s[0] for s in analysis_run.group_sources(big, "val", "file")]
    assert len(set(names)) == analysis_run.MAX_DOMAINS and names.count("(other)") == 40 - 15
    assert "39.txt" in names  # the largest keep their names


def test_analyze_a_checkpoint_writes_the_runs_report(tmp_path, dataset, capsys):
    # A checkpoint inside RUN/checkpoints/ is pruned by later training: its report goes to RUN/report.
    run = run_with_data(tmp_path / "run", dataset)
    (ckpt,) = (run / "checkpoints").iterdir()
    assert main(["analyze", str(ckpt), "--tokens", "64", "--device", "cpu"]) == 0
    assert f"report: {run / 'report' / 'report.html'}" in capsys.readouterr().out
    a = json.loads((run / "report" / "analysis.json").read_text())
    assert a["checkpoint"] == str(ckpt.resolve()) and not (ckpt / "report").exists()
    # a checkpoint outside any run (an import, a copy) keeps its report beside it
    alone = tmp_path / "alone"
    ckpt.rename(alone)
    assert main(["analyze", str(alone), "--data", str(dataset), "--tokens", "64", "--device", "cpu"]) == 0
    assert (alone / "report" / "analysis.json").is_file()
