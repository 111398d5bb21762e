"""The trainer's run directory and checkpoints: starting a new run, `--init-from`, resuming from the newest
checkpoint that verifies, and writing a checkpoint. A mixin of `Trainer` (loop.py), which owns the attributes
used here (cfg, model, optimizer, data, progress, window, scaler, par, run_dir).

A checkpoint holds everything a step depends on -- weights, AdamW moments, RNG states, the data sampler
position, the open metrics window, counters -- so a resumed run continues exactly; a run grown mid-training
(`schedule.grow_at`) is re-grown to the checkpoint's expert count before its weights are loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.checkpoint import own_state_names, state_problems
from moelab.errors import UserError
from moelab.fileio import pause_for_test, warn
from moelab.grow import grow_trainer
from moelab.parallel import gather_train_state, load_full_model_state, load_full_optimizer_state
from moelab.train import rundir, state
from moelab.train.state import TrainProgress


class TrainerCheckpoints:
    """Run-directory setup, checkpoint load and save for `Trainer`."""

    def _init_from(self, path: Path) -> None:
        from moelab.checkpoint import load_state, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        self.data.check_tokenizer_dir(ckpt / "tokenizer", f"--init-from {ckpt}")
        weights = load_state(ckpt / "model.safetensors")
        problems = self._weight_problems(weights)
        if problems:
            raise UserError(f"--init-from {ckpt}: weights do not fit this config's model ({problems})")
        self._load_weights(weights)

    def _weight_problems(self, weights: dict[str, torch.Tensor]) -> str | None:
        own = own_state_names(self.model)
        if getattr(self, "finetune", None) is not None:  # a LoRA run's checkpoints hold its adapters only
            own = self.finetune.own_state(own)
        return state_problems(own, weights)

    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if getattr(self, "finetune", None) is not None and self.finetune.load(self.model, weights):
            return
        load_full_model_state(self.model, weights)  # ties the LM head; scatters shards when sharded

    def _start_new(self) -> None:
        if not self.is_main:
            return
        if self.restart:
            rundir.clear_run(self.run_dir)
        # config.yaml last: it is what makes the directory a run, so a kill before it leaves no half-run
        self.data.copy_tokenizer(self.run_dir / "tokenizer")
        rundir.write_run_info(
            self.run_dir, {"init_from": str(self.init_from) if self.init_from else None, "resumed_from": None}
        )
        pause_for_test("run_config")
        rundir.write_config(self.cfg, self.run_dir)

    def _resume(self) -> None:
        """Continue from the newest checkpoint that verifies and loads; never silently start over."""
        if self.is_main:
            state.remove_partial(self.run_dir)
        self.par.barrier()
        self.data.check_tokenizer_dir(self.run_dir / "tokenizer", f"run {self.run_dir}")
        bad: list[tuple[Path, str]] = []
        for ckpt in state.training_checkpoints(self.run_dir):
            try:
                self._load_checkpoint(ckpt)
            except state.BadCheckpoint as e:
                warn(f"skipping checkpoint {ckpt}: {e}")
                bad.append((ckpt, str(e)))
                continue
            self.par.barrier()
            if self.is_main:  # every bad one is newer: set aside so it is neither newest nor counted in rotation
                for b, why in bad:
                    state.set_aside(b, why)
                from moelab.grow import with_experts  # the run's config keeps the experts it starts with

                rundir.write_config(with_experts(self.cfg, *self.base_experts), self.run_dir)  # resume may extend
                # train.steps or change logging
                rundir.write_run_info(self.run_dir, {"init_from": None, "resumed_from": str(ckpt)})
            self.last_ckpt = ckpt
            return
        raise UserError(rundir.no_checkpoint_message(self.run_dir, bad))

    def _load_checkpoint(self, ckpt: Path) -> None:
        weights, st, optim = state.read_train_state(ckpt)
        grown = sum(g < int(st["step"]) for g in self.cfg.schedule.grow_at)  # growths this checkpoint has seen
        while self.cfg.model.moe.num_experts < self.base_experts[0] * 2**grown:
            grow_trainer(self, measure=False)  # structure only: the checkpoint's weights and moments replace it
        problems = self._weight_problems(weights)
        if problems:
            raise state.BadCheckpoint(f"weights do not fit the run's model ({problems})")
        fp = self.data.fingerprint
        if st.get("tokenizer_fingerprint") not in (None, fp):
            raise state.BadCheckpoint("it was trained with a different tokenizer than the dataset's")
        if self.par.distributed:  # name-keyed full state -> this rank's shards
            load_full_optimizer_state(self.model, self.optimizer, optim)
        else:
            state.load_optimizer_state(self.optimizer, optim)  # raises before changing anything on a mismatch
        self._load_weights(weights)
        self.progress = TrainProgress.from_state(st)
        self.window.load_state_dict(st["window"], self.device)
        self.data.load_state_dict(st["data"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        state.set_rng_state(st["rng"], self.device)

    def _save(self, val_loss: float | None) -> None:
        cfg = self.cfg
        st = {
            **self.progress.state_dict(),
            "val_loss": val_loss,
            "tokenizer_fingerprint": self.data.fingerprint,
            "window": self.window.state_dict(),
            "data": self.data.state_dict(),
            "rng": state.rng_state(self.device),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        best = self.progress.best_val_loss
        is_best = val_loss is not None and (best is None or val_loss < best)
        if is_best:
            st["best_val_loss"] = val_loss
        path = state.step_dir(self.run_dir, self.progress.step)
        weights, optim = gather_train_state(self.model, self.optimizer)  # full tensors; collective if sharded
        if self.finetune.adapter_only:
            weights = self.finetune.own_state(weights if weights is not None else self.model.state_dict())
        if self.is_main:
            state.save_train_checkpoint(
                path,
                self.model,
                cfg,
                self.run_dir / "tokenizer",
                self.optimizer,
                st,
                weights=weights,
                optim_state=optim,
            )
            if is_best and cfg.checkpoint.keep_best:
                state.set_best(self.run_dir, path)
            state.rotate(self.run_dir, cfg.checkpoint.keep_last, current=path)
        self.par.barrier()  # no rank runs ahead of a checkpoint it may need to resume from
        if is_best:
            self.progress.best_val_loss = val_loss
        self.last_ckpt = path
