"""`moelab train` from the command line, and every kind of bad input it must refuse in one line."""

import json
import shutil

import pytest
from train_helpers import read_metrics, tiny_cfg, write_yaml

from moelab.cli import main
from moelab.data import prepare
from moelab.tokenizer import ByteTokenizer

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)


def _err(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("moelab train: error:")]


def test_train_cli_run_then_resume_extends_the_run(toy_data, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_cfg(toy_data, train={"steps": 4}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--set", "train.lr=3e-3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "done: step 4" in out and str(run) in out
    # a longer run may be resumed from the run directory alone (its own config.yaml)
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "train.steps=6", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    starts = json.loads((run / "run.json").read_text())["starts"]
    assert starts[1]["resumed_from"].endswith("step_0000004")


def test_existing_run_dir_without_resume_is_refused(toy_data, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_cfg(toy_data, train={"steps": 2}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 2
    assert _err(capsys) == [
        f"moelab train: error: {run}: already holds a run; pass --resume to continue it, "
        "--restart to delete it and start over, or choose another --run-dir"
    ]


def test_resume_with_incompatible_config_is_refused(toy_data, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_cfg(toy_data, train={"steps": 2}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(cfg), "--run-dir", str(run), "--resume", "--set", "model.d_model=48"]) == 2
    (line,) = _err(capsys)
    assert "--resume with a config that differs from the run's config.yaml in model.d_model (run: 32, now: 48)" in line
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "none"), "--resume"]) == 2
    assert "--resume needs a run directory with config.yaml" in _err(capsys)[0]


def test_dataset_made_with_another_tokenizer_is_refused(toy_data, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_cfg(toy_data, train={"steps": 2}))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    # the same text, tokenized by a byte tokenizer with one more special token: another fingerprint
    other = tmp_path / "other"
    corpus = [str(p) for p in sorted((toy_data.parent / "corpus").iterdir())]
    prepare(corpus, ByteTokenizer(specials=("<|endoftext|>", "<pad>")), other, val_fraction=0.1, workers=0)
    capsys.readouterr()
    code = main(
        ["train", str(cfg), "--run-dir", str(tmp_path / "ft"), "--set", f"data.path={other}", "--init-from", str(run)]
    )
    assert code == 2
    (line,) = _err(capsys)
    assert "--init-from" in line and "but the dataset" in line and "was made with" in line
    # a dataset whose tokenizer directory was swapped after it was prepared
    swapped = tmp_path / "swapped"
    shutil.copytree(toy_data, swapped)
    shutil.rmtree(swapped / "tokenizer")
    shutil.copytree(other / "tokenizer", swapped / "tokenizer")
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "sw"), "--set", f"data.path={swapped}"]) == 2
    assert "tokenizer mismatch" in _err(capsys)[0]


def test_config_and_data_errors_are_one_line_each(toy_data, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_cfg(toy_data))
    assert (
        main(
            [
                "train",
                str(cfg),
                "--run-dir",
                str(tmp_path / "a"),
                "--set",
                "train.lrr=1",
                "--set",
                "schedule.top_k_start=9",
            ]
        )
        == 2
    )
    lines = _err(capsys)
    assert any("train.lrr: unknown key (did you mean 'lr'?)" in ln for ln in lines)
    assert any("schedule.top_k_start" in ln for ln in lines)  # every problem, each on its own line
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "b"), "--set", "data.path=null"]) == 2
    assert "data.path: no dataset given" in _err(capsys)[0]
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "c"), "--set", "model.vocab_size=200"]) == 2
    assert "model.vocab_size: 200 is smaller than the dataset's tokenizer vocabulary (257)" in _err(capsys)[0]
    assert (
        main(
            [
                "train",
                str(cfg),
                "--run-dir",
                str(tmp_path / "d"),
                "--set",
                "train.dtype=float16",
                "--set",
                "train.device=cpu",
            ]
        )
        == 2
    )
    assert "float16 training needs CUDA" in _err(capsys)[0]
    assert main(["train"]) == 2
    assert "a CONFIG file is required" in _err(capsys)[0]
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing written for a refused run
