"""A tiny base model trained once per session, for the fine-tuning tests."""

import pytest
import torch

from tests.train.conftest import one_thread, toy_data  # noqa: F401
from tests.train.train_helpers import TINY, tiny_cfg, toy_corpus  # noqa: F401


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, toy_data):  # noqa: F811
    from moelab.train import train

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("base") / "run"
    cfg = tiny_cfg(
        toy_data,
        train={"steps": 4},
        model={"moe": {"num_shared_experts": 1}},
        checkpoint={"every": 0},
        eval={"every": 0, "batches": 1},
    )
    train(cfg, run_dir=run, progress=False)
    return run
