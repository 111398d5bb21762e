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

from moelab.config import load_config
from moelab.device import check_on_device, resolve_device, use_device
from moelab.errors import UserError
from moelab.fileio import warn
from moelab.grow import grow_trainer
from moelab.model import Transformer
from moelab.parallel import (
    clip_grad_norm_,
    grad_norm,
    init_parallel,
    parallelize,
)
from moelab.parallel.compute import compile_blocks, enable_activation_checkpointing
from moelab.train import rundir, schedules, state
from moelab.train.checkpoints import TrainerCheckpoints
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


class Trainer(TrainerCheckpoints):
    """One training run: setup in __init__, the loop in run(); checkpoints in TrainerCheckpoints."""

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
        set_lr(opt, lr, cfg.train.router_lr_scale)
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
