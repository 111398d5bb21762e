import json

import pytest

from moelab.cli import main

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)


def test_bench_layer_writes_json_with_ratios(tmp_path, capsys):
    out = tmp_path / "layer.json"
    rc = main(
        [
            "bench",
            "layer",
            "--tokens",
            "64",
            "--d-model",
            "16",
            "--expert-dim",
            "8",
            "--experts",
            "2",
            "4",
            "--dtypes",
            "float32",
            "--repeats",
            "2",
            "--hf",
            "grouped_mm",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    med = res["median_s"]["float32"]
    assert set(med) == {"dense", "moelab_E2", "moelab_E4", "hf_grouped_mm_E2", "hf_grouped_mm_E4"}
    assert all(v > 0 for v in med.values())
    assert res["ratio_to_dense"]["float32"]["dense"] == 1.0
    assert "moe/dense at E=2 <= 1.2" in res["targets"]["float32"]
    assert "hf_grouped_mm" in capsys.readouterr().out


def test_bench_layer_skips_hf_eager_where_it_runs_out_of_memory(tmp_path, monkeypatch):
    import moelab.bench.layer as layer

    monkeypatch.setattr(layer, "HF_EAGER_BF16_MAX_EXPERTS", 2)
    out = tmp_path / "layer.json"
    rc = main(
        [
            "bench",
            "layer",
            "--tokens",
            "64",
            "--d-model",
            "16",
            "--expert-dim",
            "8",
            "--experts",
            "2",
            "4",
            "--dtypes",
            "float32",
            "bfloat16",
            "--repeats",
            "2",
            "--hf",
            "eager",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert "hf_eager_E4" in res["median_s"]["float32"] and "hf_eager_E4" not in res["median_s"]["bfloat16"]
    assert "hf_eager_E2" in res["median_s"]["bfloat16"]
    assert list(res["skipped"]["bfloat16"]) == ["hf_eager_E4"]


def test_bench_layer_bad_device_and_shapes_are_one_line(capsys):
    assert main(["bench", "layer", "--device", "banana"]) == 2
    assert main(["bench", "layer", "--shapes", "8:x:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "moelab bench: error: --device: expected auto, cpu, cuda or cuda:N, got 'banana'",
        "moelab bench: error: --shapes: expected E:K:F integers like 64:8:512, got ['8:x:3']",
    ]
