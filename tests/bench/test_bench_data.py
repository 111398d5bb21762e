import json

import pytest

from moelab.cli import main

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)


def test_bench_data_small_run(tmp_path, capsys):
    out = tmp_path / "data.json"
    rc = main(
        [
            "bench",
            "data",
            "--corpus-mb",
            "1.2",
            "--tokenizer-mb",
            "0.5",
            "--vocab-size",
            "4000",
            "--repeats",
            "1",
            "--no-byte",
            "--work-dir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    corpus = res["corpus"]
    assert corpus["bytes"] >= 1_200_000 and set(corpus["bytes_by_domain"]) == {"english", "chinese", "code"}
    assert all(v > 0 for v in corpus["bytes_by_domain"].values())
    full, quarter = res["prepare"]["full"], res["prepare"]["quarter"]
    assert abs(full["mb"] - corpus["bytes"] / 1e6) < 0.01 and abs(quarter["mb"] - corpus["quarter_bytes"] / 1e6) < 0.01
    assert full["mb_per_s"] > 0 and full["peak_rss_total_mb"] > 0 and full["peak_pss_total_mb"] > 0
    assert full["tokens"] > 0 and full["glue_cpu_s"] >= 0 and full["workers_cpu_s"] > 0
    assert res["tokenizer_train"]["median_wall_s"] > 0 and res["tokenizer_encode_mb_per_s_one_core"] > 0
    assert set(res["targets"]) >= {
        "peak RSS < 1 GB (full corpus, main + workers)",
        "prepare MB/s / (workers x one-core tokenizer MB/s)",
    }
    assert "prepare full:" in capsys.readouterr().out
