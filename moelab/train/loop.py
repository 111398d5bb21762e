"""The training loop: `train(config, run_dir=None, resume=False, init_from=None)`.

One optimizer step:
    schedules (lr, gumbel tau, top-k, aux coefficients) for this step
    grad_accum x [batch -> forward under autocast -> loss = ce + sum coef * aux -> backward(loss / accum)]
    unscale (fp16) -> grad norm + clip -> non-finite? skip : optimizer step -> aux-free bias update
then, on their own cadences: a metrics record, validation, a checkpoint. Everything a step depends on
(weights, AdamW moments, RNG states, the data sampler position, the open metrics window, counters) is in
the checkpoint, and the schedules are functions of the step, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.checkpoint import own_state_names, state_problems
from moelab.config import load_config
from moelab.device import check_on_device, resolve_device, use_device
from moelab.errors import UserError
from moelab.fileio import pause_for_test, warn
from moelab.grow import grow_trainer
from moelab.model import Transformer
from moelab.parallel import (
    clip_grad_norm_,
    gather_train_state,
    grad_norm,
    init_parallel,
    load_full_model_state,
    load_full_optimizer_state,
    parallelize,
)
from moelab.parallel.compute import compile_blocks, enable_activation_checkpointing
from moelab.train import rundir, schedules, state
from moelab.train.data_source import open_source
from moelab.train.optim import build_optimizer, lr_at, set_lr
from moelab.train.state import TrainProgress
from moelab.train.telemetry import (
    MetricsLog,
    Progress,
    StepFlops,
    TensorBoard,
    Window,
    _sync,
    measure_matmul_peak,
    merge_micro,
    mfu_fields,
    peak_memory_bytes,
    step_values,
)


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None  # the last checkpoint written
    best_checkpoint: Path | None
    last_record: dict
    skipped_steps: int


def train(
    config,
    run_dir: str | Path | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    overrides=(),
    progress: bool | None = None,
    data=None,
    restart: bool = False,
) -> TrainResult:
    """Train a model from `config` (a Config, a dict or a YAML path, plus `--set`-style overrides) into
    `run_dir` (default runs/<config name>). `resume` continues the newest usable checkpoint of run_dir;
    `init_from` starts a new run from a checkpoint's weights; `restart` first deletes the run already in
    run_dir (checkpoints, metrics, config). `data` replaces the dataset at data.path
    with another source (see data_source.py), e.g. tokens in memory. Returns where things were written."""
    return Trainer(
        config,
        run_dir,
        resume=resume,
        init_from=init_from,
        overrides=overrides,
        progress=progress,
        data=data,
        restart=restart,
    ).run()


class Trainer:
    def __init__(
        self,
        config,
        run_dir=None,
        *,
        resume=False,
        init_from=None,
        overrides=(),
        progress=None,
        data=None,
        restart=False,
    ):
        cfg = load_config(config, overrides)
        name = Path(config).stem if isinstance(config, (str, Path)) else None
        if resume and run_dir is None and name is None:
            raise UserError("--resume needs --run-dir (or a config file whose name gives runs/<name>)")
        self.run_dir = Path(run_dir) if run_dir is not None else rundir.default_run_dir(name)
        cfg = rundir.absolute_data_path(cfg)
        self.cfg = cfg = rundir.prepare_run_dir(cfg, self.run_dir, resume, restart)
        self.resume, self.init_from, self.restart = resume, init_from, restart
        self.show_progress = cfg.log.progress if progress is None else progress

        # torchrun's environment (one process without it); mesh sizes are checked before any work
        self.par = init_parallel(cfg.parallel, cfg.model, cfg.train.device)
        self.device = self.par.device if self.par.distributed else resolve_device(cfg.train.device)
        use_device(self.device)  # cuda:N: streams, generators and compiled kernels go to the same device
        if cfg.train.deterministic:
            from moelab import determinism

            determinism.enable(self.device)
        self.rows = self.par.local_batch(cfg.train.batch_size)  # this rank's slice of each global batch
        self.is_main = self.par.is_main  # only rank 0 writes the run directory
        self.show_progress = self.show_progress and self.is_main
        self.dtype = getattr(torch, cfg.train.dtype)
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise UserError(
                "train.dtype: float16 training needs CUDA (it relies on a GradScaler); on CPU use bfloat16 or float32"
            )
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

        self.data = data if data is not None else open_source(cfg)
        if cfg.model.vocab_size < self.data.vocab_size:
            raise UserError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset's tokenizer "
                f"vocabulary ({self.data.vocab_size}); set model.vocab_size >= {self.data.vocab_size}"
            )
        self.data.check_token_ids(cfg.model.vocab_size)  # before anything is written (else an IndexError mid-run)
        self.multitask = bool(cfg.model.moe.num_tasks) and hasattr(self.data, "train")
        if self.multitask:  # task (source) ids for the routers, from meta.json's per-source ranges
            from moelab.train.task_ids import attach_tasks

            attach_tasks(self.data, cfg.model.moe.num_tasks)

        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        if init_from is not None:
            self._init_from(Path(init_from))
        from moelab.finetune.adapters import setup_trainer

        self.finetune = setup_trainer(self, init_from)  # freezes / adds LoRA per `finetune:` (docs/finetune.md)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.model = parallelize(self.model, self.par)  # FSDP2 + expert parallel under torchrun, else a no-op
        if not self.par.distributed:
            check_on_device(self.model, self.device, "the trainer's model")
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.train.compile:
            compile_blocks(self.model, self.device, self.dtype)

        self.tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        self.progress = TrainProgress()
        self.window = Window()
        self.last_ckpt: Path | None = None
        self.step_flops = StepFlops(cfg)
        self.base_experts = (cfg.model.moe.num_experts, cfg.model.moe.num_null_experts)  # grow_at changes these

    # ------------------------------------------------------------------------------------------------
    # Setup

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

    # ------------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.resume:
            self._resume()
        else:
            self._start_new()
        stated = cfg.train.peak_flops
        self.peak = stated if stated is not None else measure_matmul_peak(cfg.train.dtype, str(self.device))
        self._peak_rechecked = cfg.train.peak_flops is not None  # a stated peak is not re-measured
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        if self.is_main:
            metrics.truncate_after(self.progress.step)
        tb = TensorBoard(
            self.run_dir / "tb",
            cfg.log.tensorboard and self.is_main,
            purge_step=self.progress.step + 1 if self.resume else None,
        )
        bar = Progress(cfg.train.steps, self.progress.step, self.show_progress)
        last: dict = {}
        stop, finished = None, False
        try:
            while self.progress.step < cfg.train.steps and stop is None:
                self.train_step()
                bar.update()
                if cfg.train.max_seconds is not None and self.progress.elapsed_s >= cfg.train.max_seconds:
                    stop = "max_seconds"
                if cfg.train.budget_seconds is not None and self.progress.elapsed_s >= cfg.train.budget_seconds:
                    stop = "budget_seconds"
                end = self.progress.step >= cfg.train.steps or stop is not None
                do_ckpt = end or (cfg.checkpoint.every and self.progress.step % cfg.checkpoint.every == 0)
                do_eval = (
                    end
                    or (cfg.eval.every and self.progress.step % cfg.eval.every == 0)
                    or (do_ckpt and cfg.checkpoint.keep_best)
                )
                val = self._evaluate() if do_eval else {}
                if do_eval or self.progress.step % cfg.log.every == 0:
                    last = self._record(val, stop)
                    if self.is_main:
                        metrics.write(last)
                        tb.write(last)
                        bar.record(last)
                if do_ckpt:
                    self._save(val.get("val/loss"))
            finished = True
        finally:
            bar.close()
            metrics.close()
            tb.close()
            self.par.close(finished)
        best = state.best_target(self.run_dir)
        return TrainResult(self.run_dir, self.progress.step, self.last_ckpt, best, last, self.progress.skipped)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (`progress.step`)."""
        return self.progress.step

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self) -> None:
        """One optimizer step (all micro-batches), its counters and telemetry; no eval, log or checkpoint
        (`run` does those around it). Public so benchmarks and tests time exactly what training runs."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        t0 = time.perf_counter()
        if self.progress.step in cfg.schedule.grow_at:
            grow_trainer(self)
            model, opt = self.model, self.optimizer
        sched = schedules.at_step(self.progress.step, cfg)
        schedules.apply(model, sched, cfg)
        if cfg.schedule.grow_at:  # k' = 2k right after a growth, annealed back (moelab/grow.py)
            from moelab.grow import anneal_top_k

            s = cfg.schedule
            sched.top_k = anneal_top_k(self.progress.step, sched.top_k, 2.0, s.grow_at, s.grow_anneal_steps)
            model.set_router_attr("top_k", sched.top_k)
        lr = lr_at(self.progress.step, cfg.train, self.progress.elapsed_s)
        set_lr(opt, lr)
        accum = cfg.train.grad_accum
        acc: dict[str, torch.Tensor] = {}
        counts: dict[int, torch.Tensor] = {}  # layer -> kept assignments per expert, all micro-batches
        for _ in range(accum):
            x, y = self.data.train_batch(self.device)
            x, y = x[self.rows], y[self.rows]
            tasks = self.data.tasks(self.device)[self.rows] if self.multitask else None
            with self._autocast():
                out = model(x, y, return_logits=False, tasks=tasks, aux_coefs=sched.coefs)
            loss = out.loss
            for i, st in out.routing.items():  # this step's loads, for the aux-loss-free bias update
                counts[i] = st.tokens_per_expert if i not in counts else counts[i] + st.tokens_per_expert
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            merge_micro(acc, step_values(out.ce_loss, out.aux_losses, loss, out.routing), 1.0 / accum)
        acc = self.par.mean_tensors(acc)  # per-rank slices -> the global batch's values
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if cfg.train.grad_clip > 0:
            gnorm = clip_grad_norm_(self.params, cfg.train.grad_clip)
        else:
            gnorm = grad_norm(self.params)
        loss_ok = bool(torch.isfinite(acc["train/loss"]))
        ok = loss_ok and bool(torch.isfinite(gnorm))
        if ok:
            (self.scaler.step(opt) if self.scaler is not None else opt.step())
            if schedules.uses_bias_update(cfg):  # counts already summed over ranks (`MoELayer.batch`)
                schedules.update_router_bias(model, counts, cfg.model.moe.bias_update_rate)
            self.progress.bad_in_row = 0
        else:
            if self.scaler is not None:
                self.scaler.step(opt)  # sees the inf gradients and skips; update() lowers the scale
            self.progress.skipped += 1
            self.window.skipped += 1
            # fp16 overflows are the GradScaler's business; a non-finite loss is the model's
            self.progress.bad_in_row += 1 if (self.scaler is None or not loss_ok) else 0
        if self.scaler is not None:
            self.scaler.update()
        opt.zero_grad(set_to_none=True)
        if ok:
            acc["grad_norm"] = gnorm.detach()
            self.window.add({k: v for k, v in acc.items()})
        flops = self.tokens_per_step * self.step_flops.for_step(sched.top_k, acc)
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        self.progress.flops += flops
        self.lr = lr
        self.sched = sched
        _sync(self.device)  # CUDA runs ahead of the host: the step's time is the device's
        dt = time.perf_counter() - t0
        self.progress.elapsed_s += dt
        self.window.seconds += dt
        self.window.tokens += self.tokens_per_step
        self.window.flops += flops
        if not ok:
            what = "loss" if not loss_ok else "gradient norm"
            warn(f"step {self.progress.step}: non-finite {what}; step skipped ({self.progress.skipped} skipped so far)")
            if self.progress.bad_in_row >= cfg.train.max_bad_steps:
                hint = f"resume from {self.last_ckpt} with a lower train.lr" if self.last_ckpt else "lower train.lr"
                raise TrainingDiverged(
                    f"training diverged: {self.progress.bad_in_row} non-finite steps in a row (train.max_bad_steps="
                    f"{cfg.train.max_bad_steps}) at step {self.progress.step}; {hint}, keep train.grad_clip > 0, "
                    "or train in float32"
                )

    @torch.no_grad()
    def _evaluate(self) -> dict:
        """Mean cross-entropy over the same `eval.batches` val batches every time (spread over the whole
        split by the source), and bits per byte: total nats / ln 2 / the text bytes of the targets evaluated
        (`target_bytes`; the split's average bytes per token only for sources without it)."""
        self.model.eval()
        nats, count, nbytes = 0.0, 0, 0.0
        bs = self.cfg.eval.batch_size or self.cfg.train.batch_size
        target_bytes = getattr(self.data, "target_bytes", None)
        for x, y in self.data.val_batches(bs, self.cfg.eval.batches, self.device):
            tasks = self.data.tasks(self.device) if self.multitask else None
            with self._autocast():
                out = self.model(x, y, return_logits=False, tasks=tasks)
            n = int((y != -100).sum())
            nats += float(out.ce_loss) * n
            count += n
            nbytes += target_bytes(y) if target_bytes is not None else n * self.data.bytes_per_token
        self.model.train()
        if count == 0:
            return {}
        return {"val/loss": nats / count, "val/bpb": nats / math.log(2) / nbytes if nbytes > 0 else None}

    def _record(self, val: dict, stop: str | None) -> dict:
        w = self.window
        p = self.progress
        rec = {"step": p.step, "tokens": p.tokens, "elapsed_s": p.elapsed_s, "flops": p.flops}
        rec.update(w.summary())
        if w.steps == 0:  # every step of the window was skipped: say so rather than drop the keys
            rec.update({"train/loss": None, "train/ce_loss": None, "grad_norm": None})
        rec["lr"] = self.lr
        rec["tokens_per_s"] = w.tokens / w.seconds if w.seconds > 0 else None
        rec.update(self._mfu(w.flops, w.seconds))
        rec["peak_mem_bytes"] = peak_memory_bytes(self.device)
        rec["skipped_steps"] = self.progress.skipped
        if self.cfg.schedule.top_k_start is not None:
            rec["top_k"] = self.sched.top_k
        if self.cfg.schedule.gumbel_tau_end is not None:
            rec["gumbel_tau"] = self.sched.tau
        if self.cfg.schedule.aux_coef_steps:
            rec["aux_coef_scale"] = schedules.aux_coef_scale(self.progress.step - 1, self.cfg)
        rec.update(val)
        rec.update(getattr(self, "grow_record", None) or {})
        self.grow_record = None
        if stop:
            rec["stopped"] = stop
        self.window = Window()
        return rec

    def _mfu(self, flops: float, seconds: float) -> dict:
        """MFU of the window: flops count the global batch, so against every rank's peak. A run faster than
        the peak measured at start (a CPU measured while loaded, clocks that rose) re-measures it once and
        keeps the higher; beyond that the MFU is capped at 1 and flagged (see `mfu_fields`). A stated peak of 0
        means no MFU: only the achieved FLOP/s is logged."""
        world = self.par.world_size
        if seconds > 0 and self.peak and flops / seconds > self.peak * world and not self._peak_rechecked:
            self._peak_rechecked = True
            fresh = measure_matmul_peak.__wrapped__(self.cfg.train.dtype, str(self.device))
            self.peak = max(self.peak, fresh)
        return mfu_fields(flops, seconds, self.peak * world)

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
