"""`moelab rl --init-from RUN --run-dir DIR [--task arithmetic | --prompts-file F --reward mod:fn] ...`."""

from __future__ import annotations

import json
from pathlib import Path

from moelab.errors import UserError

NAME = "rl"
HELP = "GRPO fine-tuning with a programmatic reward and MoE routing replay"
DESCRIPTION = (
    "Reinforcement-learning fine-tuning (GRPO) of a trained model. Each step samples --group-size completions "
    "of --prompts-per-step prompts with the continuous-batching engine, scores them with the reward, normalises "
    "rewards within each prompt's group, and takes a clipped policy-gradient step with a KL penalty to the "
    "starting model. With routing replay (default) the training forward uses exactly the experts each token "
    "used when it was sampled. Built-in tasks need no download and reward exact match: "
    "arithmetic (12+7=19), sorting (sort dcba=abcd), reversal (reverse abc=cba). "
    "--resume continues a run exactly. Metrics (reward, KL, clip fraction, routing mismatch) go to "
    "RUN_DIR/metrics.jsonl. See docs/rl.md."
)


def add_arguments(p):
    p.add_argument("--init-from", metavar="CKPT", help="base model: a run or checkpoint directory (with tokenizer/)")
    p.add_argument("--run-dir", required=True, help="where checkpoints and metrics.jsonl go")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    p.add_argument(
        "--task",
        default=None,
        help="built-in task: arithmetic, sorting or reversal (default arithmetic unless --prompts-file is given)",
    )
    p.add_argument(
        "--reward",
        metavar="MODULE:FUNCTION",
        help="reward(prompt, completion) -> float, imported from MODULE (replaces exact match)",
    )
    p.add_argument("--prompts-file", help='prompts, one per line (or .jsonl with a "prompt" field)')
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (default 8)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="completion length limit (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (default 1.0)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip (default 0.2)")
    p.add_argument(
        "--kl-coef",
        type=float,
        default=0.02,
        help="KL penalty to the base model; 0 = no reference model (default 0.02)",
    )
    p.add_argument("--epochs", type=int, default=1, help="policy updates per batch of rollouts (default 1)")
    p.add_argument("--no-replay", action="store_true", help="let the router choose afresh in training (no replay)")
    p.add_argument(
        "--replay-weights",
        choices=["recompute", "fixed"],
        default="recompute",
        help="gate weights under replay: recompute = the router's rule at the replayed experts (the "
        "router keeps learning; default); fixed = the rollout's weights (router frozen by the loss)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds prompts, sampling and noise (default 0)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="bit-reproducible run: deterministic kernels, batch-invariant rollouts (docs/rl.md)",
    )
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints (default 25)")
    p.add_argument(
        "--eval-prompts",
        type=int,
        default=0,
        help="at the end, greedy exact match on this many held-out task prompts (default 0 = none)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="rows the engine decodes together (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    from moelab.rl.grpo import RLConfig, rl_train

    run_dir = Path(args.run_dir)
    if args.resume:
        saved = run_dir / "rl_config.json"
        if not saved.is_file():
            raise UserError(f"{run_dir}: no rl_config.json, so not an RL run to resume")
        cfg = RLConfig(**json.loads(saved.read_text(encoding="utf-8")))
        cfg.steps = args.steps if args.steps != 50 else cfg.steps  # resume may extend the run
    else:
        if not args.init_from:
            raise UserError("--init-from is required (the model to fine-tune)")
        task = args.task if args.task is not None else (None if args.prompts_file else "arithmetic")
        cfg = RLConfig(
            init_from=args.init_from,
            run_dir=str(run_dir),
            task=task,
            reward=args.reward,
            prompts_file=args.prompts_file,
            steps=args.steps,
            prompts_per_step=args.prompts_per_step,
            group_size=args.group_size,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            lr=args.lr,
            clip_eps=args.clip_eps,
            kl_coef=args.kl_coef,
            replay=not args.no_replay,
            replay_weights=args.replay_weights,
            epochs=args.epochs,
            seed=args.seed,
            deterministic=args.deterministic,
            checkpoint_every=args.checkpoint_every,
            eval_prompts=args.eval_prompts,
            max_batch=args.max_batch,
            threads=args.threads,
        )
    result = rl_train(cfg, resume=args.resume)
    rec = result.last_record
    if rec:
        print(
            f"done: step {result.step}, reward {rec['rl/reward']:.3f}, kl {rec['rl/kl']:.4f}, "
            f"clip fraction {rec['rl/clip_fraction']:.3f}, routing mismatch {rec['rl/routing_mismatch']:.4f}"
        )
    if result.eval:
        print(f"held-out exact match: {result.eval['eval/exact_match']:.3f}")
    print(f"run directory: {result.run_dir}  (metrics.jsonl, checkpoints/)")
    return 0
