"""`moelab generate RUN --prompt "..."`: sample from a trained model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moelab.errors import UserError

NAME = "generate"
HELP = "generate text from a run or checkpoint directory"
DESCRIPTION = (
    "Complete one or more prompts with a KV-cached, continuously batched decoder. Prompts come from "
    "--prompt (repeatable) and/or --prompts-file (one prompt per line; .jsonl: one JSON string or "
    '{"prompt": ...} per line).'
)


def add_sampling_arguments(p) -> None:
    """Flags shared with `moelab serve`'s defaults and the benchmarks."""
    p.add_argument(
        "--num-experts-per-tok",
        type=int,
        default=None,
        metavar="K",
        help="route each token to K experts instead of the trained top-k (speed vs quality)",
    )
    p.add_argument(
        "--routing-top-p",
        type=float,
        default=None,
        metavar="P",
        help="top_p routers: probability mass of experts per token instead of the trained moe.top_p",
    )
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="cast the weights (default: as stored)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--warmup", action="store_true", help="run every expert once at load")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile: faster per token after a 10-30 s compile on first use",
    )


def add_arguments(p):
    p.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", type=Path, help="more prompts, one per line (or .jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="prompt i samples with seed + i (reproducible)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--max-batch", type=int, default=None, help="rows decoded together (default: all prompts)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="batch-invariant: each prompt's output is what it gets alone (slower, docs/rl.md)",
    )
    add_sampling_arguments(p)


def read_prompts_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read prompts ({e})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            item = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(item, str):
                raise UserError(f'{path}:{n}: expected a JSON string or an object with a string "prompt"')
            prompts.append(item)
        else:
            prompts.append(line)
    return prompts


def check_device(name: str) -> None:
    """One line for a device this machine cannot use, before minutes of loading."""
    from moelab.device import resolve_device

    resolve_device(name, "--device")


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads: expected >= 1, got {threads}")
        torch.set_num_threads(threads)


def run(args) -> int:
    from moelab.infer.generate import generate, load, stream_generate
    from moelab.infer.sampling import SamplingParams, check_text, wrap_seed

    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise UserError("no prompt given: use --prompt TEXT and/or --prompts-file FILE")
    for p in args.prompt:
        check_text(p, "--prompt")
    SamplingParams(seed=args.seed).validate()  # before loading, not after
    check_device(args.device)
    set_threads(args.threads)
    model, tok = load(args.run, args.device, args.dtype, warmup=args.warmup)
    if getattr(args, "routing_top_p", None) is not None:
        from moelab.model.routers_dynamic import set_routing_top_p

        set_routing_top_p(model, args.routing_top_p)
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=args.stop,
        num_experts_per_tok=args.num_experts_per_tok,
        compile=args.compile,
    )
    if args.stream:
        for i, prompt in enumerate(prompts):
            seed = None if args.seed is None else wrap_seed(args.seed + i)
            if i:
                print("\n" + "-" * 40)
            print(prompt, end="", flush=True)
            for piece in stream_generate(model, tok, prompt, seed=seed, **kw):
                print(piece, end="", flush=True)
            print()
        return 0
    texts = generate(
        model, tok, prompts, seed=args.seed, max_batch=args.max_batch, deterministic=args.deterministic, **kw
    )
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
        else:
            if i:
                print("-" * 40)
            print(prompt + text)
    sys.stdout.flush()
    return 0
