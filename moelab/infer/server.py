"""The HTTP layer: an OpenAI-compatible FastAPI app over the continuous-batching engine.

Routes: POST /v1/completions and /v1/chat/completions (`chat.py`; JSON or server-sent events),
GET /v1/models[/{id}], GET /health,
GET /metrics (Prometheus text). The app only validates, tokenizes, submits to the `Engine` and
relays its events; every error leaves as an OpenAI-style JSON body with a 4xx/5xx status (counted in
/metrics as requests{status="http_NNN"}), and a client that goes away has its requests cancelled so
their rows are freed.

Size before work: a body over `max_body_bytes` is refused with 413 from its Content-Length before it is
read (a chunked one as soon as it grows past the limit), and prompts are tokenized in a worker thread,
so a huge prompt never holds up the event loop that streams to every other client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelab.errors import UserError
from moelab.infer.http import (
    DEFAULT_MAX_BODY_BYTES,
    RETRY_AFTER_S,
    BodyLimit,
    ClientWatch,
    raise_if_failed,
    read_json_body,
)
from moelab.infer.metrics import ServerMetrics
from moelab.infer.protocol import (
    APIError,
    CompletionRequest,
    choice,
    completion_body,
    model_card,
    new_id,
    parse_completion_request,
    usage,
)
from moelab.infer.sampling import SamplingParams, wrap_seed
from moelab.infer.scheduler import Engine, Event

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
EMPTY_KEY = "--api-key: empty (an unset variable?); pass a key, or leave the option out to serve without one"


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    adapters: dict[str, int] | None = None,
) -> FastAPI:
    """The app; its lifespan starts the engine thread and shuts it down. `adapters`: LoRA adapter name ->
    slot of the engine's model (`moelab serve BASE --adapter name=RUN`), chosen by a request's `model`."""
    if api_key == "":
        raise UserError(EMPTY_KEY)
    metrics = ServerMetrics(engine)
    created = int(time.time())
    slots = {model_name: 0, **(adapters or {})}

    def slot_of(name: str) -> int:
        if name not in slots:
            served = ", ".join(f"`{n}`" for n in slots)
            raise APIError(
                404,
                f"The model `{name}` does not exist (this server serves {served}).",
                param="model",
                code="model_not_found",
            )
        return slots[name]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.alive:
            engine.start()
        yield
        engine.close()

    app = FastAPI(title="moelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(BodyLimit, limit=max_body_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.rejected(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        metrics.rejected(exc.status_code)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug: still an OpenAI-shaped, counted 500
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        metrics.rejected(500)
        err = APIError(500, f"internal server error ({type(exc).__name__})", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header or scheme.lower() != "bearer":
            raise APIError(401, "You didn't provide an API key (Authorization: Bearer KEY).", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(name, engine.max_len, created) for name in slots]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id not in slots:
            raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return model_card(model_id, engine.max_len, created)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await read_json_body(request, max_body_bytes)
        if body is None:  # the client hung up mid-body: nobody to answer, nothing to log
            metrics.rejected(499)
            return Response(status_code=499)
        req = parse_completion_request(body)
        slot = slot_of(req.model)
        if req.return_routing and not (engine.record_routing and not req.stream):
            why = "streaming" if engine.record_routing else "this server (start it with --record-routing)"
            raise APIError(400, f"return_routing is not available with {why}", param="return_routing")
        if engine.num_waiting + req.n * len(req.prompts) > max_queue:  # before tokenizing: no work when full
            raise APIError(
                429,
                f"server overloaded: {engine.num_waiting} requests already waiting",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        jobs = await asyncio.to_thread(_jobs, engine, req)  # tokenizing a long prompt must not stall the loop
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event) -> None:  # engine thread
            if ev.finish_reason is not None:
                metrics.finished(ev.request)
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            handles = [engine.submit(ids, params, on_event, adapter=slot) for ids, params, _ in jobs]
        except RuntimeError:
            raise APIError(503, "server is shutting down", type="server_error") from None
        rid, echo = new_id(), [e for _, _, e in jobs]
        if req.stream:
            return StreamingResponse(
                _sse(request, engine, handles, events, rid, req.model, echo, req, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        body = await _collect(request, engine, handles, events, rid, req.model, echo)
        if req.return_routing and isinstance(body, dict):
            for c, h in zip(body["choices"], handles, strict=True):
                c["moelab_routing"] = {
                    "ids": torch.cat(h.routing).tolist() if h.routing else [],
                    "weights": torch.cat(h.routing_weights).tolist() if h.routing else [],
                }
        return body

    from moelab.infer.chat import add_chat_route

    add_chat_route(app, engine, authorize, slot_of, metrics, max_queue, max_body_bytes)  # /v1/chat/completions
    return app


def _jobs(engine: Engine, req: CompletionRequest) -> list[tuple[list[int], SamplingParams, str | None]]:
    """(prompt ids, sampling params, echo text) per choice, all checked before anything is submitted."""
    tok = engine.tokenizer
    jobs = []
    for p_index, prompt in enumerate(req.prompts):
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
            text = prompt
        else:
            ids = list(prompt)
            text = None
        if not ids:  # OpenAI starts an empty prompt from <|endoftext|>
            if engine.eod_id is None:
                raise APIError(400, "prompt: empty, and the tokenizer has no end-of-document token", param="prompt")
            ids = [engine.eod_id]
        room = engine.max_len - len(ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else max(1, min(DEFAULT_MAX_TOKENS, room))
        for j in range(req.n):
            seed = None if req.seed is None else wrap_seed(req.seed + p_index * req.n + j)
            params = SamplingParams(
                max_tokens,
                1.0 if req.temperature is None else req.temperature,
                None if req.top_k in (None, -1, 0) else req.top_k,
                None if req.top_p is None or req.top_p >= 1 else req.top_p,
                seed,
                req.stop_list,
            )
            try:
                params.validate("request")
                engine.check(ids, params)
            except UserError as e:
                param = "max_tokens" if str(e).startswith("max_tokens") else "prompt"
                raise APIError(
                    400, str(e), param=param, code="context_length_exceeded" if "context" in str(e) else None
                ) from None
            if req.echo and text is None:
                text = tok.decode(ids)
            jobs.append((ids, params, text if req.echo else ""))
    return jobs


async def _collect(request, engine, handles, events, rid, model_name, echo) -> dict | Response:
    watch = ClientWatch(request, engine, handles, events)
    try:
        while not all(h.done for h in handles):
            if await watch.next() is None:
                return Response(status_code=499)  # nobody is listening
    finally:
        for h in handles:
            if not h.done:
                engine.cancel(h)
    raise_if_failed(handles)
    choices = [choice(i, echo[i] + h.text, h.finish_reason) for i, h in enumerate(handles)]
    return completion_body(
        rid,
        int(time.time()),
        model_name,
        choices,
        usage(sum(len(h.prompt_ids) for h in handles), sum(len(h.output_ids) for h in handles)),
    )


async def _sse(request, engine, handles, events, rid, model_name, echo, req: CompletionRequest, metrics=None):
    created = int(time.time())
    index = {id(h): i for i, h in enumerate(handles)}

    def chunk(choices: list[dict], use: dict | None = None) -> str:
        return f"data: {json.dumps(completion_body(rid, created, model_name, choices, use))}\n\n"

    watch = ClientWatch(request, engine, handles, events)
    try:
        for i, text in enumerate(echo):
            if text:
                yield chunk([choice(i, text, None)])
        # Loop on the events received, not on `h.done`: the engine thread marks a request done before
        # its last event (with the last text) reaches this task, so `h.done` would drop that text.
        unfinished = set(index.values())
        while unfinished:
            ev = await watch.next()
            if ev is None:
                return
            # Events that piled up while this task waited go out as one chunk per choice: when the
            # server falls behind, fewer and larger chunks instead of a backlog of tiny writes.
            pending = [ev]
            while not events.empty():
                pending.append(events.get_nowait())
            merged: dict[int, list] = {}
            for e in pending:
                if e.finish_reason == "error":
                    err = APIError(500, e.request.error or "generation failed", type="server_error")
                    if metrics is not None:
                        metrics.rejected(500)
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                m = merged.setdefault(index[id(e.request)], ["", None])
                m[0] += e.text
                m[1] = e.finish_reason or m[1]
                if e.finish_reason is not None:
                    unfinished.discard(index[id(e.request)])
            # A chunk per step even when its text is held back (half a character, a possible stop
            # string): clients see progress, and time to first token means what it says.
            for i, (text, reason) in sorted(merged.items()):
                yield chunk([choice(i, text, reason)])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage(sum(len(h.prompt_ids) for h in handles), sum(len(h.output_ids) for h in handles)))
        yield "data: [DONE]\n\n"
    finally:  # also runs when the client disconnects and the response task is cancelled
        for h in handles:
            if not h.done:
                engine.cancel(h)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = any free port; read it back with sock.getsockname()[1])."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, sock: socket.socket, log_level: str = "warning"):
    """A uvicorn server for `app` on an already bound socket; run it with server.run(sockets=[sock])."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level=log_level, access_log=log_level in ("info", "debug"), timeout_graceful_shutdown=5
    )
    return uvicorn.Server(config)
