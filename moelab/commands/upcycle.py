"""`moelab upcycle DENSE OUT --experts E --top-k K`: a dense model's FFNs copied into MoE experts."""

from __future__ import annotations

NAME = "upcycle"
HELP = "turn a dense model (HF Llama/Qwen2 directory or moelab run) into an MoE checkpoint (sparse upcycling)"
DESCRIPTION = (
    "Each chosen dense FFN is copied into E experts and a router is initialised N(0, init_std). With --noise 0 "
    "the upcycled model computes exactly the dense model's logits (checked). Continue training with "
    "`moelab train CONFIG --init-from OUT`."
)


def add_arguments(p):
    p.add_argument("dense", help="dense HF Llama/Qwen2 directory (config.json + safetensors) or moelab run/checkpoint")
    p.add_argument("out_dir", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--experts", type=int, required=True, metavar="E", help="experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token")
    p.add_argument(
        "--layers",
        default="all",
        metavar="PATTERN",
        help="which FFNs become MoE: all | every:N | first_dense:K | 0,2,5 (default all)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="per-expert Gaussian noise, relative to each weight matrix's std (default 0: exact copies)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the routers and the noise")
    p.add_argument("--no-check", action="store_true", help="skip the transformers parity check of an HF DENSE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    from moelab.interop.upcycle import parse_layers, upcycle

    res = upcycle(
        args.dense,
        args.out_dir,
        experts=args.experts,
        top_k=args.top_k,
        layers=parse_layers(args.layers),
        noise=args.noise,
        seed=args.seed,
        check=not args.no_check,
        overwrite=args.overwrite,
    )
    print(
        f"upcycled {args.dense} -> {args.out_dir}: layers {res['moe_layers']} now have {args.experts} experts, "
        f"top-{args.top_k}"
    )
    print(
        f"max |delta logit| vs the dense model: {res['max_abs_delta']:.3g} (max |logit| {res['max_abs_logit']:.3g})"
        + (" (--noise 0: must be ~0)" if args.noise == 0 else "")
    )
    for note in res["notes"]:
        print(f"note: {note}")
    return 0
