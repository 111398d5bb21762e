"""POST /v1/chat/completions: the chat route of the OpenAI-compatible server.

Messages are rendered with the model's chat template (stored with its tokenizer, `data/chat_template.py`)
up to the assistant marker; generation stops at the template's end-of-turn token (or EOD), at a stop
string or at max_tokens. Sampling, streaming, n, seed and the error bodies are the completions route's
(`server.py`); only the request and response shapes differ ("chat.completion", message / delta).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moelab.data.chat_template import ChatEncoder, ChatTemplate, check_messages
from moelab.errors import UserError
from moelab.infer.http import RETRY_AFTER_S, ClientWatch, raise_if_failed, read_json_body
from moelab.infer.protocol import MAX_STOP, APIError, StreamOptions, usage
from moelab.infer.sampling import SamplingParams, wrap_seed


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[dict]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


def parse_chat_request(body: object) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("list[", "dict[", "str", "none")))
        message = "unrecognized request argument" if err["type"] == "extra_forbidden" else err["msg"]
        raise APIError(400, f"{param}: {message}" if param else message, param=param or None) from None
    try:
        req.messages = check_messages(req.messages)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or not all(stops):
        raise APIError(400, f"stop: expected at most {MAX_STOP} non-empty strings, got {req.stop!r}", param="stop")
    req.stop = stops
    return req


def _encoder(engine) -> ChatEncoder:
    enc = getattr(engine, "chat_encoder", None)
    if enc is None:
        try:
            enc = ChatEncoder(engine.tokenizer, getattr(engine, "chat_template", None) or ChatTemplate())
        except UserError as e:
            raise APIError(400, f"this model has no chat template ({e})", param="messages") from None
        engine.chat_encoder = enc
        engine.stop_ids = engine.stop_ids | enc.stop_ids  # the end-of-turn token ends a generation
    return enc


def _body(rid, created, model, choices, use=None, chunk=False) -> dict:
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if use is not None:
        body["usage"] = use
    return body


def add_chat_route(app, engine, authorize, slot_of, metrics, max_queue: int, max_body_bytes: int) -> None:

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await read_json_body(request, max_body_bytes)
        if body is None:  # the client hung up mid-body
            metrics.rejected(499)
            return Response(status_code=499)
        req = parse_chat_request(body)
        slot = slot_of(req.model)
        if engine.num_waiting + req.n > max_queue:  # before tokenizing: no work when full
            raise APIError(
                429,
                f"server overloaded: {engine.num_waiting} requests already waiting",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        # tokenizing a long conversation must not stall the event loop that streams to everyone else
        ids = await asyncio.to_thread(_encoder(engine).prompt, req.messages)
        room = engine.max_len - len(ids)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, room)
        jobs = []
        for j in range(req.n):
            params = SamplingParams(
                max_tokens,
                1.0 if req.temperature is None else req.temperature,
                None,
                None if req.top_p is None or req.top_p >= 1 else req.top_p,
                None if req.seed is None else wrap_seed(req.seed + j),
                list(req.stop or []),
            )
            try:
                params.validate("request")
                engine.check(ids, params)
            except UserError as e:
                raise APIError(
                    400,
                    str(e),
                    param="max_tokens" if str(e).startswith("max_tokens") else "messages",
                    code="context_length_exceeded" if "context" in str(e) else None,
                ) from None
            jobs.append(params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev) -> None:  # engine thread
            if ev.finish_reason is not None:
                metrics.finished(ev.request)
            loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            handles = [engine.submit(ids, p, on_event, sample_index=j, adapter=slot) for j, p in enumerate(jobs)]
        except RuntimeError:
            raise APIError(503, "server is shutting down", type="server_error") from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        watch = ClientWatch(request, engine, handles, events)
        if req.stream:
            return StreamingResponse(
                _sse(watch, handles, events, rid, created, req),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            while not all(h.done for h in handles):
                if await watch.next() is None:
                    return Response(status_code=499)
        finally:
            for h in handles:
                if not h.done:
                    engine.cancel(h)
        raise_if_failed(handles)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": h.text},
                "logprobs": None,
                "finish_reason": h.finish_reason,
            }
            for i, h in enumerate(handles)
        ]
        return _body(
            rid, created, req.model, choices, usage(len(ids) * len(handles), sum(len(h.output_ids) for h in handles))
        )

    async def _sse(watch, handles, events, rid, created, req):
        index = {id(h): i for i, h in enumerate(handles)}

        def chunk(choices, use=None) -> str:
            return f"data: {json.dumps(_body(rid, created, req.model, choices, use, chunk=True))}\n\n"

        try:
            yield chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(handles))
                ]
            )
            unfinished = set(index.values())
            while unfinished:
                ev = await watch.next()
                if ev is None:
                    return
                if ev.finish_reason == "error":
                    err = APIError(500, ev.request.error or "generation failed", type="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                i = index[id(ev.request)]
                delta = {"content": ev.text} if ev.text else {}
                yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": ev.finish_reason}])
                if ev.finish_reason is not None:
                    unfinished.discard(i)
            if req.stream_options is not None and req.stream_options.include_usage:
                n_prompt = sum(len(h.prompt_ids) for h in handles)
                yield chunk([], usage(n_prompt, sum(len(h.output_ids) for h in handles)))
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                if not h.done:
                    watch.engine.cancel(h)
