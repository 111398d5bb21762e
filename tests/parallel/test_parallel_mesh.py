"""Mesh sizes are checked against the torchrun environment before any process group exists; the
expert-parallel permutation is the one the grouped kernel expects."""

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from parallel_harness import tiny_config

from moelab.config import ParallelConfig
from moelab.errors import ConfigError, UserError
from moelab.parallel import ParallelContext, init_parallel, resolve_sizes
from moelab.parallel.expert_parallel import source_to_expert_order


def torchrun_env(monkeypatch, world, rank=0):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing may connect: the error must come first


@pytest.mark.parametrize(
    "world,parallel,match",
    [
        (4, {"dp": 3}, "dp \\* parallel.ep = 3 \\* 1 = 3 processes, but the world size is 4"),
        (4, {"dp": 2, "ep": 4}, "= 2 \\* 4 = 8 processes, but the world size is 4"),
        (2, {"dp": 2, "ep": 2}, "= 2 \\* 2 = 4 processes, but the world size is 2"),
        (1, {"ep": 2}, "does not divide the world size 1"),
        (3, {"ep": 3}, "parallel.ep=3 does not divide model.moe.num_experts=4"),
    ],
)
def test_mesh_that_does_not_fit_is_an_error_before_any_work(monkeypatch, world, parallel, match):
    torchrun_env(monkeypatch, world)
    cfg = tiny_config()  # 4 experts
    with pytest.raises(UserError, match=match):
        init_parallel(ParallelConfig(**parallel), cfg.model)
    assert not dist.is_initialized()


def test_ep_not_dividing_experts_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel.ep: 3 does not divide model.moe.num_experts=4"):
        tiny_config({"ep": 3})


def test_reference_experts_cannot_be_expert_parallel():
    cfg = tiny_config()
    cfg.model.moe.expert_backend = "reference"
    with pytest.raises(UserError, match="expert_backend"):
        resolve_sizes(ParallelConfig(ep=2), 2, cfg.model)


def test_dp_defaults_to_world_over_ep_and_single_process_needs_no_group(monkeypatch):
    assert resolve_sizes(ParallelConfig(ep=2), 8) == (4, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_parallel(ParallelConfig(), tiny_config().model)
    assert (ctx.world_size, ctx.dp, ctx.ep, ctx.distributed) == (1, 1, 1, False)
    assert not dist.is_initialized()


def test_local_batch_slices_the_global_batch():
    ctx = ParallelContext(rank=2, world_size=4)
    assert ctx.local_batch(8) == slice(4, 6)
    with pytest.raises(UserError, match="train.batch_size=6 .* not divisible by the world size 4"):
        ctx.local_batch(6)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_source_major_rows_become_expert_major(p, l, data):
    counts = torch.tensor(data.draw(st.lists(st.integers(0, 5), min_size=p * l, max_size=p * l))).view(p, l)
    # tag each received row with (local expert, source, index within its block)
    tags = [(e, s, i) for s in range(p) for e in range(l) for i in range(int(counts[s, e]))]
    order = source_to_expert_order(counts)
    assert [tags[j] for j in order.tolist()] == sorted(tags)
