"""`moelab serve RUN`: an OpenAI-compatible completions server with continuous batching."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from moelab.commands.generate import add_sampling_arguments, check_device, set_threads
from moelab.errors import UserError

NAME = "serve"
HELP = "serve a model over an OpenAI-compatible HTTP API (/v1/completions)"
DESCRIPTION = (
    "POST /v1/completions (JSON or server-sent events), GET /v1/models, /health, /metrics (Prometheus). "
    "Requests join the running batch at the next decode step. Binds 127.0.0.1 unless told otherwise."
)


def add_arguments(p):
    p.add_argument("run", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429 (default 256)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOELAB_API_KEY, else none)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body accepted; larger ones get 413 before they are read (default 4 MiB)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="serve a LoRA run's adapters over RUN (the base), unmerged, as model NAME (repeatable); "
        "requests choose one with their `model` field and share one continuous batch",
    )
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run directory name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--record-routing",
        action="store_true",
        help='record each request\'s routing so a request may ask for it ("return_routing": true; '
        "RL rollouts, docs/rl.md)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="batch-invariant decoding: a request's tokens and logits do not depend on the other "
        "requests (one sequence per forward; slower, docs/rl.md)",
    )
    add_sampling_arguments(p)  # (--threads defaults to the number of cores minus one here)


def run(args) -> int:
    from moelab.infer.generate import load
    from moelab.infer.scheduler import Engine
    from moelab.infer.server import DEFAULT_MAX_BODY_BYTES, EMPTY_KEY, bind_socket, create_app, make_server

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: expected 0..65535, got {args.port}")
    if args.max_queue < 1:
        raise UserError(f"--max-queue: expected >= 1, got {args.max_queue}")
    if args.api_key == "":  # `--api-key "$KEY"` with KEY unset must not mean "any empty bearer token"
        raise UserError(EMPTY_KEY)
    max_body = DEFAULT_MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes
    if max_body < 1024:
        raise UserError(f"--max-body-bytes: expected >= 1024, got {max_body}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("MOELAB_API_KEY") or None
    check_device(args.device)
    # The engine thread gets every core but one: the HTTP event loop needs one too, and an OpenMP team
    # whose thread lost its core to the event loop spins in barriers (many-fold slower decode steps).
    set_threads(args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) - 1))
    model, tok = load(args.run, args.device, args.dtype)
    if getattr(args, "routing_top_p", None) is not None:
        from moelab.model.routers_dynamic import set_routing_top_p

        set_routing_top_p(model, args.routing_top_p)
    adapters, select = {}, None
    if args.adapter:
        from moelab.checkpoint import resolve_checkpoint
        from moelab.finetune.serving import stack_adapters

        if args.compile:
            raise UserError("--adapter: multi-adapter serving runs eagerly; drop --compile")
        specs = dict(_adapter_spec(a) for a in args.adapter)
        select, adapters = stack_adapters(model, resolve_checkpoint(args.run), specs)
    engine = Engine(
        model,
        tok,
        max_batch=args.max_batch,
        num_experts_per_tok=args.num_experts_per_tok,
        compile=args.compile,
        record_routing=args.record_routing,
        batch_invariant=args.deterministic,
    )
    engine.adapter_select = select
    _chat_template(engine, args.run)
    if args.warmup or args.compile:  # compiling on a request's time would stall every client for seconds
        from moelab.infer.warmup import warmup

        engine.start()  # warmed in its own thread: CUDA graphs belong to the thread that records them
        try:
            info = warmup(model, tok, max_batch=args.max_batch, compile=args.compile, engine=engine)
        except BaseException:
            engine.close()
            raise
        print(
            f"warm-up: {info['experts']} experts{' and the compiled decode step' if args.compile else ''} in "
            f"{info['seconds']:.2f}s",
            file=sys.stderr,
        )
    name = args.model_name or Path(args.run).resolve().name
    try:
        sock = bind_socket(args.host, args.port)
    except BaseException:
        engine.close()  # (started by the warm-up)
        raise
    host, port = sock.getsockname()[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"moelab serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    app = create_app(
        engine, name, api_key=api_key, max_queue=args.max_queue, max_body_bytes=max_body, adapters=adapters
    )
    print(
        f"moelab serve: model {name!r} on http://{host}:{port}/v1 (max batch {args.max_batch})",
        file=sys.stderr,
        flush=True,
    )
    make_server(app, sock, args.log_level).run(sockets=[sock])
    return 0


def _adapter_spec(text: str) -> tuple[str, str]:
    name, sep, run = text.partition("=")
    if not sep or not name or not run:
        raise UserError(f"--adapter: expected NAME=RUN, got {text!r}")
    return name, run


def _chat_template(engine, run) -> None:
    """The chat template stored with the model's tokenizer, for /v1/chat/completions."""
    from moelab.checkpoint import resolve_checkpoint
    from moelab.data.chat_template import ChatTemplate

    engine.chat_template = ChatTemplate.load(resolve_checkpoint(run) / "tokenizer")
