"""`moelab analyze` end to end on a prepared two-source dataset and tiny models, one of them wired by
hand so that its first MoE layer routes each source to its own experts."""

import json

import pytest
from analysis_runs import PNG_MAGIC, embedded_pngs, run_with_data

from moelab.analysis import run as analysis_run
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
    assert first["coactivation"][0][1] == pytest.approx(a["domains"][0]["tokens"] / 640 + letters[0] *
                                                        a["domains"][1]["tokens"] / 640, abs=0.02)
    # expert 2's most frequent tokens are letters, rendered as text
    texts = [t["text"] for t in first["top_tokens"]["frequent"][2]]
    assert texts and set(texts) <= set("abcdefghij")
    assert [(t["from"], t["to"]) for t in a["transitions"]] == [(0, 1), (1, 2)]
    html = (run / "report" / "report.html").read_text()
    imgs = embedded_pngs(html)
    # 4 training + utilisation, specialisation, domains, co-activation, transitions
    assert len(imgs) == 9 and all(i.startswith(PNG_MAGIC) for i in imgs)
    assert "Top tokens per expert" in html and "digits.txt" in html


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
    assert main(["analyze", str(tmp_path / "norun")]) == 2
    assert "no such run or checkpoint" in capsys.readouterr().err


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
    src = [{"path": f"/x/lib/{d}/f{i}.py", "input": "stdlib", "val": {"offset": 10 * (3 * j + i), "tokens": 10}}
           for j, d in enumerate(["a", "b", "c"]) for i in range(3)]
    spans = analysis_run.group_sources(src, "val", "file")
    assert spans[0] == ("a/f0.py", 0, 10) and len({s[0] for s in spans}) == 9
    assert [s[0] for s in analysis_run.group_sources(src, "val", "dir")] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert {s[0] for s in analysis_run.group_sources(src, "val", "input")} == {"stdlib"}
    big = [{"path": f"/x/{i}.txt", "val": {"offset": i, "tokens": 1 + i}} for i in range(40)]
    names = [s[0] for s in analysis_run.group_sources(big, "val", "file")]
    assert len(set(names)) == analysis_run.MAX_DOMAINS and names.count("(other)") == 40 - 15
    assert "39.txt" in names  # the largest keep their names
