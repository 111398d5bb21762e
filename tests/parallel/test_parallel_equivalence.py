"""dp, ep and dp x ep on gloo reproduce the single-process run on the same global batches. Ranks are
spawned with the torchrun environment variables, so the code path is the one torchrun takes. (Resuming
across process counts is tested end to end on `moelab train` in test_parallel_train_cli.py.)"""

import dataclasses

import pytest
import torch
from parallel_harness import spawn, tiny_config, train

pytestmark = pytest.mark.slow  # end to end (subprocesses, torchrun, transformers, benchmarks)

STEPS = 10


def assert_close_runs(got: dict, want: dict) -> None:
    # fp32 everywhere; the tolerance is the relative 1e-5 on every step's loss, and the
    # gradient norm is checked too because Adam would hide a wrongly scaled gradient from the losses.
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor(got[key], dtype=torch.float64),
            torch.tensor(want[key], dtype=torch.float64),
            rtol=1e-5,
            atol=0.0,
            msg=lambda m, key=key: f"{key}: {m}",
        )


def run_ranks(world, parallel, tmp_path, model=None):
    job = {"config": dataclasses.asdict(tiny_config(parallel, **(model or {}))), "steps": [0, STEPS]}
    results = spawn(world, job, tmp_path)
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r.get('traceback', r['error'])}"
    for r in results[1:]:  # every rank logs the same global numbers
        assert r["loss"] == results[0]["loss"]
    return results[0]


@pytest.fixture(scope="module")
def reference():
    return train(tiny_config(), range(STEPS))


@pytest.mark.parametrize(
    "world,parallel",
    [
        (2, {"dp": 2, "reshard_after_forward": False}),  # ZeRO-2-like: gathered params kept for backward
        (2, {"ep": 2}),
        (4, {"dp": 2, "ep": 2}),
    ],
    ids=["dp2-zero2", "ep2", "dp2xep2"],
)
def test_parallel_run_reproduces_single_process(world, parallel, reference, tmp_path):
    got = run_ranks(world, parallel, tmp_path)
    assert reference["loss"][-1] < reference["loss"][0] - 0.5  # the run really trains
    assert_close_runs(got, reference)


def test_replicated_params_with_cpu_offload_and_tied_embeddings(tmp_path):
    # fsdp: false replicates the dense params (HSDP with shard groups of one); experts stay ep-sharded
    want = train(tiny_config(tie_embeddings=True), range(STEPS))
    parallel = {"ep": 2, "fsdp": False, "cpu_offload": True}
    assert_close_runs(run_ranks(2, parallel, tmp_path, model={"tie_embeddings": True}), want)
