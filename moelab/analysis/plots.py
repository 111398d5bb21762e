"""Figures for the report, drawn with matplotlib's object API on the Agg canvas.

No pyplot: figures are plain `Figure` objects, so nothing touches global backend state and a headless
machine needs no display. Every function returns a Figure (or None when there is nothing to draw);
`png(fig)` renders it.
"""

from __future__ import annotations

import io
import math

import numpy as np

from moelab.errors import UserError

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import EngFormatter, MaxNLocator
except ImportError:  # the optional `analysis` extra
    raise UserError("plots need matplotlib, which is not installed: pip install 'moelab[analysis]'") from None

from moelab.analysis import runlog

PANEL = (3.6, 2.9)  # inches per subplot


def png(fig: Figure, dpi: int = 110) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _grid(n: int, ncols: int = 4, panel=PANEL, title: str | None = None):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig, axes[:n]


def _matrix(
    ax,
    m,
    fig,
    title: str,
    xlabel: str,
    ylabel: str,
    cmap="viridis",
    norm=None,
    vmin=None,
    vmax=None,
    cbar_label: str = "",
    yticklabels=None,
    annotate: bool = False,
):
    m = np.asarray(m, dtype=float)
    im = ax.imshow(
        m,
        cmap=cmap,
        norm=norm,
        vmin=None if norm else vmin,
        vmax=None if norm else vmax,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), [str(s)[:18] for s in yticklabels], fontsize=7)
    if annotate and m.size <= 256:
        for (r, c), v in np.ndenumerate(m):
            if np.isfinite(v):  # dark text on the bright end of the colour map, light on the dark end
                ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=7, color="k" if im.norm(v) > 0.6 else "w")
    fig.colorbar(im, ax=ax, label=cbar_label, shrink=0.85)
    return im


# ----------------------------------------------------------------------------------------------------
# Training (from metrics.jsonl)


def training_curves(records: list[dict]) -> Figure | None:
    """Loss (train, ce, val), val bits per byte, learning rate and tokens/s against the step."""
    panels = [
        ("loss", [("train/loss", "train"), ("train/ce_loss", "train ce"), ("val/loss", "val")]),
        ("val bits per byte", [("val/bpb", "val bpb")]),
        ("learning rate", [("lr", "lr")]),
        ("throughput (tokens/s)", [("tokens_per_s", "tokens/s")]),
    ]
    panels = [(t, [(k, lab) for k, lab in keys if runlog.series(records, k)[0]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    fig, axes = _grid(len(panels), ncols=2, panel=(5.0, 3.0), title="Training")
    for ax, (title, keys) in zip(axes, panels, strict=False):
        for key, label in keys:
            xs, ys = runlog.series(records, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return fig


# The soft `cv` aux loss (std/mean of router probabilities, what gradients see) is not the hard load CV of
# the balance panel (std/mean of the tokens each expert got): distinct titles so the two are not confused.
AUX_TITLES = {"cv": "cv aux loss (soft: router probs)"}


def aux_curves(records: list[dict]) -> Figure | None:
    """Each auxiliary loss (mean over MoE layers, unweighted) against the step, one panel per loss."""
    keys = [k for k in runlog.keys_with_prefix(records, "train/aux/") if runlog.series(records, k)[0]]
    if not keys:
        return None
    fig, axes = _grid(len(keys), ncols=4, panel=(3.6, 2.6), title="Auxiliary losses (unweighted, mean over MoE layers)")
    for ax, key in zip(axes, keys, strict=False):
        xs, ys = runlog.series(records, key)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        name = key.removeprefix("train/aux/")
        ax.set_title(AUX_TITLES.get(name, name), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig


def load_heatmaps(records: list[dict]) -> Figure | None:
    """Per MoE layer: expert utilisation (E x load fraction; 1 = fair share) over training steps."""
    series = [(layer, *runlog.load_over_time(records, layer)) for layer in runlog.moe_layers(records)]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, axes = _grid(
        len(series),
        ncols=2,
        panel=(5.0, 3.0),
        title="Expert load over training (utilisation: 1 = fair share, 0 = unused)",
    )
    for ax, (layer, steps, loads) in zip(axes, series, strict=True):
        util = np.asarray(loads).T * len(loads[0])  # [E, records]
        e = util.shape[0]
        vmax = max(2.0, float(util.max()))
        im = ax.imshow(
            util,
            aspect="auto",
            interpolation="nearest",
            cmap="magma",
            vmin=0,
            vmax=vmax,
            extent=(-0.5, len(steps) - 0.5, e - 0.5, -0.5),
        )
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(6, len(steps))).round().astype(int))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, label="utilisation", shrink=0.85)
    return fig


def balance_over_time(records: list[dict]) -> Figure | None:
    """Load CV, dead experts and dropped fraction of each MoE layer against the step."""
    layers = runlog.moe_layers(records)
    if not layers:
        return None
    fig, axes = _grid(3, ncols=3, panel=(4.2, 2.8), title="Balance over training")
    panels = [
        ("load_cv", "hard load CV: tokens per expert (0 = balanced)"),
        ("dead", "dead experts"),
        ("dropped_frac", "dropped fraction"),
    ]
    for ax, (metric, title) in zip(axes, panels, strict=False):
        top = 0.0
        for layer in layers:
            xs, ys = runlog.series(records, f"moe/{layer}/{metric}")
            ax.plot(xs, ys, label=f"layer {layer}")
            top = max([top, *ys])
        # counts and fractions start at 0; an all-zero series would otherwise get an axis around 0 (-0.04..0.04)
        ax.set_ylim(0, 1.1 * top if top > 0 else (1.0 if metric == "dead" else 0.05))
        if metric == "dead":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    return fig


# ----------------------------------------------------------------------------------------------------
# Routing analysis (from analysis.json)


def utilisation_heatmap(analysis: dict) -> Figure:
    layers = analysis["layers"]
    util = np.array([lay["utilisation"] for lay in layers])  # [L, E]
    e = util.shape[1]
    fig = Figure(figsize=(max(5.0, 0.35 * e + 2.5), 0.45 * len(layers) + 1.6), layout="constrained")
    ax = fig.subplots()
    _matrix(
        ax,
        util,
        fig,
        "Expert utilisation on held-out data (1 = fair share)",
        "expert",
        "MoE layer",
        cmap="magma",
        vmin=0,
        vmax=max(2.0, float(util.max())),
        cbar_label="utilisation",
        yticklabels=[lay["layer"] for lay in layers],
        annotate=e <= 16,
    )
    return fig


def coactivation_grid(analysis: dict) -> Figure | None:
    """Share of tokens that use both experts i and j (diagonal blanked: it is the load)."""
    if analysis["top_k"] < 2:
        return None
    layers = analysis["layers"]
    fig, axes = _grid(len(layers), title="Top-k co-activation: share of tokens using both experts")
    for ax, lay in zip(axes, layers, strict=False):
        m = np.array(lay["coactivation"], dtype=float)
        np.fill_diagonal(m, np.nan)
        _matrix(
            ax,
            m,
            fig,
            f"layer {lay['layer']}",
            "expert",
            "expert",
            cmap="viridis",
            vmin=0,
            vmax=np.nanmax(m) if np.isfinite(m).any() else 1.0,
        )
    return fig


def domain_grid(analysis: dict) -> Figure | None:
    """log2 lift P(expert | domain) / P(expert): red = the domain uses the expert more than average."""
    domains = analysis.get("domains") or []
    layers = [lay for lay in analysis["layers"] if lay.get("domain_distribution")]
    if len(domains) < 2 or not layers:
        return None
    fig, axes = _grid(
        len(layers),
        ncols=2,
        panel=(5.2, 0.32 * len(domains) + 1.8),
        title="Routing by source: log2 P(expert | source) / P(expert)",
    )
    for ax, lay in zip(axes, layers, strict=False):
        dist = np.array(lay["domain_distribution"], dtype=float)  # [M, E]
        overall = np.array(lay["fraction"], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.log2(dist / overall[None, :])
        lift[np.isnan(lift)] = np.nan  # 0 / 0: an expert nobody uses (left blank)
        finite = np.abs(lift[np.isfinite(lift)])
        lim = max(1.0, float(finite.max()) if finite.size else 1.0)
        lift[np.isneginf(lift)] = -lim  # a source that never uses the expert: the darkest blue
        _matrix(
            ax,
            lift,
            fig,
            f"layer {lay['layer']}  (I = {lay['mutual_information']:.3f} bits)",
            "expert",
            "",
            cmap="RdBu_r",
            norm=TwoSlopeNorm(0.0, -lim, lim),
            cbar_label="log2 lift",
            yticklabels=[d["name"] for d in domains],
        )
        # a dead expert's column is 0/0; hatch it so it does not read as "no preference" (lift 0 is near-white too)
        for c in np.flatnonzero(overall == 0):
            ax.add_patch(Rectangle((c - 0.5, -0.5), 1, len(domains), fill=False, hatch="//", edgecolor="0.55", lw=0))
    return fig


def specialisation_summary(analysis: dict) -> Figure:
    """Per layer: I(domain; expert) against its shuffled chance level; per layer pair: accuracy of
    predicting the next layer's first-choice expert against the majority baseline."""
    layers = analysis["layers"]
    trans = analysis.get("transitions") or []
    fig, axes = _grid(2 if trans else 1, ncols=2, panel=(5.0, 3.0), title="Specialisation")
    ax = axes[0]
    x = np.arange(len(layers))
    if analysis.get("domains") and len(analysis["domains"]) > 1:
        bars = [
            ("mutual_information", "I(source; expert)"),
            ("mi_token_null", "null: shuffled within token"),
            ("mi_untrained", "untrained model"),
            ("mi_chance", "null: shuffled sources"),
        ]
        bars = [(k, lab) for k, lab in bars if all(lay.get(k) is not None for lay in layers)]
        w = 0.8 / len(bars)
        top = max([analysis["domain_entropy"]] + [lay[k] for lay in layers for k, _ in bars])
        for j, (key, label) in enumerate(bars):
            vals = [lay[key] for lay in layers]
            # a chance level of 0.0002 bits is an invisible bar on a scale of bits: draw at least a sliver
            # (outlined) and print every value on its bar
            drawn = ax.bar(
                x - 0.4 + w * (j + 0.5),
                [max(v, 0.01 * top) for v in vals],
                w,
                label=label,
                edgecolor="k",
                linewidth=0.5,
            )
            ax.bar_label(drawn, labels=[f"{v:.2g}" for v in vals], fontsize=6, rotation=90, padding=2)
        ax.axhline(analysis["domain_entropy"], color="k", ls="--", lw=1, label="H(source): perfect")
        ax.set_ylabel("bits")
        ax.set_ylim(0, 1.45 * top)
        ax.legend(fontsize=6, loc="upper right", ncol=2)
    else:
        ax.text(
            0.5,
            0.5,
            "one source only:\nno domain specialisation to measure",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xticks(x, [str(lay["layer"]) for lay in layers])
    ax.set_xlabel("MoE layer")
    ax.set_title("Mutual information between source and expert", fontsize=10)
    if trans:
        ax = axes[1]
        x = np.arange(len(trans))
        ax.bar(x - 0.2, [t["accuracy"] for t in trans], 0.4, label="from layer l's expert")
        ax.bar(x + 0.2, [t["baseline"] for t in trans], 0.4, label="majority baseline")
        ax.set_xticks(x, [f"{t['from']}->{t['to']}" for t in trans])
        ax.set_ylim(0, 1.3)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_xlabel("layer pair")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("Predicting layer l+1's first-choice expert", fontsize=10)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    return fig


def transition_grid(analysis: dict) -> Figure | None:
    trans = analysis.get("transitions") or []
    if not trans:
        return None
    fig, axes = _grid(len(trans), title="P(first-choice expert in layer l+1 | first choice in layer l)")
    for ax, t in zip(axes, trans, strict=False):
        _matrix(
            ax,
            t["matrix"],
            fig,
            f"layer {t['from']} -> {t['to']}",
            f"expert in layer {t['to']}",
            f"expert in layer {t['from']}",
            cmap="Blues",
            vmin=0,
            vmax=1,
        )
    return fig


# ----------------------------------------------------------------------------------------------------
# Run comparison


def compare_curves(runs: list[dict]) -> Figure:
    """Val bits per byte against training tokens, FLOPs and wall time, one line per run. Each run is
    {"name", "records"}."""
    fig, axes = _grid(3, ncols=3, panel=(4.6, 3.4), title="Validation bits per byte at equal data, compute and time")
    for ax, (x, label) in zip(
        axes, [("tokens", "training tokens"), ("flops", "training FLOPs"), ("elapsed_s", "wall time (s)")], strict=False
    ):
        for run in runs:
            xs, ys = runlog.series(run["records"], "val/bpb", x=x)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=run["name"])
        ax.set_xlabel(label)
        ax.set_ylabel("val bits per byte")
        ax.grid(alpha=0.3)
        if x != "elapsed_s":  # millions of tokens / 1e15 FLOPs: short labels ("2M"), few of them, never touching
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.xaxis.set_major_locator(MaxNLocator(4))
    axes[0].legend(fontsize=8)
    return fig
