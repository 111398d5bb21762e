"""Training checkpoints: everything needed to continue a run exactly, written so a kill never leaves
one that loads but is wrong.

A training checkpoint is a model checkpoint (`moelab/checkpoint.py`: config.yaml, model.safetensors,
tokenizer/, COMPLETE) plus
    train_state.safetensors  optimizer moments (`optim/<param name>/<key>`), RNG states, and any tensor
                             inside the data sampler state
    train_state.json         step, counters, optimizer param groups and scalars, Python RNG state,
                             data sampler state, the open metrics window; tensors referenced by key
    MANIFEST.json            size and sha256 of every other file
Optimizer state is keyed by parameter name, not position (the layout `torch.distributed.checkpoint`
uses), so it survives a change of wrapping. No pickle anywhere.

Safety: the directory is written under a temporary name, fsynced, then renamed (`atomic_dir`), so a
kill during the write leaves a `.step_*.tmp-*` directory that nothing loads and the next run deletes.
The manifest catches what atomicity cannot: a file truncated or altered afterwards. `find_resumable`
walks checkpoints newest first and skips, with a warning, any that fail verification or loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelab.checkpoint import atomic_dir, list_checkpoints, write_model
from moelab.fileio import remove_dir, remove_stale, sibling, warn

FORMAT = 1
MANIFEST = "MANIFEST.json"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
BEST = "best"
# Test hook: seconds to sleep in the middle of writing a checkpoint, so a test can SIGKILL the writer there.
SLEEP_ENV = "MOELAB_TEST_CHECKPOINT_SLEEP"


class BadCheckpoint(Exception):
    """A checkpoint that must not be resumed from (the message says why)."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


# ----------------------------------------------------------------------------------------------------
# Nested state <-> (JSON, tensors)


def split_tensors(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """A JSON-ready copy of `obj` with every tensor / ndarray moved into `tensors` under `prefix/...`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind == "u" else obj).contiguous()
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {str(k): split_tensors(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def join_tensors(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------
# RNG and optimizer state


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {param name: {key: value}}, "param_groups": [...with "params": [names]]}."""
    sd = optimizer.state_dict()
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    groups = []
    for g in sd["param_groups"]:
        groups.append(
            {k: v for k, v in g.items() if k not in ("params", "param_names")}
            | {"params": [names[i] for i in g["params"]]}
        )
    return {"state": {names[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    saved = [n for g in state["param_groups"] for n in g["params"]]
    if saved != names:
        missing = sorted(set(names) - set(saved))[:3]
        extra = sorted(set(saved) - set(names))[:3]
        raise BadCheckpoint(f"optimizer parameters differ from the model's (missing {missing}, unexpected {extra})")
    sd = optimizer.state_dict()
    index = {n: i for i, n in enumerate(names)}
    sd["state"] = {index[n]: dict(s) for n, s in state["state"].items()}
    optimizer.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------
# Writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, "COMPLETE"))
    entries = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (root / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": entries}, indent=1), encoding="utf-8")


def save_train_checkpoint(
    path: Path,
    model: torch.nn.Module,
    cfg,
    tokenizer_dir: Path | None,
    optimizer: torch.optim.Optimizer,
    state: dict,
    weights: dict | None = None,
    optim_state: dict | None = None,
) -> Path:
    """Atomically write model + training state. `state` is any nested JSON-ish dict (tensors allowed).
    `weights` / `optim_state`: full state already gathered from a sharded model (moelab.parallel)."""
    tensors: dict[str, torch.Tensor] = {}
    opt = optim_state if optim_state is not None else optimizer_state(optimizer)
    meta = {
        "format": FORMAT,
        **split_tensors(state, "state", tensors),
        "optimizer": split_tensors(opt, "optim", tensors),
    }

    def write(tmp: Path) -> None:
        write_model(tmp, model, cfg, tokenizer_dir, weights=weights)
        sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
        if sleep:
            time.sleep(sleep)
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
        (tmp / STATE_JSON).write_text(json.dumps(meta), encoding="utf-8")
        write_manifest(tmp)

    return atomic_dir(path, write)


def set_best(run_dir: Path, ckpt: Path) -> None:
    """Point RUN/checkpoints/best at `ckpt` (a relative symlink, replaced atomically)."""
    link = Path(run_dir) / "checkpoints" / BEST
    tmp = sibling(link, "tmp")
    os.symlink(ckpt.name, tmp)
    os.replace(tmp, link)


def best_target(run_dir: Path) -> Path | None:
    link = Path(run_dir) / "checkpoints" / BEST
    return link.parent / os.readlink(link) if link.is_symlink() else None


def _step(p: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", p.name)
    return int(m.group(1)) if m else -1


def rotate(run_dir: Path, keep_last: int, current: Path | None = None) -> None:
    """Delete all but the newest `keep_last` step checkpoints up to `current` (the one just written), never
    `current` itself nor the one `best` points at. Checkpoints numbered after `current` are left out of the
    count: they can only be unusable leftovers of an abandoned future, and must not push good ones out.
    Each is renamed away before it is deleted, so a kill never leaves half a checkpoint."""
    best = best_target(run_dir)
    steps = [p for p in list_checkpoints(run_dir) if not p.is_symlink() and p.name.startswith("step_")]
    if current is not None:
        steps = [p for p in steps if _step(p) <= _step(current)]
    for old in steps[:-keep_last] if keep_last else steps:
        if (best is None or old.name != best.name) and (current is None or old.name != current.name):
            remove_dir(old)


def set_aside(ckpt: Path, why: str) -> Path:
    """Move an unusable checkpoint out of the way (hidden `.step_X.bad`, never listed nor loaded) so it can
    neither be resumed from nor count in rotation; kept, not deleted, so it can be inspected."""
    dest = ckpt.with_name(f".{ckpt.name}.bad")
    if dest.exists():
        remove_dir(dest)
    os.replace(ckpt, dest)
    warn(f"moved unusable checkpoint {ckpt} to {dest.name} ({why})")
    return dest


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete what killed checkpoint writers left: temporaries of writes and of deletions (rotation)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    removed = remove_stale(ck)
    for p in ck.iterdir():  # written by moelab before fileio: `.step_X.tmp-RANDOM` from tempfile.mkdtemp
        if re.fullmatch(r"\.step_\d+\.(tmp|old)-[^-]+", p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------
# Reading


def verify(ckpt: Path) -> None:
    """Raise BadCheckpoint unless every file the manifest lists is present with its size and hash."""
    man = ckpt / MANIFEST
    if not man.is_file():
        raise BadCheckpoint("no MANIFEST.json (not a training checkpoint, or written before it was complete)")
    try:
        files = json.loads(man.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise BadCheckpoint("MANIFEST.json is unreadable") from None
    for rel in (STATE_TENSORS, STATE_JSON, "model.safetensors"):
        if rel not in files:
            raise BadCheckpoint(f"{rel} is not in the manifest")
    for rel, want in files.items():
        f = ckpt / rel
        if not f.is_file():
            raise BadCheckpoint(f"{rel} is missing")
        if f.stat().st_size != want["bytes"]:
            raise BadCheckpoint(f"{rel} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)")
        if _sha256(f) != want["sha256"]:
            raise BadCheckpoint(f"{rel} does not match its sha256 in the manifest (corrupted)")


def read_train_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(model weights, training state, name-keyed optimizer state) of a verified checkpoint."""
    verify(ckpt)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
        tensors = load_file(str(ckpt / STATE_TENSORS))
        meta = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as e:
        raise BadCheckpoint(f"cannot read ({str(e).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise BadCheckpoint(f"train_state.json format {meta.get('format')!r}, this moelab reads {FORMAT}")
    optim = join_tensors(meta.pop("optimizer"), tensors)
    meta.pop("format")
    state = join_tensors(meta, tensors)
    m = re.fullmatch(r"step_(\d+)", ckpt.name)
    if m and int(m.group(1)) != state.get("step"):
        raise BadCheckpoint(f"directory name says step {int(m.group(1))}, train_state.json says {state.get('step')}")
    return weights, state, optim


def training_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, newest first."""
    return [p for p in reversed(list_checkpoints(run_dir)) if p.name.startswith("step_") and not p.is_symlink()]


@dataclass
class TrainProgress:
    """Where a run is, saved in every checkpoint and restored as a whole on resume (the field names are
    train_state.json's keys)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    elapsed_s: float = 0.0  # seconds spent in training steps (eval and checkpoint writes excluded)
    skipped: int = 0  # steps skipped for non-finite values
    bad_in_row: int = 0
    best_val_loss: float | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, st: dict) -> TrainProgress:
        return cls(**{f.name: st[f.name] for f in dataclasses.fields(cls)})
