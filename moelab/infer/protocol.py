"""The OpenAI completions wire format: request validation, response bodies, error bodies.

Only the legacy `/v1/completions` shape is served (a base language model has no chat template).
Fields the server cannot honour (logprobs, penalties, logit_bias, suffix, best_of) are rejected by
name with a 400 rather than silently ignored; unknown fields too, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moelab.infer.sampling import SEED_MAX, SEED_MIN

MAX_STOP = 4  # OpenAI's limit on stop sequences


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # extension (vLLM's): -1 or 0 = off
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    user: str | None = None
    # Extension: each choice gets `moelab_routing` (expert ids per token fed to the model and MoE layer,
    # see moelab.infer.generate.Completion); needs a server started with --record-routing, no streaming.
    return_routing: bool = False
    # Accepted only at their no-op values.
    logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        noop = {
            "logprobs": (None, 0),
            "best_of": (None, 1),
            "presence_penalty": (None, 0),
            "frequency_penalty": (None, 0),
            "suffix": (None, ""),
        }
        for name, ok in noop.items():
            if getattr(self, name) not in ok:
                raise APIError(400, f"{name} is not supported by this server", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        stops = self.stop_list
        if len(stops) > MAX_STOP or not all(stops):
            raise APIError(400, f"stop: expected at most {MAX_STOP} non-empty strings, got {self.stop!r}", param="stop")
        for name, texts in (("prompt", [p for p in self.prompts if isinstance(p, str)]), ("stop", stops)):
            for t in texts:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as e:  # JSON "\ud800": a lone surrogate, no character at all
                    raise APIError(
                        400, f"{name}: not valid Unicode ({e.reason} at index {e.start})", param=name
                    ) from None
        if self.prompt == []:
            raise APIError(
                400, "prompt: expected a string, a list of strings or token ids, got an empty list", param="prompt"
            )

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


_UNION_TAGS = ("str", "int", "float", "bool", "none")


def parse_completion_request(body: object) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    try:
        req = CompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # Union members tag the location ("prompt", "list[int]", 0): keep field names and indices.
        loc = [
            str(x)
            for x in err["loc"]
            if not (isinstance(x, str) and (x in _UNION_TAGS or x.startswith(("list[", "dict[", "function-"))))
        ]
        param = ".".join(loc) or None
        message = "unrecognized request argument" if err["type"] == "extra_forbidden" else err["msg"]
        if param and param.startswith("prompt") and err["type"] != "missing":
            param, message = "prompt", "expected a string, a list of strings, a list of token ids or a list of those"
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None
    req.check_supported()
    return req


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(rid: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(name: str, max_model_len: int, created: int | None = None) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": created or int(time.time()),
        "owned_by": "moelab",
        "max_model_len": max_model_len,
    }
