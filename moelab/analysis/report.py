"""One self-contained HTML report per run: training curves from metrics.jsonl and routing analysis
from analysis.json, every figure embedded as a base64 PNG data URI (the file can be mailed or opened
from disk with nothing beside it). The PNGs are also written next to it for use elsewhere.

    RUN/report/report.html      the report
    RUN/report/analysis.json    written by `moelab analyze` (read here when present)
    RUN/report/*.png            the same figures as separate files
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from moelab.analysis import plots, runlog
from moelab.errors import UserError
from moelab.fileio import write_file_atomic

REPORT_DIR = "report"
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
code.tok { background: #f3f3f3; padding: 0 3px; margin-right: 4px; border-radius: 3px; white-space: pre; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
.note { background: #fff8e1; border-left: 4px solid #f0c040; padding: 0.5em 1em; }
"""


def read_run_config(run_dir: Path):
    """The run's Config (RUN/config.yaml, else its newest checkpoint's), or None."""
    from moelab.checkpoint import list_checkpoints, read_config
    from moelab.config import Config, from_dict, read_yaml

    if (run_dir / "config.yaml").is_file():
        return from_dict(Config, read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    found = list_checkpoints(run_dir)
    return read_config(found[-1]) if found else None


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e9):
        return f"{int(v):,}"  # counts (tokens, steps) read as floats from JSON stay exact
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    return f"{v:.{digits}g}"


def _table(head: list[str], rows: list[list], left: int = 1) -> str:
    th = "".join(f"<th{' class=l' if i < left else ''}>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=l' if i < left else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


class Figures:
    """Renders figures once: each becomes a PNG file in the report dir and an <img> data URI."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.written: list[Path] = []

    def html(self, name: str, fig, caption: str) -> str:
        if fig is None:
            return ""
        data = plots.png(fig)
        path = self.out_dir / f"{name}.png"
        write_file_atomic(path, data)
        self.written.append(path)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return f'<figure><img alt="{_e(caption)}" src="{uri}"><figcaption>{_e(caption)}</figcaption></figure>'


def _overview(run_dir: Path, cfg, records: list[dict] | None) -> str:
    rows = [["run", _e(run_dir.resolve())]]
    if cfg is not None:
        from moelab.model.counting import count_params

        m = cfg.model
        moe_ids = m.moe_layer_ids()
        p = count_params(m)
        arch = f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads"
        if moe_ids:
            arch += (
                f"; MoE layers {moe_ids}: {m.moe.num_experts} experts of width {m.moe.expert_dim}, "
                f"top-{m.moe.top_k}, router {m.moe.router}"
            )
            if m.moe.num_shared_experts:
                arch += f", {m.moe.num_shared_experts} shared"
        else:
            arch += f"; dense FFN width {m.ffn_dim}"
        rows += [["model", _e(arch)], ["parameters", f"{p.total:,} total, {p.active:,} active per token"]]
    if records:
        last = records[-1]
        rows += [
            [
                "trained",
                f"step {last['step']:,}, {_fmt(last.get('tokens'))} tokens, "
                f"{_fmt(last.get('flops'))} FLOPs, {_fmt(last.get('elapsed_s'), 3)} s",
            ],
            ["final train loss", _fmt(runlog.last_value(records, "train/loss"))],
            [
                "val loss (last / best)",
                f"{_fmt(runlog.last_value(records, 'val/loss'))} / {_fmt(runlog.best_value(records, 'val/loss'))}",
            ],
            [
                "val bits per byte (last / best)",
                f"{_fmt(runlog.last_value(records, 'val/bpb'))} / {_fmt(runlog.best_value(records, 'val/bpb'))}",
            ],
        ]
    return (
        "<h2>Overview</h2>"
        + "<table>"
        + "".join(f"<tr><th class=l>{_e(k)}</th><td class=l>{v}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _training(records: list[dict], figs: Figures) -> str:
    parts = ["<h2>Training</h2>"]
    parts.append(
        figs.html(
            "training_curves",
            plots.training_curves(records),
            "Loss, validation bits per byte, learning rate and throughput against the optimizer step.",
        )
    )
    parts.append(
        figs.html(
            "training_aux",
            plots.aux_curves(records),
            "Each auxiliary loss, unweighted, averaged over MoE layers (see docs/model.md for scales).",
        )
    )
    parts.append(
        figs.html(
            "training_load",
            plots.load_heatmaps(records),
            "Per MoE layer, each expert's share of the routed tokens times E over training: 1 is a "
            "fair share, 0 an unused expert.",
        )
    )
    parts.append(
        figs.html(
            "training_balance",
            plots.balance_over_time(records),
            "Load coefficient of variation, dead experts and capacity-dropped fraction per layer.",
        )
    )
    if not runlog.moe_layers(records):
        parts.append("<p class=note>No MoE layers were logged: this is a dense run.</p>")
    return "".join(parts)


def _token(t: dict) -> str:
    text = t.get("text", f"#{t['id']}")
    text = text.replace(" ", "\u2423").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") or "\u2205"
    # any other control character (a CRLF or binary corpus) would break the table row: show its code
    text = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return f'<code class=tok title="id {t["id"]}, {t["count"]}x, {100 * t["share"]:.0f}% of its uses">{_e(text)}</code>'


def _analysis(a: dict, figs: Figures) -> str:
    parts = [
        f"<h2>Routing analysis</h2><p class=meta>{_e(a['tokens'])} held-out tokens from "
        f"<code>{_e(a.get('data', '?'))}</code> ({_e(a.get('split', '?'))} split), checkpoint "
        f"<code>{_e(a.get('checkpoint', '?'))}</code>.</p>"
    ]
    has_mi = len(a.get("domains", [])) > 1
    head = [
        "layer",
        "load CV",
        "max util",
        "min util",
        "dead experts (ids)",
        "load entropy / max",
        "router entropy (nats)",
        "dropped",
    ]
    if has_mi:
        head += [
            "I(source; expert) bits",
            "null: shuffled sources",
            "null: shuffled within token",
            "I above token null",
            "untrained model",
            "I / H(source)",
        ]
    rows = []
    for lay in a["layers"]:
        r = [
            lay["layer"],
            _fmt(lay["load_cv"]),
            _fmt(lay["max_utilisation"], 3),
            _fmt(lay["min_utilisation"], 3),
            _e(f"{len(lay['dead'])} ({', '.join(map(str, lay['dead']))})" if lay["dead"] else "0"),
            _fmt(lay["load_entropy"] / lay["max_load_entropy"], 3),
            f"{_fmt(lay['router_entropy_nats'], 3)} of {_fmt(lay['max_router_entropy_nats'], 3)}",
            _fmt(lay["dropped_fraction"], 3),
        ]
        if has_mi:
            r += [
                _fmt(lay["mutual_information"]),
                _fmt(lay["mi_chance"]),
                _fmt(lay.get("mi_token_null")),
                _fmt(lay.get("mi_above_token_null")),
                _fmt(lay.get("mi_untrained")),
                _fmt(lay["mi_normalised"], 3),
            ]
        rows.append(r)
    parts.append(_table(head, rows, left=0))
    parts.append(
        figs.html(
            "analysis_utilisation",
            plots.utilisation_heatmap(a),
            "Expert utilisation per MoE layer on held-out data (1 = fair share 1/E).",
        )
    )
    parts.append(
        figs.html(
            "analysis_specialisation",
            plots.specialisation_summary(a),
            "Left: mutual information between a token's source file and its experts, against two "
            "nulls: sources shuffled only among occurrences of the same token (what token identity "
            "alone explains: read specialisation as the excess over this), sources shuffled freely "
            "(finite-sample chance), the same tokens through an untrained model (for scale), and "
            "H(source) (perfect specialisation). "
            "Right: accuracy of predicting a token's first-choice expert in the next "
            "MoE layer from this layer's, fitted and scored on disjoint halves of the tokens.",
        )
    )
    if has_mi:
        parts.append(
            "<h3>Sources</h3>"
            + _table(["source", "tokens"], [[_e(d["name"]), _fmt(d["tokens"])] for d in a["domains"]])
        )
    parts.append(
        figs.html(
            "analysis_domains",
            plots.domain_grid(a),
            "How much more (red) or less (blue) often each source's tokens use each expert than the "
            "average token does; hatched columns are dead experts (no token used them).",
        )
    )
    parts.append(
        figs.html(
            "analysis_coactivation",
            plots.coactivation_grid(a),
            "Share of tokens routed to both experts (off-diagonal of the top-k co-activation matrix).",
        )
    )
    parts.append(
        figs.html(
            "analysis_transitions",
            plots.transition_grid(a),
            "Where a token's first-choice expert in one MoE layer sends it in the next.",
        )
    )
    if a.get("transitions"):
        parts.append(
            _table(
                ["layers", "H(next)", "H(next | this)", "accuracy", "majority baseline"],
                [
                    [
                        f"{t['from']} &rarr; {t['to']}",
                        _fmt(t["entropy"], 3),
                        _fmt(t["cond_entropy"], 3),
                        f"{100 * t['accuracy']:.1f}%",
                        f"{100 * t['baseline']:.1f}%",
                    ]
                    for t in a["transitions"]
                ],
            )
        )
    parts.append(
        "<h3>Top tokens per expert</h3><p class=meta>Frequent: tokens the expert received most often. "
        "Distinctive: highest P(expert | token) / P(expert) among tokens seen at least a few times. "
        "Hover a token for its count.</p>"
    )
    for i, lay in enumerate(a["layers"]):
        top = lay["top_tokens"]
        rows = [
            [
                e,
                "".join(_token(t) for t in top["frequent"][e][:8]),
                "".join(_token(t) for t in top["distinctive"][e][:8]),
            ]
            for e in range(a["num_experts"])
        ]
        parts.append(
            f"<details{' open' if i == 0 else ''}><summary>layer {lay['layer']}</summary>"
            + _table(["expert", "frequent", "distinctive"], rows, left=3)
            + "</details>"
        )
    return "".join(parts)


# What the report reads from analysis.json; anything else in it is optional (older or hand-edited files).
ANALYSIS_KEYS = ("tokens", "num_experts", "top_k", "layers")
LAYER_KEYS = (
    "layer",
    "fraction",
    "utilisation",
    "load_cv",
    "max_utilisation",
    "min_utilisation",
    "dead",
    "load_entropy",
    "max_load_entropy",
    "router_entropy_nats",
    "max_router_entropy_nats",
    "dropped_fraction",
    "coactivation",
    "top_tokens",
)


def analysis_problem(a) -> str | None:
    """Why `a` is not an analysis.json the report can render, or None if it is."""
    if not isinstance(a, dict):
        return f"expected a JSON object, got {type(a).__name__}"
    missing = [k for k in ANALYSIS_KEYS if k not in a]
    if missing:
        return f"missing {', '.join(map(repr, missing))}"
    if not isinstance(a["layers"], list) or not a["layers"]:
        return "'layers': expected a non-empty list of MoE layers"
    for i, lay in enumerate(a["layers"]):
        if not isinstance(lay, dict):
            return f"layers[{i}]: expected a JSON object"
        if "cv" in lay and "load_cv" not in lay:  # written before the hard load CV got its own name
            lay["load_cv"] = lay.pop("cv")
        missing = [k for k in LAYER_KEYS if k not in lay]
        if missing:
            return f"layers[{i}]: missing {', '.join(map(repr, missing))}"
    return None


def read_analysis(run_dir: Path) -> dict | None:
    path = Path(run_dir) / REPORT_DIR / "analysis.json"
    if not path.is_file():
        return None
    try:
        a = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else e.msg
        raise UserError(f"{path}: not valid JSON ({why}); rerun `moelab analyze {run_dir}`") from None
    problem = analysis_problem(a)
    if problem:
        raise UserError(
            f"{path}: not an analysis written by `moelab analyze` ({problem}); rerun `moelab analyze {run_dir}`"
        )
    return a


def write_report(run_dir: str | Path, analysis: dict | None = None, require_training: bool = False) -> Path:
    """Write RUN/report/report.html (+ PNGs) from metrics.jsonl and analysis.json (or `analysis`).
    With `require_training`, a missing or empty training log is an error; otherwise that section is
    left out. Returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    records, no_records = None, "metrics.jsonl missing or empty"
    try:
        records = runlog.read_metrics(run_dir)
    except UserError as e:
        if require_training:
            raise
        no_records = str(e)  # shown in the report: a corrupt log should not vanish silently
    if analysis is None:
        analysis = read_analysis(run_dir)
    if records is None and analysis is None:
        raise UserError(
            f"{run_dir}: nothing to report: no training records in metrics.jsonl and no "
            f"{REPORT_DIR}/analysis.json (run `moelab analyze {run_dir}`)"
        )
    out_dir = run_dir / REPORT_DIR
    figs = Figures(out_dir)
    body = [
        f"<h1>moelab report: {_e(run_dir.resolve().name)}</h1>",
        f"<p class=meta>generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        _overview(run_dir, read_run_config(run_dir), records),
    ]
    body.append(
        _training(records, figs)
        if records
        else f"<h2>Training</h2><p class=note>No training curves: {_e(no_records)}</p>"
    )
    body.append(
        _analysis(analysis, figs)
        if analysis
        else f"<h2>Routing analysis</h2><p class=note>Not run yet: <code>moelab analyze {_e(run_dir)}</code> "
        "adds expert load, specialisation and co-activation on held-out data.</p>"
    )
    doc = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>moelab report: {_e(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>"
    )
    path = out_dir / "report.html"
    write_file_atomic(path, doc.encode("utf-8"))
    return path
