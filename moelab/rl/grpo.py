"""GRPO fine-tuning with routing replay: `rl_train(RLConfig) -> RLResult`.

One step:
  prompts (a pure function of seed and step) -> G samples each from the continuous-batching engine,
  recording every token's routing and the drawn tokens' log-probs (the behaviour policy)
  -> rewards -> advantages (reward - group mean) / (group std + eps)
  -> teacher-forced forward of prompt + completion, with the rollout's routing forced (replay) or the
     router choosing afresh -> clipped policy loss on completion tokens + kl_coef * KL(policy || ref)
     (k3 estimator) + the MoE aux losses -> one AdamW step.
The importance ratio is taken against the rollout's own log-probs, so every difference between the
policy that sampled and the policy that is trained -- the routing mismatch replay removes included --
shows up in it (and in the clip fraction). Telemetry per step: reward, KL, clip fraction, and the share
of (token, MoE layer) pairs whose training-time expert set differs from the rollout's
(`rl/routing_mismatch`, drops included; 0 with replay) and whose router's own top-k choice differs
from the rollout's choice (`rl/router_drift`, capacity drops ignored: how far replay's forced routing
is from what the current router would pick).

The policy is any module with the Transformer's forward; parameters that do not require grad are not
trained, so a LoRA-wrapped model (base frozen) plugs in through `RLTrainer(model=...)`.
Checkpoints are `moelab train`'s (train/state.py): model + optimizer + RNG + counters, atomic, verified
on resume; rollouts are seeded by (seed, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moelab.errors import UserError
from moelab.infer.generate import generate
from moelab.model.dynamic_losses import config_coefs, total_loss
from moelab.rl import tasks
from moelab.train import state
from moelab.train.telemetry import MetricsLog


@dataclass
class RLConfig:
    init_from: str  # checkpoint or run directory of the base model (its tokenizer comes along)
    run_dir: str
    task: str | None = "arithmetic"  # built-in prompts + exact-match reward (tasks.TASKS)
    reward: str | None = None  # module:function, reward(prompt, completion) -> float (overrides exact match)
    prompts_file: str | None = None  # one prompt per line, instead of a task's prompts
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8  # samples per prompt (G)
    max_new_tokens: int = 8
    temperature: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.02  # 0 = no reference model
    replay: bool = True  # force the rollout's routing in the training forward
    replay_weights: str = "recompute"  # recompute (the router learns) | fixed (the rollout's gate weights)
    epochs: int = 1  # policy updates per batch of rollouts (the ratio leaves 1 from the second on)
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 25
    keep_last: int = 2
    eval_prompts: int = 0  # held-out greedy exact match on this many prompts (seed + 10**6) at the end
    max_batch: int = 64  # rows the engine decodes together
    threads: int | None = None

    def validate(self) -> RLConfig:
        bad = [
            (n, v)
            for n, v in [
                ("steps", self.steps),
                ("prompts_per_step", self.prompts_per_step),
                ("group_size", self.group_size),
                ("max_new_tokens", self.max_new_tokens),
                ("epochs", self.epochs),
                ("max_batch", self.max_batch),
            ]
            if v < 1
        ]
        if bad:
            raise UserError(f"--{bad[0][0].replace('_', '-')}: expected >= 1, got {bad[0][1]}")
        if self.group_size < 2:
            raise UserError("--group-size: expected >= 2 (advantages are relative to the group)")
        if self.replay_weights not in ("recompute", "fixed"):
            raise UserError(f"--replay-weights: expected recompute or fixed, got {self.replay_weights!r}")
        if self.task is None and self.prompts_file is None:
            raise UserError("give --task or --prompts-file (with --reward)")
        if self.task is None and self.reward is None:
            raise UserError("--prompts-file needs --reward module:function (there is no answer to match)")
        if self.lr <= 0 or self.clip_eps <= 0 or self.kl_coef < 0 or self.temperature <= 0:
            raise UserError("--lr, --clip-eps, --temperature: expected > 0; --kl-coef: expected >= 0")
        return self


@dataclass
class RLResult:
    run_dir: Path
    step: int
    last_record: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)


def rl_train(cfg: RLConfig, resume: bool = False, model=None) -> RLResult:
    return RLTrainer(cfg, resume=resume, model=model).run()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(target) per position, logits [B, S, V] at `temperature` -> [B, S] fp32."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets[..., None])[..., 0]


def routing_mismatch(
    used: torch.Tensor, rollout: torch.Tensor, valid: torch.Tensor, choice_only: bool = False
) -> torch.Tensor:
    """Share of valid (token, layer) pairs whose expert set differs. used/rollout [B, S, L, K] encoded
    ids: a dropped assignment counts as a different expert, unless `choice_only` (compare what the
    routers chose, whatever capacity then dropped); valid [B, S] bool."""
    if choice_only:
        used, rollout = torch.where(used < 0, -1 - used, used), torch.where(rollout < 0, -1 - rollout, rollout)
    same = (used.sort(-1).values == rollout.sort(-1).values).all(-1)  # [B, S, L]
    n = valid.sum() * used.shape[2]
    return (~same & valid[..., None]).sum() / n.clamp_min(1)


class RLTrainer:
    def __init__(self, cfg: RLConfig, resume: bool = False, model=None):
        from moelab.checkpoint import load_model, resolve_checkpoint
        from moelab.tokenizer import Tokenizer

        self.cfg = cfg.validate()
        self.run_dir = Path(cfg.run_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            from moelab import determinism

            determinism.enable("cpu")
        ckpt = resolve_checkpoint(cfg.init_from)
        base, self.model_cfg, _ = load_model(ckpt)
        self.tokenizer_dir = ckpt / "tokenizer"
        if not self.tokenizer_dir.is_dir():
            raise UserError(f"{ckpt}: no tokenizer/ directory; RL needs it to turn text into tokens")
        self.tok = Tokenizer.load(self.tokenizer_dir)
        if not base.moe_layers and cfg.replay:
            raise UserError(f"{ckpt}: the model has no MoE layers; run with --no-replay")
        self.model = model if model is not None else base
        self.ref = None
        if cfg.kl_coef > 0:
            self.ref = copy.deepcopy(base).eval().requires_grad_(False)
        self.reward_fn = tasks.load_reward(cfg.reward) if cfg.reward else None
        self.file_prompts = self._read_prompts(Path(cfg.prompts_file)) if cfg.prompts_file else None
        params = [p for p in self.model.parameters() if p.requires_grad]  # a LoRA model: the adapters only
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": params, "param_names": names}], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
        )
        self.params = params
        self.step, self.elapsed = 0, 0.0
        self.resume = resume

    # ------------------------------------------------------------------------------------------ setup
    def _read_prompts(self, path: Path) -> list[str]:
        if not path.is_file():
            raise UserError(f"--prompts-file {path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        out = [json.loads(x)["prompt"] if path.suffix == ".jsonl" else x for x in lines if x.strip()]
        if not out:
            raise UserError(f"--prompts-file {path}: no prompts")
        return out

    def _start(self) -> None:
        ckpts = state.training_checkpoints(self.run_dir) if self.resume else []
        ck = self.run_dir / "checkpoints"
        if not self.resume and ck.is_dir() and any(ck.iterdir()):
            raise UserError(f"{self.run_dir}: already holds a run; use --resume to continue it or another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state.remove_partial(self.run_dir)
        (self.run_dir / "rl_config.json").write_text(json.dumps(asdict(self.cfg), indent=1), encoding="utf-8")
        for ckpt in ckpts:
            try:
                weights, st, optim = state.read_train_state(ckpt)
                state.load_optimizer_state(self.optimizer, optim)
            except state.BadCheckpoint as e:
                state.warn(f"skipping checkpoint {ckpt}: {e}")
                continue
            self.model.load_state_dict(weights, strict=False)
            self.step, self.elapsed = int(st["step"]), float(st["elapsed_s"])
            state.set_rng_state(st["rng"], torch.device("cpu"))
            return
        if self.resume:
            state.warn(f"{self.run_dir}: no usable checkpoint to resume from; starting from step 0")

    def _save(self) -> None:
        st = {
            "step": self.step,
            "elapsed_s": self.elapsed,
            "rng": state.rng_state(torch.device("cpu")),
            "rl_config": asdict(self.cfg),
        }
        path = state.step_dir(self.run_dir, self.step)
        state.save_train_checkpoint(path, self.model, self.model_cfg, self.tokenizer_dir, self.optimizer, st)
        state.rotate(self.run_dir, self.cfg.keep_last)

    # ------------------------------------------------------------------------------------------ data
    def prompts_at(self, step: int) -> list[tuple[str, str | None]]:
        n, seed = self.cfg.prompts_per_step, self.cfg.seed * 1_000_003 + step
        if self.file_prompts is not None:
            import random

            rng = random.Random(seed)
            return [(rng.choice(self.file_prompts), None) for _ in range(n)]
        return tasks.task_prompts(self.cfg.task, seed, n)

    def reward(self, prompt: str, answer: str | None, completion: str) -> float:
        if self.reward_fn is not None:
            return tasks.check_reward(self.cfg.reward, self.reward_fn, prompt, completion)
        return tasks.exact_match(answer, completion)

    def rollout(self, step: int):
        pairs = self.prompts_at(step)
        g = self.cfg.group_size
        prompts = [p for p, _ in pairs for _ in range(g)]
        outs = generate(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            seed=self.cfg.seed * 7919 + step * len(prompts),
            max_batch=self.cfg.max_batch,
            return_routing=True,
            return_logits="logprobs",
            deterministic=self.cfg.deterministic,
        )
        rewards = torch.tensor([self.reward(*pairs[i // g], o.text) for i, o in enumerate(outs)])
        return outs, rewards

    @staticmethod
    def advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
        r = rewards.view(-1, group)
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)

    def batch(self, outs):
        """Right-padded tensors: idx, mask, targets' loss mask, old logprobs, rollout routing [B, S, L, K]."""
        seqs = [o.prompt_ids + o.token_ids for o in outs]
        b, s = len(seqs), max(len(q) for q in seqs)
        pad = self.tok.eod_id
        idx = torch.full((b, s), pad, dtype=torch.long)
        mask = torch.zeros(b, s, dtype=torch.long)
        loss_mask = torch.zeros(b, s - 1)
        old = torch.zeros(b, s - 1)
        lk = outs[0].routing.shape[1:]
        routing = torch.zeros(b, s, *lk, dtype=torch.long)
        recorded = torch.zeros(b, s, dtype=torch.bool)
        for i, (q, o) in enumerate(zip(seqs, outs, strict=True)):
            p, n, r = len(o.prompt_ids), len(o.token_ids), o.routing.shape[0]
            idx[i, : len(q)] = torch.tensor(q)
            mask[i, : len(q)] = 1
            loss_mask[i, p - 1 : p - 1 + n] = 1  # position t predicts token t+1
            old[i, p - 1 : p - 1 + n] = torch.tensor(o.logprobs)
            routing[i, :r] = o.routing
            routing[i, r:] = o.routing[r - 1]  # the last token (never fed at rollout) and padding: any valid ids
            recorded[i, :r] = True
        return idx, mask, loss_mask, old, routing, recorded

    # ------------------------------------------------------------------------------------------ loop
    def _forward(self, model, idx, mask, routing, weights):
        if self.cfg.replay:
            return model(idx, mask=mask, routing=routing, routing_weights=weights)
        return model(idx, mask=mask)

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 104729 + self.step)  # noise routers' draws: a function of the step
        outs, rewards = self.rollout(self.step)
        adv = self.advantages(rewards, cfg.group_size)
        idx, mask, loss_mask, old, routing, recorded = self.batch(outs)
        weights = None
        if cfg.replay and cfg.replay_weights == "fixed":
            weights = torch.zeros(routing.shape)
            for i, o in enumerate(outs):
                weights[i, : o.routing_weights.shape[0]] = o.routing_weights
        targets = idx[:, 1:]
        ntok = loss_mask.sum().clamp_min(1)
        ref_lp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_lp = token_logprobs(
                    self._forward(self.ref, idx, mask, routing, weights).logits[:, :-1], targets, cfg.temperature
                )
        layers = list(model.moe_layers.values())
        for layer in layers:
            layer.record_routing = True
        model.train()
        rec = {}
        try:
            for _ in range(cfg.epochs):
                out = self._forward(model, idx, mask, routing, weights)
                lp = token_logprobs(out.logits[:, :-1], targets, cfg.temperature)
                ratio = torch.exp((lp - old) * loss_mask)  # 1 off the completion tokens: no overflow there
                a = adv[:, None]
                pg = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
                loss = (pg * loss_mask).sum() / ntok
                kl = torch.zeros(())
                if ref_lp is not None:
                    d = (ref_lp - lp) * loss_mask
                    kl = ((torch.exp(d) - d - 1) * loss_mask).sum() / ntok
                    loss = loss + cfg.kl_coef * kl
                if out.aux_losses:
                    loss = total_loss(loss, out.aux_losses, config_coefs(self.model_cfg.model.moe, out.aux_losses))
                if not torch.isfinite(loss):
                    raise UserError(
                        f"step {self.step + 1}: non-finite RL loss; lower --lr (the last checkpoint is intact)"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                self.optimizer.step()
            with torch.no_grad():
                used = torch.stack([m.recorded.ids.view(*idx.shape, -1) for m in layers], 2)
                natural = torch.stack([m.recorded.natural.view(*idx.shape, -1) for m in layers], 2)
                valid = recorded & mask.bool()
                clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
                rec = {
                    "rl/reward": float(rewards.mean()),
                    "rl/reward_std": float(rewards.std()),
                    "rl/loss": float(loss),
                    "rl/kl": float(kl),
                    "rl/clip_fraction": float((clipped * loss_mask).sum() / ntok),
                    "rl/ratio_mean": float((ratio * loss_mask).sum() / ntok),
                    "rl/routing_mismatch": float(routing_mismatch(used, routing, valid)) if layers else 0.0,
                    "rl/router_drift": float(routing_mismatch(natural, routing, valid, True)) if layers else 0.0,
                    "rl/completion_tokens": float(loss_mask.sum() / len(outs)),
                    "grad_norm": float(gnorm),
                }
        finally:
            for layer in layers:
                layer.record_routing, layer.recorded = False, None
        self.step += 1
        dt = time.perf_counter() - t0
        self.elapsed += dt
        rec.update({"step": self.step, "elapsed_s": self.elapsed, "step_s": dt})
        return rec

    @torch.no_grad()
    def evaluate(self, n: int) -> dict:
        """Greedy exact match on n held-out prompts (seed + 10**6: never a training step's)."""
        if self.cfg.task is None or n <= 0:
            return {}
        pairs = tasks.task_prompts(self.cfg.task, self.cfg.seed + 10**6, n)
        texts = generate(
            self.model,
            self.tok,
            [p for p, _ in pairs],
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=0,
            max_batch=self.cfg.max_batch,
        )
        return {"eval/exact_match": sum(tasks.exact_match(a, t) for (_, a), t in zip(pairs, texts, strict=True)) / n}

    def run(self) -> RLResult:
        self._start()
        metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        metrics.truncate_after(self.step)
        last: dict = {}
        saved = self.step
        try:
            while self.step < self.cfg.steps:
                last = self.train_step()
                metrics.write(last)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self._save()
                    saved = self.step
        except UserError:  # a bad reward, a non-finite loss: keep every finished step, then say what went wrong
            if self.step > saved:
                self._save()
            raise
        finally:
            metrics.close()
        ev = self.evaluate(self.cfg.eval_prompts)
        if ev:
            (self.run_dir / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
        return RLResult(self.run_dir, self.step, last, ev)
