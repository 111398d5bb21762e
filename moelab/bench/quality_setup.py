"""What `moelab bench quality` compares: the corpora it builds itself, the models (the shipped MoE recipe, its
dense twin of equal active parameters, transformers' model of the MoE's shape), and the summary.

Corpora (all generated or shipped here, no downloads; bits per byte counted from the bytes each target token
covers):
- `shakespeare`: ../shared/data/tinyshakespeare.txt, byte tokens, paragraphs as documents, 5% validation;
- `stdlib`: the running Python's standard library, a SentencePiece BPE of 4096 pieces trained on a 10 MB
  sample of it, files as documents, 5% validation;
- `domains`: five clearly different generated domains (arithmetic, code-like text, prose, CJK, JSON records;
  `moelab.bench.dynamic.make_corpus`), byte tokens, 10% validation;
- any text file given as `file:PATH` (or `--data PATH`), byte tokens like shakespeare.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

from moelab.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
CORPORA = ("shakespeare", "stdlib", "domains")
DEFAULT_RECIPE = "recipe-cpu"


def prepare_corpus(name: str, work: Path) -> Path:
    """The prepared dataset directory of corpus `name` under `work` (built on first use, reused after)."""
    from moelab.data import prepare

    if name.startswith("file:"):
        text = Path(name[5:])
        if not text.is_file():
            raise UserError(f"--data {text}: no such file")
        out = work / f"data-file-{text.stem}"  # one per file: a shared name would reuse another file's tokens
    else:
        out = work / f"data-{name}"
    if (out / "meta.json").is_file():
        return out
    if name == "shakespeare" or name.startswith("file:"):
        src = SHAKESPEARE if name == "shakespeare" else text
        if not src.is_file():
            raise UserError(f"corpus {name}: {src} does not exist (the team's shared data sits beside the checkout)")
        prepare([str(src)], "byte", out, val_fraction=0.05, doc_boundary="blank", workers=0)
    elif name == "stdlib":
        from moelab.data.tokenizer_training import train_tokenizer

        train_tokenizer(["stdlib"], work / "tokenizer-stdlib", 4096, sample_mb=10.0)
        prepare(["stdlib"], work / "tokenizer-stdlib", out, val_fraction=0.05)
    elif name == "domains":
        from moelab.bench.dynamic import make_corpus

        dirs = make_corpus(work / "domains-src", seed=0, docs=400)
        prepare([str(d) for d in dirs], "byte", out, val_fraction=0.1, workers=0)
    else:
        raise UserError(f"--corpora: expected one of {', '.join(CORPORA)} or file:PATH, got {name!r}")
    return out


def load_recipe(recipe: str) -> dict:
    """The MoE recipe as a config dict: a preset name (moelab/configs/NAME.yaml) or a YAML path."""
    from moelab.config_build import read_yaml
    from moelab.presets import preset_path

    path = preset_path(recipe)
    data = read_yaml(path)
    if "moe" not in data.get("model", {}) or data["model"].get("moe", {}).get("layers") == "none":
        raise UserError(f"--recipe {path}: expected an MoE config (model.moe with MoE layers), got a dense one")
    return data


def active_ffn_width(moe: dict) -> int:
    """Width of the dense SwiGLU with the MoE's active expert parameters: top_k routed + shared experts."""
    from moelab.config import MoEConfig

    return MoEConfig(**moe).active_ffn_dim


def model_configs(recipe: dict, data_dir: Path, vocab_size: int) -> dict[str, dict]:
    """{"moe", "dense", "hf"} config dicts for one corpus. The dense twin keeps every setting of the recipe
    and replaces each MoE feed-forward by a SwiGLU of the same active width (so equal active parameters and
    FLOPs per token, up to the router)."""
    moe = copy.deepcopy(recipe)
    moe["model"]["vocab_size"] = vocab_size
    moe.setdefault("data", {})["path"] = str(data_dir.resolve())
    moe.setdefault("checkpoint", {}).update(every=0, keep_last=1, keep_best=False)
    moe.setdefault("log", {})["progress"] = False
    moe.setdefault("train", {})["peak_flops"] = 0  # no MFU per run (no peak measurement): not what is compared
    return {"moe": moe, "dense": dense_twin(moe), "hf": copy.deepcopy(moe)}


def dense_twin(config: dict) -> dict:
    """A copy of the config dict `config` with every MoE feed-forward replaced by a SwiGLU of the MoE's active
    width (top_k routed + shared experts): equal active parameters and FLOPs per token, up to the router."""
    dense = copy.deepcopy(config)
    dense["model"]["ffn_dim"] = active_ffn_width(dense["model"]["moe"])
    dense["model"]["moe"]["layers"] = "none"
    return dense


def curve_stats(curve: list[dict]) -> dict:
    return {
        "steps_done": curve[-1]["step"] if curve else 0,
        "tokens": curve[-1]["tokens"] if curve else 0,
        "final_bpb": curve[-1]["val/bpb"] if curve else None,
        "best_bpb": min(c["val/bpb"] for c in curve) if curve else None,
    }


def routing_health(records: list[dict]) -> dict:
    """Dead experts and hard load CV per MoE layer at the last logged step (the routing at the end of a run)."""
    last = next((r for r in reversed(records) if any(k.endswith("/load_cv") for k in r)), None)
    if last is None:
        return {}
    layers = sorted({k.split("/")[1] for k in last if k.startswith("moe/") and k.endswith("/load_cv")}, key=int)
    return {
        "dead_per_layer": [last.get(f"moe/{i}/dead") for i in layers],
        "load_cv_per_layer": [last[f"moe/{i}/load_cv"] for i in layers],
        "at_step": last.get("step"),
    }


def summarise(runs: list[dict]) -> dict:
    """Per corpus and model: final val bits/byte over seeds (mean, min, max), and MoE - dense paired by seed."""
    out: dict = {}
    for corpus in dict.fromkeys(r["corpus"] for r in runs):
        rows = [r for r in runs if r["corpus"] == corpus and r["final_bpb"] is not None]
        per_model = {}
        for model in dict.fromkeys(r["model"] for r in rows):
            vals = [r["final_bpb"] for r in rows if r["model"] == model]
            per_model[model] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        by_seed = {(r["model"], r["seed"]): r["final_bpb"] for r in rows}
        diffs = {}
        for other in ("dense", "hf"):
            seeds = [s for (m, s) in by_seed if m == other and ("moe", s) in by_seed]
            d = [by_seed[("moe", s)] - by_seed[(other, s)] for s in seeds]
            if d:
                diffs[f"moe_minus_{other}"] = {"mean": statistics.fmean(d), "min": min(d), "max": max(d), "n": len(d)}
        out[corpus] = {"models": per_model, **diffs}
    return out


def plot(results: dict, path: Path) -> None:
    """One row per corpus: val bits/byte against training time and against tokens, one line per run."""
    from matplotlib.figure import Figure

    from moelab.analysis.plots import png
    from moelab.fileio import write_file_atomic

    corpora = list(dict.fromkeys(r["corpus"] for r in results["runs"]))
    fig = Figure(figsize=(11, 3.6 * len(corpora)))
    axes = fig.subplots(len(corpora), 2, squeeze=False)
    colors = {"moe": "tab:blue", "dense": "tab:orange", "hf": "tab:green"}
    for row, corpus in zip(axes, corpora, strict=True):
        for r in (r for r in results["runs"] if r["corpus"] == corpus and r["curve"]):
            label = f"{r['impl']}, seed {r['seed']}"
            ys = [c["val/bpb"] for c in r["curve"]]
            kw = {"color": colors.get(r["model"]), "marker": "o", "ms": 2, "lw": 1, "label": label}
            row[0].plot([c["elapsed_s"] / 60 for c in r["curve"]], ys, **kw)
            row[1].plot([c["tokens"] / 1e6 for c in r["curve"]], ys, **kw)
        row[0].set_xlabel("training time (min)")
        row[1].set_xlabel("training tokens (M)")
        for ax in row:
            ax.set_ylabel("val bits per byte")
            ax.set_title(corpus, fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=6)
    budget = results["budget"]
    fig.suptitle(f"moelab bench quality: equal {budget['kind']} ({budget['value']}), {results['dtype']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, png(fig, dpi=100))
