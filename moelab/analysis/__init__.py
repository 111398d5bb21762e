"""Routing analysis and reports: are the experts balanced, do they specialise, does the MoE beat a
dense model at equal compute? See docs/analysis.md.

- `stats`: pure statistics of routing tensors (load, CV, co-activation, mutual information, ...)
- `collect`: a model over held-out tokens -> `RoutingTrace`; `trace`: trace -> analysis.json dict
- `run.analyze_run`: checkpoint + dataset -> RUN/report/analysis.json + report.html
- `runlog`, `plots`, `report.write_report`: metrics.jsonl curves and the self-contained HTML report
- `compare.write_comparison`: val bits per byte of several runs at equal tokens, FLOPs and time

Only `stats` is imported eagerly; the rest pull in matplotlib (the `analysis` extra) on first use.
"""

from moelab.analysis import stats

__all__ = ["analyze_run", "stats", "write_comparison", "write_report"]

_LAZY = {
    "analyze_run": "moelab.analysis.run",
    "write_report": "moelab.analysis.report",
    "write_comparison": "moelab.analysis.compare",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab.analysis' has no attribute {name!r}")
