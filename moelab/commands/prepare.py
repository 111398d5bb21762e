"""`moelab prepare`: tokenize a corpus into train.bin / val.bin / meta.json (see moelab/data/preparation.py)."""

from __future__ import annotations

from pathlib import Path

from moelab.errors import UserError

NAME = "prepare"
HELP = "tokenize a corpus (files, globs, stdlib) into memory-mappable train/val token files"
DESCRIPTION = """Stream the inputs, encode them in worker processes, and write DATA_DIR/train.bin, val.bin
(uint16 when the vocabulary fits, else uint32; <|endoftext|> after every document), meta.json (token counts,
bytes per token, the tokenizer fingerprint, every source file with its token ranges) and a copy of the
tokenizer. Validation is split by document. Memory stays flat whatever the corpus size. Inputs: files,
directories, globs (quoted), or 'stdlib' (the running Python's standard library, without its tests)."""


def add_arguments(p) -> None:
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="tokenizer directory (moelab tokenizer train), or 'byte' for the byte-level tokenizer",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files, directories, globs, or 'stdlib'; .jsonl files hold one document per line",
    )
    p.add_argument("--out", required=True, metavar="DATA_DIR")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="share of documents held out for validation (default 0.05; every (1/F)-th document)",
    )
    p.add_argument(
        "--doc-boundary",
        choices=["file", "line", "blank"],
        default="file",
        help="what a document is in plain-text files: a whole file (default), a line, or a "
        "paragraph between blank lines",
    )
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl files (default text)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="encoding processes (default: one per core; 0 = in this process)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail on binary or non-UTF-8 files (and bad JSONL lines) instead of skipping them",
    )
    p.add_argument(
        "--format",
        choices=["text", "chat"],
        default="text",
        help='text (default): documents; chat: .jsonl conversations ({"messages": [{role, content}]} '
        'or {"prompt", "completion"}) rendered with the tokenizer\'s chat template, one per '
        "row padded to --seq-len, with a loss mask so only assistant tokens train (docs/finetune.md)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=256,
        metavar="N",
        help="chat: tokens per row (= data.seq_len of the fine-tune; longer conversations are bad records)",
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        default=None,
        help="chat: a chat_template.json to use and store with the tokenizer (default: the tokenizer's "
        "own, else <|system|>/<|user|>/<|assistant|> ... <|end|>)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_chat(args) -> int:
    from moelab.data.chat import prepare_chat
    from moelab.data.chat_template import ChatTemplate

    template = ChatTemplate.load(Path(args.chat_template).parent) if args.chat_template else None
    if args.chat_template and Path(args.chat_template).name != "chat_template.json":
        raise UserError(f"--chat-template: expected a file named chat_template.json, got {args.chat_template}")
    meta = prepare_chat(
        args.input,
        args.tokenizer,
        args.out,
        args.seq_len,
        val_fraction=args.val_fraction,
        strict=args.strict,
        overwrite=args.overwrite,
        template=template,
        quiet=args.quiet,
    )
    sp = meta["splits"]
    print(
        f"wrote {args.out}: train {sp['train']['rows']:,} conversations ({sp['train']['trained_tokens']:,} trained "
        f"tokens); val {sp['val']['rows']:,}; {meta['bad_records']} bad record(s) skipped; rows of "
        f"{meta['seq_len'] + 1} tokens"
    )
    return 0


def run(args) -> int:
    from moelab.data.preparation import prepare

    if args.format == "chat":
        return _run_chat(args)

    meta = prepare(
        args.input,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        doc_boundary=args.doc_boundary,
        text_field=args.text_field,
        workers=args.workers,
        strict=args.strict,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    total_bytes = sum(s["bytes"] for s in meta["splits"].values())
    parts = []
    for name, s in meta["splits"].items():
        bpt = f", {s['bytes_per_token']:.2f} bytes/token" if s["tokens"] else ""
        parts.append(f"{name} {s['tokens']:,} tokens ({s['documents']:,} docs{bpt})")
    skipped = f"; skipped {len(meta['skipped_files'])} file(s)" if meta["skipped_files"] else ""
    print(
        f"wrote {args.out}: {'; '.join(parts)}; {meta['dtype']}; {total_bytes / 1e6:.1f} MB of text from "
        f"{len(meta['sources'])} file(s) in {meta['seconds']:.1f} s "
        f"({total_bytes / 1e6 / max(meta['seconds'], 1e-9):.1f} MB/s){skipped}"
    )
    return 0
