"""MFU is reported next to the achieved FLOP/s and the peak it is compared to, and never exceeds 100%."""

import sys

from train_helpers import read_metrics, tiny_cfg

from moelab.train.loop import Trainer
from moelab.train.telemetry import mfu_fields


def test_mfu_fields_cap_and_flag():
    assert mfu_fields(50.0, 1.0, 100.0) == {"flops_per_s": 50.0, "peak_flops": 100.0, "mfu": 0.5}
    assert mfu_fields(300.0, 1.0, 100.0) == {"flops_per_s": 300.0, "peak_flops": 100.0, "mfu": 1.0, "mfu_capped": True}
    assert mfu_fields(1.0, 0.0, 100.0) == {"mfu": None}
    assert mfu_fields(50.0, 1.0, 0.0) == {"flops_per_s": 50.0, "mfu": None}  # peak 0: no MFU


def test_a_beaten_start_peak_is_measured_again_once_then_capped(toy_data, tmp_path, monkeypatch):
    calls = []

    def at_start(dtype, device):
        calls.append(("start", dtype, device))
        return 1.0  # FLOP/s: any run beats it

    def fresh(dtype, device):
        calls.append(("fresh", dtype, device))
        return 2.0

    at_start.__wrapped__ = fresh
    monkeypatch.setattr(sys.modules["moelab.train.loop"], "measure_matmul_peak", at_start)
    cfg = tiny_cfg(
        toy_data, train={"steps": 3, "peak_flops": None, "device": "cpu"}, eval={"every": 0}, checkpoint={"every": 0}
    )
    Trainer(cfg, tmp_path / "run").run()
    assert calls == [("start", "float32", "cpu"), ("fresh", "float32", "cpu")]
    recs = read_metrics(tmp_path / "run")
    assert all(r["mfu"] == 1.0 and r["mfu_capped"] and r["peak_flops"] == 2.0 for r in recs)
    assert all(r["flops_per_s"] > 2.0 for r in recs)


def test_a_stated_peak_is_kept(toy_data, tmp_path):
    cfg = tiny_cfg(
        toy_data, train={"steps": 2, "peak_flops": 1.0e15, "device": "cpu"}, eval={"every": 0}, checkpoint={"every": 0}
    )
    Trainer(cfg, tmp_path / "run").run()
    for r in read_metrics(tmp_path / "run"):
        assert r["peak_flops"] == 1.0e15 and 0 < r["mfu"] < 1 and "mfu_capped" not in r


def test_a_zero_peak_means_no_mfu_and_no_measurement(toy_data, tmp_path, monkeypatch):
    """Benches that compare losses, not speed, state `peak_flops: 0`: no matmul is timed at start and no
    MFU is logged against an invented peak (a stated 1 FLOP/s used to log every record as 100%, capped)."""

    def never(dtype, device):
        raise AssertionError("the peak was measured")

    never.__wrapped__ = never
    monkeypatch.setattr(sys.modules["moelab.train.loop"], "measure_matmul_peak", never)
    cfg = tiny_cfg(
        toy_data, train={"steps": 2, "peak_flops": 0, "device": "cpu"}, eval={"every": 0}, checkpoint={"every": 0}
    )
    Trainer(cfg, tmp_path / "run").run()
    recs = [r for r in read_metrics(tmp_path / "run") if "flops_per_s" in r or "mfu" in r]
    assert recs and all(r["mfu"] is None and r["flops_per_s"] > 0 and "peak_flops" not in r for r in recs)
