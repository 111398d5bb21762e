"""Model checkpoints on disk: safetensors weights + the resolved YAML config, written atomically.

A checkpoint directory holds:
    config.yaml           the full resolved `Config` (model section rebuilds the architecture)
    model.safetensors     weights (tied LM head stored once, under embed.weight)
    tokenizer/            copy of the tokenizer directory, when one is known
    COMPLETE              written last: a directory without it is an interrupted write
A run directory holds `checkpoints/step_XXXXXXX/` checkpoints; `resolve_checkpoint` picks one.

Writes go through `moelab.fileio.write_dir_atomic` (hidden temporary sibling, fsync, rename), so a
reader never sees a half-written checkpoint under its final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelab.config import Config, from_dict
from moelab.errors import UserError
from moelab.fileio import write_dir_atomic

COMPLETE = "COMPLETE"
TOKENIZER_FP = "tokenizer_fingerprint"  # key in info.yaml and train_state.json


def atomic_dir(final: Path, write: Callable[[Path], None], overwrite: bool = True, marker: str | None = None) -> Path:
    """Call write(tmp_dir), mark it complete and move it into place atomically (`fileio.write_dir_atomic`).
    By default `final` is a name the caller owns (a checkpoint step) and whatever is there is replaced; a
    user-named output passes `overwrite` and `marker=COMPLETE` (replace only what moelab wrote)."""

    def write_complete(tmp: Path) -> None:
        write(tmp)
        (tmp / COMPLETE).write_text("ok\n")

    return write_dir_atomic(Path(final), write_complete, overwrite, marker, empty_ok=marker is not None)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen[key] = name
        state[name] = t.detach().contiguous()
    return state


def write_model(
    path: Path,
    model: torch.nn.Module,
    cfg: Config,
    tokenizer_dir: str | Path | None = None,
    extra: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write weights, config and tokenizer into an existing directory (no atomicity here). `weights`
    replaces `model`'s own state (e.g. full tensors gathered from a sharded model)."""
    path = Path(path)
    state = weights if weights is not None else model_state(model)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), encoding="utf-8")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, path / "tokenizer", dirs_exist_ok=True)
        fp = tokenizer_fingerprint(path / "tokenizer")
        if fp is not None:  # recorded outside tokenizer/, so a tokenizer swapped in later is caught at load
            extra = {**(extra or {}), TOKENIZER_FP: fp}
    if extra:
        (path / "info.yaml").write_text(yaml.safe_dump(extra, sort_keys=False), encoding="utf-8")


def tokenizer_fingerprint(tok_dir: Path) -> str | None:
    try:
        fp = json.loads((Path(tok_dir) / "tokenizer.json").read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return fp if isinstance(fp, str) else None


def trained_tokenizer(ckpt: Path) -> str | None:
    """The fingerprint of the tokenizer the model was trained or imported with, when the checkpoint says."""
    for name, read in (("info.yaml", yaml.safe_load), ("train_state.json", json.loads)):
        try:
            fp = read((ckpt / name).read_text(encoding="utf-8")).get(TOKENIZER_FP)
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if isinstance(fp, str):
            return fp
    return None


def check_tokenizer(ckpt: Path, tokenizer) -> None:
    """Refuse a tokenizer other than the one the model was trained with (its ids would mean other text)."""
    want = trained_tokenizer(ckpt)
    if want is not None and want != tokenizer.fingerprint:
        raise UserError(
            f"{ckpt}/tokenizer: tokenizer {tokenizer.fingerprint[:12]} ({tokenizer.kind}, vocab "
            f"{tokenizer.vocab_size}) is not the one the model was trained with ({want[:12]}); "
            "restore the checkpoint's own tokenizer/"
        )


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    cfg: Config,
    tokenizer_dir: str | Path | None = None,
    extra: dict | None = None,
) -> Path:
    """Atomically write a model checkpoint directory."""
    return atomic_dir(Path(path), lambda tmp: write_model(tmp, model, cfg, tokenizer_dir, extra))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step number in the name)."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    # symlinks (RUN/checkpoints/best) name a checkpoint already listed under its own name
    found = [
        p for p in ck.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and is_complete(p)
    ]
    return sorted(found, key=lambda p: (int("".join(c for c in p.name if c.isdigit()) or 0), p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, or the newest complete checkpoint of a run dir (`best` if linked)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint directory")
    if is_complete(path):
        return path
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return path  # hand-made or imported checkpoint without the COMPLETE marker
    found = list_checkpoints(path)
    if not found:
        raise UserError(
            f"{path}: no complete checkpoint found (expected model.safetensors + config.yaml, "
            "or a run directory with checkpoints/)"
        )
    return found[-1]


def read_config(ckpt: Path) -> Config:
    from moelab.config import read_yaml

    return from_dict(Config, read_yaml(ckpt / "config.yaml"), source=str(ckpt / "config.yaml"))


def load_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: cannot read safetensors ({str(e).splitlines()[0]})") from None


def state_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into a model whose state dict is `own` (missing or unexpected
    names, shape mismatches), or None. The one key check every loader uses."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return None
    parts = [
        f"missing {missing[:3]}" if missing else "",
        f"unexpected {unexpected[:3]}" if unexpected else "",
        f"shape mismatches {shapes[:3]}" if shapes else "",
    ]
    return ", ".join(p for p in parts if p)


def own_state_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state dict as a checkpoint stores it: a tied LM head is stored once, as the embedding."""
    own = dict(model.state_dict())
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        own.pop("lm_head.weight", None)
    return own


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checked `state` into a model built on the meta device: the tensors become the parameters
    (no copy), in the model's own dtypes (a bf16 file gives an fp32 model, as a copying load would), and a
    tied LM head is tied again."""
    own = model.state_dict()
    state = {
        k: v.to(own[k].dtype) if v.is_floating_point() and v.dtype != own[k].dtype else v for k, v in state.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        model.lm_head.weight = model.embed.weight


def build_model(
    cfg: Config, state: dict[str, torch.Tensor], device: str | torch.device = "cpu", where: str = "weights", swap=None
):
    """A `Transformer` of `cfg.model` holding `state`: built on the meta device (no memory, no random
    init of weights that are about to be replaced) and loaded with `assign=True`. `swap(model)` may
    replace modules before loading (offloaded experts). Raises UserError naming what does not fit."""
    from moelab.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
    if swap is not None:
        swap(model)
    problems = state_problems(own_state_names(model), state)
    if problems:
        raise UserError(f"{where}: weights do not match config.yaml ({problems})")
    assign_state(model, state)
    model.init_buffers("cpu")  # (then moved with the rest: `device` may itself be meta, in tests)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer init_buffers does not know: a bug, not bad input
        raise RuntimeError(f"build_model: {left[:3]} not loaded and not rebuilt by init_buffers()")
    return model.to(device)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, Config, checkpoint dir) from a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    if cfg.finetune.is_lora:  # adapters over a base: loaded and merged (see moelab/finetune/adapters.py)
        return load_adapter_model(ckpt, cfg, device)
    state = load_state(ckpt / "model.safetensors")
    return build_model(cfg, state, device, str(ckpt / "model.safetensors")).eval(), cfg, ckpt


# ----------------------------------------------------------------------------------------------------
# LoRA runs: adapter checkpoints over a base (written by moelab/finetune/adapters.py)


def fingerprint(ckpt: Path) -> str:
    """sha256 of a checkpoint's model.safetensors (streamed)."""
    h = hashlib.sha256()
    with open(Path(ckpt) / "model.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_base(base: str | None, expected: str | None, what: str) -> Path:
    """The base checkpoint directory, verified against the fingerprint the adapters were trained on."""
    if not base:
        raise UserError(f"{what}: finetune.mode=lora needs a base model (--init-from BASE or finetune.base)")
    if not Path(base).exists():
        raise UserError(f"{what}: base checkpoint {base} not found (the adapters need the model they were trained on)")
    ckpt = resolve_checkpoint(base)
    fp = fingerprint(ckpt)
    if expected and fp != expected:
        raise UserError(
            f"{what}: base checkpoint {ckpt} is not the one the adapters were trained on "
            f"(fingerprint {fp[:12]}, expected {expected[:12]}); refusing to load"
        )
    return ckpt


def load_adapter_model(ckpt: Path, cfg, device="cpu", merge: bool = True):
    """(model, cfg, ckpt) for an adapter checkpoint: base + adapters, merged unless merge=False."""
    from moelab.finetune.config import FinetuneConfig
    from moelab.finetune.lora import apply_finetune, merge_lora, trainable_names

    base = check_base(cfg.finetune.base, cfg.finetune.base_fingerprint, f"adapter checkpoint {ckpt}")
    model, base_cfg, _ = load_model(base, "cpu")  # a base is a plain checkpoint
    if dataclasses.asdict(base_cfg.model) != dataclasses.asdict(cfg.model):
        raise UserError(f"adapter checkpoint {ckpt}: base {base} has a different model config than the adapters")
    apply_finetune(model, cfg.finetune)
    weights = load_state(ckpt / "model.safetensors")
    want = set(trainable_names(model))
    if set(weights) != want:
        raise UserError(
            f"{ckpt / 'model.safetensors'}: adapter tensors do not match finetune.lora "
            f"(missing {sorted(want - set(weights))[:3]}, unexpected {sorted(set(weights) - want)[:3]})"
        )
    model.load_state_dict(weights, strict=False)
    if merge:
        merge_lora(model)
        cfg = dataclasses.replace(cfg, finetune=FinetuneConfig())
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(device).eval(), cfg, ckpt
