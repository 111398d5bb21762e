"""dp, ep and dp x ep on gloo reproduce the single-process run on the same global batches. Ranks are
spawned with the torchrun environment variables, so the code path is the one torchrun takes. (Resuming
across process counts is tested end to end on `moelab train` in test_parallel_train_cli.py.)"""

import dataclasses

import pytest
import torch
from parallel_harness import TINY, spawn, tiny_config, train

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


def run_ranks(world, parallel, tmp_path, model=None, finetune=None):
    job = {"config": dataclasses.asdict(tiny_config(parallel, finetune, **(model or {}))), "steps": [0, STEPS]}
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


# LoRA on attention, shared and routed experts; rank 3 is padded to 16-byte strides by grouped_mm
LORA = {"mode": "lora", "lora": {"rank": 3, "alpha": 6.0, "targets": ["attn", "experts", "shared"]}}


def with_backend(backend: str) -> dict:
    return {"moe": {**TINY["model"]["moe"], "expert_backend": backend}}


@pytest.mark.parametrize(
    "world,parallel,backend",
    [(2, {"ep": 2}, "auto"), (2, {"ep": 2}, "grouped_mm"), (4, {"dp": 2, "ep": 2}, "auto")],
    ids=["ep2", "ep2-grouped_mm", "dp2xep2"],
)
def test_expert_lora_under_expert_parallelism_reproduces_single_process(world, parallel, backend, tmp_path):
    """The adapters are sharded with their experts, trained, and the frozen base stays frozen."""
    model = with_backend(backend)
    want = train(tiny_config(finetune=LORA, **model), range(STEPS))
    got = run_ranks(world, parallel, tmp_path, model=model, finetune=LORA)
    assert_close_runs(got, want)
    assert want["loss"][-1] < want["loss"][0] - 0.05  # the adapters really train (a random base, 10 steps)
    assert got["trainable"] == want["trainable"] == got["optimized"]
    assert any(n.endswith("experts.lora.gu_a") for n in got["trainable"])
    assert not any(n.endswith(("experts.gate_up", "experts.down")) for n in got["trainable"])
    assert got["frozen_with_grad"] == [] == want["frozen_with_grad"]
