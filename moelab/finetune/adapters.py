"""Adapter checkpoints: a LoRA run saves only its adapters plus a reference to its base.

A LoRA run's checkpoint is an ordinary (training) checkpoint whose `model.safetensors` holds only the
trainable tensors (`*.lora_*`, and the router gates when `router` is a target), and whose config.yaml
names the base in `finetune.base` (absolute path of the base checkpoint directory) and
`finetune.base_fingerprint` (sha256 of the base's model.safetensors). Loading one loads the base,
checks the fingerprint (a changed or different base is refused, by path), adds the LoRA modules and
loads the adapters. `load_model` merges them, so every consumer of a plain model (generate, serve,
export, analyze) works on an adapter run; `load_adapter_model(merge=False)` keeps them separate.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.checkpoint import check_base, fingerprint, load_adapter_model  # noqa: F401  (public here too)
from moelab.errors import UserError
from moelab.finetune.config import FinetuneConfig
from moelab.finetune.lora import apply_finetune, parameter_counts, trainable_names


class TrainerFinetune:
    """What the trainer needs from fine-tuning: which tensors a checkpoint holds, and loading them."""

    def __init__(self, cfg: FinetuneConfig, keys: list[str] | None, counts: dict):
        self.cfg, self.keys, self.counts = cfg, keys, counts

    @property
    def adapter_only(self) -> bool:
        return self.keys is not None

    def own_state(self, state: dict) -> dict:
        """The part of a model state dict a checkpoint of this run holds. An empty state stays empty:
        that is what ranks other than 0 get from gathering a sharded model (only rank 0 writes)."""
        if self.keys is None or not state:  # (not adapter_only)
            return state
        return {k: state[k].detach().contiguous() for k in self.keys}

    def load(self, model: torch.nn.Module, weights: dict) -> bool:
        """Load adapter-only weights (True), or leave full weights to the trainer (False). Sharded models
        (expert parallel, FSDP) take the full adapter tensors and keep their own shards."""
        if not self.adapter_only:
            return False
        from moelab.parallel.state import load_full_model_state

        load_full_model_state(model, weights, strict=False)  # keys were checked by the trainer against own_state
        return True


def setup_trainer(trainer, init_from: str | Path | None) -> TrainerFinetune:
    """Called by the trainer once its model is built (and loaded from --init-from): for a LoRA run,
    load the base (on resume, or from `finetune.base` without --init-from), pin its path and
    fingerprint in the config, add adapters; for every mode, freeze what does not train."""
    cfg = trainer.cfg
    ft = cfg.finetune
    if ft.mode == "all":
        return TrainerFinetune(ft, None, parameter_counts(trainer.model))
    if ft.is_lora:
        if trainer.resume:  # the base pinned by the run, whatever the resuming config says
            from moelab.train.rundir import read_run_config

            saved = read_run_config(trainer.run_dir).finetune
            ft.base, ft.base_fingerprint = saved.base, saved.base_fingerprint
            init_from = None
        base = check_base(
            str(init_from) if init_from else ft.base,
            None if init_from else ft.base_fingerprint,
            f"run {trainer.run_dir}",
        )
        if init_from is None:
            trainer._init_from(base)
        ft.base, ft.base_fingerprint = str(base.resolve()), fingerprint(base)
    counts = apply_finetune(trainer.model, ft)
    keys = trainable_names(trainer.model) if ft.is_lora else None
    return TrainerFinetune(ft, keys, counts)


def merge_run(run: str | Path, out: str | Path) -> Path:
    """`moelab merge RUN OUT`: a plain checkpoint with the adapters folded into the base weights."""
    from moelab.checkpoint import read_config, resolve_checkpoint, save_checkpoint

    ckpt = resolve_checkpoint(run)
    cfg = read_config(ckpt)
    if not cfg.finetune.is_lora:
        raise UserError(
            f"{ckpt}: not a LoRA run (finetune.mode={cfg.finetune.mode}); its checkpoint is already a plain model"
        )
    model, merged_cfg, _ = load_adapter_model(ckpt, cfg, merge=True)
    tok = ckpt / "tokenizer"
    return save_checkpoint(
        out,
        model,
        merged_cfg,
        tok if tok.is_dir() else None,
        extra={"merged_from": str(ckpt.resolve()), "base": cfg.finetune.base},
    )
