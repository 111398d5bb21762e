"""HTTP plumbing both API routes share (completions in `server.py`, chat in `chat.py`): body limits, JSON
parsing that turns every bad body into one OpenAI-style 4xx, and watching for clients that go away."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from moelab.infer.metrics import ServerMetrics
from moelab.infer.protocol import APIError
from moelab.infer.scheduler import Engine, Event

DISCONNECT_POLL_S = 0.25
DEFAULT_MAX_BODY_BYTES = 4 << 20  # ~1M tokens of text: far more than any context, far less than memory
RETRY_AFTER_S = 1  # a full queue drains in about a generation's time


class BodyLimit:
    """ASGI middleware: 413 for a declared body over the limit, before anything reads it."""

    def __init__(self, app, limit: int, metrics: ServerMetrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                err = _too_large(self.limit) if length.isdigit() else APIError(400, "bad Content-Length header")
                self.metrics.rejected(err.status)
                response = JSONResponse(err.body(), status_code=err.status, headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"request body is larger than this server accepts ({limit} bytes; see --max-body-bytes)",
        code="request_too_large",
    )


async def read_json_body(request: Request, limit: int):
    """The parsed JSON body (at most `limit` bytes; APIError 413/400 otherwise); None when the client went
    away while sending it."""
    raw = await _read_body(request, limit)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an int of over 4300 digits
        raise APIError(400, f"request body is not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON (nested too deeply)") from None


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, at most `limit` bytes (413 past it); None when the client went away while sending it."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        return None
    return b"".join(chunks)


class ClientWatch:
    """Relays engine events, checking every DISCONNECT_POLL_S whether the client is still there (events
    may arrive every few milliseconds, so the check cannot wait for a quiet moment)."""

    def __init__(self, request: Request, engine: Engine, handles, events: asyncio.Queue):
        self.request, self.engine, self.handles, self.events = request, engine, handles, events
        self.checked = time.monotonic()

    async def next(self) -> Event | None:
        """The next event, or None once the client has gone (its requests are then cancelled)."""
        while True:
            if time.monotonic() - self.checked >= DISCONNECT_POLL_S:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    for h in self.handles:
                        self.engine.cancel(h)
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                continue


def raise_if_failed(handles) -> None:
    failed = [h for h in handles if h.finish_reason == "error"]
    if failed:
        raise APIError(500, failed[0].error or "generation failed", type="server_error")
