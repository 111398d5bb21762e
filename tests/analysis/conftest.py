"""Fixtures of the analysis tests: hand-built runs, a prepared two-source dataset, one analysed run."""

import contextlib
import io

import pytest
from analysis_runs import make_dataset, make_run, metrics_records, run_with_data, specialise_first_layer, tiny_config

from moelab.cli import main


@pytest.fixture
def moe_run(tmp_path):
    return make_run(tmp_path / "moe", tiny_config())


@pytest.fixture
def dense_run(tmp_path):
    return make_run(tmp_path / "dense", tiny_config("none"), metrics_records([], bpb0=3.2, fpt=2e6))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def analyzed(tmp_path_factory, dataset):
    """(run dir, stdout) of `moelab analyze` on a run whose first MoE layer specialises by source."""
    run = run_with_data(tmp_path_factory.mktemp("analyzed") / "run", dataset)
    specialise_first_layer(run)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["analyze", str(run), "--tokens", "640", "--device", "cpu"]) == 0
    return run, out.getvalue()
