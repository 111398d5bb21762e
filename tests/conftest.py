import os
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shakespeare() -> Path:
    path = SHARED / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped here when torch has none (run them with `pytest -m cuda`)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gpu_capability(monkeypatch):
    """Pretend `cuda` devices have the given compute capability (default (9, 0), an H100/H200) for tests of
    the per-device choices (expert backend, CUDA graphs) made without a GPU. Call it to change it."""
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])

    def set_capability(value: tuple[int, int]) -> None:
        cap[0] = value

    return set_capability
