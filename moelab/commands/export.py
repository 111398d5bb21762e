"""`moelab export hf|gguf RUN OUT`: write a run or checkpoint for transformers or llama.cpp."""

from __future__ import annotations

import re

from moelab.errors import UserError

NAME = "export"
HELP = "export a run/checkpoint as a Hugging Face model directory or a GGUF file for llama.cpp"
DESCRIPTION = (
    "Every export proves itself before anything is written: the files are read back (bit-equal weights) "
    "and, when transformers (hf) or llama-cpp-python (gguf) is installed, run side by side with moelab."
)
ARCH_CHOICES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama")


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text.upper())
    if not m:
        raise UserError(f"--max-shard-size: expected a size like 500MB or 5GB, got {text!r}")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def add_arguments(p):
    sub = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = sub.add_parser(
        "hf",
        help="config.json + safetensors that transformers loads",
        description="Write a Hugging Face model directory (AutoModelForCausalLM.from_pretrained).",
    )
    hf.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    hf.add_argument("out_dir", help="output directory (must not exist or be empty)")
    hf.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default=None,
        help="target architecture (default: the first that expresses the model exactly)",
    )
    hf.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weight dtype on disk (default float32)",
    )
    hf.add_argument("--max-shard-size", default="5GB", help="split weights into shards of this size (default 5GB)")
    _common(hf)
    gg = sub.add_parser(
        "gguf",
        help="one .gguf file that llama.cpp runs",
        description="Write a GGUF file (llama.cpp) with the tokenizer embedded.",
    )
    gg.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    gg.add_argument("out_file", help="output .gguf file")
    gg.add_argument(
        "--dtype",
        choices=("f32", "f16", "q8_0"),
        default="f32",
        help="weight type of the matrices (norms and routers stay f32; default f32)",
    )
    _common(gg)


def _common(p):
    p.add_argument("--no-check", action="store_true", help="skip the side-by-side logit check")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max |delta logit| allowed, relative to max(1, max |logit|) (default: hf 1e-3; "
        "gguf f32 1e-4, f16 1e-2, q8_0 0.15)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args) -> int:
    if args.format == "hf":
        from moelab.interop.hf import export_hf
        from moelab.interop.parity import DEFAULT_TOLERANCE

        res = export_hf(
            args.run,
            args.out_dir,
            arch=args.arch,
            dtype=args.dtype,
            check=not args.no_check,
            tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
            overwrite=args.overwrite,
            max_shard_bytes=_size(args.max_shard_size),
        )
        print(f"exported {args.run} as {res.arch} -> {res.out}")
    else:
        from moelab.interop.gguf import export_gguf

        res = export_gguf(
            args.run,
            args.out_file,
            dtype=args.dtype,
            check=not args.no_check,
            tolerance=args.tolerance,
            overwrite=args.overwrite,
        )
        print(f"exported {args.run} as GGUF ({res.arch}, {args.dtype}) -> {res.out}")
    if res.report is not None:
        print(res.report.line("llama.cpp" if args.format == "gguf" else "transformers"))
    for note in res.notes:
        print(f"note: {note}")
    return 0
