"""`moelab plan CONFIG --devices N --device-memory 80GiB`: what fits where, before you start."""

from __future__ import annotations

import json

from moelab.config import load_config
from moelab.errors import UserError
from moelab.model.counting import DTYPE_BYTES
from moelab.plan import OFFLOADS, human_bytes, parse_bytes, plan

NAME = "plan"
HELP = "estimate per-device memory for training and inference, and the largest micro-batch that fits"
DESCRIPTION = (
    "Per-device memory from a config alone: weights, gradients, AdamW state, activations (with and "
    "without activation checkpointing), FSDP working set and the step's peak for training; weights, "
    "expert cache and KV cache for inference. The activation model is moelab's own (see "
    "docs/scale-out.md) and is checked against measured peaks on CPU."
)


def add_arguments(p):
    p.add_argument("config", help="YAML config file (e.g. configs/moe-100b.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )
    p.add_argument("--devices", type=int, default=1, help="number of devices (world size, default 1)")
    p.add_argument("--device-memory", required=True, help="memory per device, e.g. 80GiB, 24GB, 512MiB")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(DTYPE_BYTES),
        help="weights/activations dtype (default bfloat16; fp32 master weights are added for training)",
    )
    p.add_argument(
        "--offload",
        default="none",
        choices=OFFLOADS,
        help="keep AdamW state (optimizer) or routed experts (experts) in host memory / on disk",
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="plan training with activation checkpointing (both are always shown)",
    )
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default parallel.ep)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per device per micro-batch (default train.batch_size / devices)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default data.seq_len)")
    p.add_argument("--batch", type=int, default=1, help="inference: concurrent sequences (default 1)")
    p.add_argument("--context", type=int, default=None, help="inference: context length (default max_seq_len)")
    p.add_argument(
        "--expert-cache",
        type=int,
        default=None,
        help="inference with --offload experts: experts kept on the device (default one layer's)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name}: expected >= 1, got {value}")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    for name in ("--devices", "--micro-batch", "--seq-len", "--batch", "--context", "--ep", "--expert-cache"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    ep = args.ep if args.ep is not None else cfg.parallel.ep
    micro = args.micro_batch or max(1, cfg.train.batch_size // args.devices)
    result = plan(
        cfg.model,
        devices=args.devices,
        device_memory=parse_bytes(args.device_memory),
        dtype=args.dtype,
        offload=args.offload,
        activation_checkpointing=args.activation_checkpointing,
        micro_batch=micro,
        seq_len=args.seq_len or cfg.data.seq_len,
        ep=ep,
        grad_accum=cfg.train.grad_accum,
        batch=args.batch,
        context=args.context,
        expert_cache=args.expert_cache,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _print(result)
    return 0


def _print(r) -> None:
    t, i, hb = r.train, r.inference, human_bytes
    print(
        f"{r.params_total / 1e9:.2f}B parameters ({r.params_active / 1e9:.2f}B active), dtype {r.dtype}, "
        f"{r.devices} device(s) of {hb(r.device_memory)} (dp={r.dp}, ep={r.ep}), offload: {r.offload}"
    )
    print(f"\ntraining, per device, micro-batch {t.micro_batch} x {r.seq_len} tokens:")
    rows = [
        ("weights", t.weights),
        ("gradients", t.grads),
        ("optimizer state (AdamW)", t.optimizer),
        ("activations", t.activations),
        ("activations, checkpointed", t.activations_checkpointed),
        ("FSDP / streaming working set", t.fsdp_working_set),
        ("host memory (offload)", t.host),
    ]
    for name, value in rows:
        print(f"  {name:32s} {hb(value):>12s}")
    ck = "with" if r.activation_checkpointing else "without"
    print(f"  {'peak (' + ck + ' checkpointing)':32s} {hb(t.peak):>12s}   {'fits' if r.train_fits else 'does NOT fit'}")
    print(
        f"  largest micro-batch that fits: {r.max_micro_batch} (no checkpointing), "
        f"{r.max_micro_batch_checkpointed} (checkpointing)"
    )
    print(f"\ninference, {i.batch} sequence(s) x {i.context} tokens:")
    rows = [
        ("weights on device", i.weights),
        ("expert cache on device", i.expert_cache),
        ("KV cache", i.kv_cache),
        ("activations", i.activations),
        ("total on device", i.total),
        ("experts in host memory / on disk", i.host_or_disk),
    ]
    for name, value in rows:
        print(f"  {name:32s} {hb(value):>12s}")
    print(
        f"  KV cache per token: {hb(i.kv_cache_per_token)}; {'fits' if r.inference_fits else 'does NOT fit'}; "
        f"longest context that fits: {r.max_context:,} tokens"
    )
    for note in r.notes:
        print(f"note: {note}")
