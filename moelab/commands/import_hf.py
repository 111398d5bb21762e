"""`moelab import hf HF_DIR OUT_DIR`: a Hugging Face MoE (or dense) model as a moelab checkpoint.

The module is not called `import.py` because that name cannot be imported; the verb is `import`."""

from __future__ import annotations

NAME = "import"
HELP = "import a Hugging Face model directory (Mixtral, Qwen2/3-MoE, OLMoE, Llama, Qwen2) as a moelab checkpoint"
DESCRIPTION = (
    "Read single-file or sharded safetensors in the per-expert or fused expert layout. Every tensor must be "
    "used exactly once with the shape config.json implies; when transformers is installed both models are run "
    "on random tokens and the import is refused unless their logits agree. The output is an ordinary moelab "
    "checkpoint directory (generate, serve, train --init-from)."
)


def add_arguments(p):
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = sub.add_parser(
        "hf", help="a transformers model directory (config.json + *.safetensors)", description=DESCRIPTION
    )
    hf.add_argument("hf_dir", help="directory with config.json and model.safetensors (or an index + shards)")
    hf.add_argument("out_dir", help="output checkpoint directory (must not exist or be empty)")
    hf.add_argument("--no-check", action="store_true", help="skip the side-by-side logit check")
    hf.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max |delta logit| allowed, relative to max(1, max |logit|) (default 1e-3)",
    )
    hf.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    from moelab.interop.hf import import_hf
    from moelab.interop.parity import DEFAULT_TOLERANCE

    res = import_hf(
        args.hf_dir,
        args.out_dir,
        check=not args.no_check,
        tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
        overwrite=args.overwrite,
    )
    print(f"imported {res.arch} from {args.hf_dir} -> {res.out}")
    if res.report is not None:
        print(res.report.line())
    for note in res.notes:
        print(f"note: {note}")
    return 0
