"""`torchrun --nproc-per-node 2 -m moelab train` end to end on gloo: the same losses as one process,
and run directories that resume across process counts (checkpoints hold full tensors)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moelab.cli import main
from moelab.data import prepare

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)

CFG = {
    "model": {
        "vocab_size": 264,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 64,
        "max_seq_len": 32,
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
    },
    "data": {"seq_len": 32},
    "train": {
        "steps": 6,
        "batch_size": 4,
        "lr": 0.01,
        "min_lr": 0.001,
        "warmup_steps": 1,
        "peak_flops": 1.0e11,
        "seed": 3,
    },
    "eval": {"every": 3, "batches": 2},
    "checkpoint": {"every": 3, "keep_last": 3},
    "log": {"every": 1, "progress": False},
}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ptrain")
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(20):
        (corpus / f"doc{d:02d}.py").write_text(
            "".join(f"def f{d}_{i}(x):\n    return x * {i} + {d}\n" for i in range(30))
        )
    prepare([str(corpus)], "byte", root / "data", val_fraction=0.1, workers=0)
    cfg = json.loads(json.dumps(CFG))
    cfg["data"]["path"] = str(root / "data")
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(nproc: int, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "moelab",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def losses(run_dir: Path) -> dict[int, tuple[float, float | None]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train/loss"], r.get("val/loss")) for r in recs}


def assert_same_losses(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for step in want:
        for g, w in zip(got[step], want[step], strict=True):
            assert (g is None) == (w is None)
            if w is not None:
                assert g == pytest.approx(w, rel=1e-5), f"step {step}: {g} vs {w}"


@pytest.fixture(scope="module")
def single(config, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--no-progress"]) == 0
    return run


def rewind_to_step_3(run: Path) -> None:
    """Drop the last checkpoint so --resume continues from step 3 (same schedule: train.steps stays 6)."""
    shutil.rmtree(run / "checkpoints" / "step_0000006")


def test_torchrun_ep2_matches_one_process_and_resumes_on_one(config, single, tmp_path):
    run = tmp_path / "ep2"
    res = torchrun(2, "train", str(config), "--run-dir", str(run), "--set", "parallel.ep=2", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("step ") == 6 + 1  # rank 0 alone prints (6 records + the summary line)
    assert_same_losses(losses(run), losses(single))
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "step_0000003" / "model.safetensors"), "pt") as f:
        assert f.get_slice("layers.0.ffn.experts.gate_up").get_shape() == [4, 64, 32]  # full, unsharded
    rewind_to_step_3(run)
    assert main(["train", "--resume", "--run-dir", str(run), "--set", "parallel.ep=1", "--no-progress"]) == 0
    assert_same_losses(losses(run), losses(single))


def test_one_process_checkpoint_resumes_under_torchrun_dp2(config, single, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(single, run, symlinks=True)
    rewind_to_step_3(run)
    res = torchrun(2, "train", "--resume", "--run-dir", str(run), "--set", "parallel.dp=2", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_losses(losses(run), losses(single))


LORA = ["--set", "finetune.mode=lora", "--set", "finetune.lora.rank=3", "--set", "finetune.lora.targets=[attn,experts]"]


def test_torchrun_ep2_lora_finetune_matches_one_process_and_resumes(config, single, tmp_path):
    """LoRA on the routed experts under expert parallelism: the adapters shard with their experts; the
    adapter-only checkpoints are written by rank 0 and loaded by every rank."""
    from safetensors import safe_open

    one = tmp_path / "one"
    assert main(["train", str(config), "--run-dir", str(one), "--init-from", str(single), *LORA, "--no-progress"]) == 0
    run = tmp_path / "ep2"
    args = ["train", str(config), "--run-dir", str(run), "--init-from", str(single), *LORA, "--no-progress"]
    res = torchrun(2, *args, "--set", "parallel.ep=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_losses(losses(run), losses(one))
    with safe_open(str(run / "checkpoints" / "step_0000003" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys and all(".lora" in k for k in keys)  # adapters only
        assert f.get_slice("layers.0.ffn.experts.lora.gu_a").get_shape() == [4, 3, 32]  # full, unsharded
    rewind_to_step_3(run)
    res = torchrun(2, "train", "--resume", "--run-dir", str(run), "--set", "parallel.ep=2", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_losses(losses(run), losses(one))


def test_world_size_that_does_not_match_the_mesh_fails_before_training(config, tmp_path):
    res = torchrun(2, "train", str(config), "--run-dir", str(tmp_path / "bad"), "--set", "parallel.dp=3")
    assert res.returncode != 0
    assert "moelab train: error: parallel.dp * parallel.ep = 3 * 1 = 3 processes, but the world size is 2" in res.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
