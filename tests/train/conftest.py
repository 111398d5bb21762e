"""Fixtures for the training tests: one intra-op thread, a toy byte-level dataset."""

from pathlib import Path

import pytest
import torch

from moelab.data import prepare
from tests.train.train_helpers import toy_corpus


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation (and on a loaded machine
    spinning threads slow every matmul down many times over)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    out = root / "data"
    prepare([str(toy_corpus(root / "corpus"))], "byte", out, val_fraction=0.1, workers=0)
    return out
