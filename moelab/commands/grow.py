"""`moelab grow RUN OUT --experts N`: more experts (split/duplicate) or fewer (prune/merge), with the
val loss measured before and after."""

from __future__ import annotations

import math

NAME = "grow"
HELP = "change the number of experts of a trained model: grow (split with noise) or prune/merge for inference"
DESCRIPTION = (
    "N above the model's E (up to 2E): every expert j < N - E is duplicated with --noise, router rows copied "
    "with opposite offsets so the halves share the load (moelab/grow.py). Routing with k * N / E experts per "
    "token reproduces the old function; the loss is reported at both k and 2k. N below E: --shrink prune keeps "
    "the most used experts, --shrink merge folds the least used into the most similar; the quality cost is "
    "the val loss change. Continue training with `moelab train CONFIG --init-from OUT` (set moe.num_experts=N)."
)


def add_arguments(p):
    p.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("out_dir", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--experts", type=int, required=True, metavar="N", help="experts per MoE layer afterwards")
    p.add_argument("--noise", type=float, default=0.01, help="noise on copies, relative to each tensor's std")
    p.add_argument(
        "--router-noise",
        type=float,
        default=None,
        help="opposite offsets on the copied router rows, relative to their std (default: --noise)",
    )
    p.add_argument(
        "--split-noise",
        type=float,
        default=0.0,
        help="opposite noise on the two halves' expert weights (parent - z, copy + z), relative to each "
        "tensor's std: the halves compute different things, the pair's mean stays the parent (default 0)",
    )
    p.add_argument("--shrink", default="prune", choices=["prune", "merge"], help="how to remove experts")
    p.add_argument("--batches", type=int, default=20, help="val batches for the loss and the usage (default 20)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def val_loss(model, data, batch_size: int, batches: int, usage: dict | None = None) -> float:
    import torch

    nats, count = 0.0, 0
    with torch.no_grad():
        for x, y in data.val_batches(batch_size, batches, torch.device("cpu")):
            out = model(x, y)
            n = int((y != -100).sum())
            nats += float(out.ce_loss) * n
            count += n
            if usage is not None:
                for i, st in out.routing.items():
                    usage[i] = usage.get(i, 0) + st.tokens_per_expert
    return nats / count if count else math.nan


def run(args) -> int:
    from pathlib import Path

    from moelab.checkpoint import COMPLETE, load_model, save_checkpoint
    from moelab.errors import UserError
    from moelab.fileio import check_output_dir
    from moelab.grow import check_growable, grow_model, shrink_model
    from moelab.train.data_source import open_source

    if args.noise < 0 or args.split_noise < 0 or (args.router_noise is not None and args.router_noise < 0):
        raise UserError(
            f"--noise / --router-noise / --split-noise: expected >= 0, got {args.noise} / {args.router_noise} / "
            f"{args.split_noise}"
        )
    out = Path(args.out_dir)
    check_output_dir(out, args.overwrite, COMPLETE, empty_ok=True)
    model, cfg, ckpt = load_model(args.run, "cpu")
    model.eval()
    data = open_source(cfg)
    e, k = cfg.model.moe.num_experts, cfg.model.moe.top_k
    if args.experts == e:
        raise UserError(f"--experts: the model already has {e} experts")
    usage: dict = {}
    before = val_loss(model, data, args.batch_size, args.batches, usage)
    print(f"{ckpt}: {e} experts, top-{k}, val loss {before:.4f}")
    if args.experts > e:
        check_growable(model, args.experts)
        grow_model(model, args.experts, args.noise, args.seed, args.router_noise, args.split_noise)
        after = val_loss(model, data, args.batch_size, args.batches)
        kk = math.ceil(k * args.experts / e)
        model.set_router_attr("top_k", kk)
        after_kk = val_loss(model, data, args.batch_size, args.batches)
        model.set_router_attr("top_k", k)
        print(
            f"grown to {args.experts} experts: val loss {after:.4f} at top-{k} ({100 * (after / before - 1):+.2f}%), "
            f"{after_kk:.4f} at top-{kk} ({100 * (after_kk / before - 1):+.2f}%, the loss-continuous setting)"
        )
    else:
        groups = shrink_model(model, args.experts, usage, args.shrink)
        after = val_loss(model, data, args.batch_size, args.batches)
        print(
            f"{args.shrink} to {args.experts} experts: val loss {after:.4f} ({100 * (after / before - 1):+.2f}% "
            f"quality cost); layer {min(groups)} keeps {groups[min(groups)]}"
        )
    save_checkpoint(out, model, cfg, ckpt / "tokenizer", extra={"grown_from": str(ckpt)})
    print(f"wrote {out}")
    return 0
