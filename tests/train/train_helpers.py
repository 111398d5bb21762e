"""Plain helpers for the training tests (imported by name: a module called `conftest` would be ambiguous
when several test directories have one)."""

import copy
import json
from pathlib import Path

TINY = {
    "model": {
        "vocab_size": 264,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 64,
        "max_seq_len": 32,
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 32},
    },
    "data": {"seq_len": 32},
    "train": {
        "steps": 12,
        "batch_size": 4,
        "lr": 0.01,
        "min_lr": 0.001,
        "warmup_steps": 2,
        "peak_flops": 1.0e11,
        "seed": 3,
    },
    "eval": {"every": 6, "batches": 2},
    "checkpoint": {"every": 4, "keep_last": 2},
    "log": {"every": 1, "progress": False},
}


def tiny_cfg(data_dir: Path | None = None, **sections) -> dict:
    """TINY with sections merged key by key: tiny_cfg(d, train={"steps": 4})."""
    cfg = copy.deepcopy(TINY)
    for name, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(cfg.get(name, {}).get(key), dict):
                cfg[name][key].update(value)
            else:
                cfg.setdefault(name, {})[key] = value
    if data_dir is not None:
        cfg["data"]["path"] = str(data_dir)
    return cfg


def toy_corpus(root: Path, docs: int = 40) -> Path:
    """Small, very regular code-like documents: a model learns them in a few dozen steps."""
    root.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        lines = [f"def f{d}_{i}(x):\n    return x * {i} + {d}\n" for i in range(30)]
        (root / f"doc{d:03d}.py").write_text("".join(lines))
    return root


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
