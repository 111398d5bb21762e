"""`analyze` traces on the device it was asked for (the `meta` device stands in for a GPU here)."""

import pytest
import torch
from analysis_runs import run_with_data
from device_checks import assert_on_device

import moelab.analysis.run as analysis_run
from moelab.analysis.run import analyze_run


class Traced(Exception):
    pass


def test_analysis_model_and_batches_on_the_requested_device(tmp_path, dataset, monkeypatch):
    run = run_with_data(tmp_path / "run", dataset)
    seen = {}

    def collect(model, held, seq_len, batch_size, device, progress=None):
        seen["device"] = device
        assert_on_device(model, device)
        raise Traced

    monkeypatch.setattr(analysis_run, "collect_routing", collect)
    with pytest.raises(Traced):
        analyze_run(run, tokens=64, device=torch.device("meta"))
    assert seen["device"] == torch.device("meta")
