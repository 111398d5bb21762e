"""The generation API: load a trained model, then complete a batch of prompts or stream one.

    model, tok = moelab.load("runs/tiny")
    generate(model, tok, ["Once upon", "To be"], max_new_tokens=50, temperature=0.8, top_k=40, seed=0)
    for piece in stream_generate(model, tok, "ROMEO:", max_new_tokens=100):
        print(piece, end="", flush=True)

Both run the continuous-batching engine (`scheduler.py`) in the caller's thread: the prompts are
prefilled together (left-padded), then decoded one token per step with a preallocated KV cache;
rows that finish leave the batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.errors import UserError
from moelab.infer.decoding import decode_layout
from moelab.infer.sampling import SamplingParams, check_text
from moelab.infer.scheduler import Engine, Event

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None, warmup: bool = False
):
    """(model in eval mode, tokenizer) from a run directory (its newest checkpoint) or a checkpoint
    directory. Weights are laid out for decoding (see `decoding.decode_layout`); `warmup` runs every
    expert and a short generation once so the first request does not pay for it."""
    from moelab.checkpoint import check_tokenizer, load_model, resolve_checkpoint
    from moelab.device import check_on_device, resolve_device, use_device
    from moelab.tokenizer import Tokenizer

    ckpt = resolve_checkpoint(path)
    tok_dir = ckpt / "tokenizer"
    if not tok_dir.is_dir():
        raise UserError(f"{ckpt}: no tokenizer/ directory next to the weights; cannot turn text into tokens")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    device = resolve_device(device, "--device")
    use_device(device)
    model, cfg, _ = load_model(ckpt, device)
    if dtype is not None:
        model.to(dtype)
    check_on_device(model, device, "the loaded model")
    tokenizer = Tokenizer.load(tok_dir)
    check_tokenizer(ckpt, tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{tok_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.model.vocab_size}"
        )
    decode_layout(model)
    if warmup:
        from moelab.infer.warmup import warmup as run_warmup

        run_warmup(model, tokenizer)
    return model, tokenizer


@dataclass
class Completion:
    """One prompt's result from `generate(..., return_routing=True)` (or `return_logits=True`).
    routing / routing_weights: [P + N - 1, L, K] for the P prompt tokens and every generated token but
    the last (the tokens the model was fed), L = MoE layers in order; ids encoded as in
    `moe.RoutingRecord` (a dropped assignment is -1 - expert). Pass `routing` (padded to the batch) to
    `model(..., routing=...)` to replay it. logits: [N, V] fp32, the logits each token was drawn from."""

    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    routing: torch.Tensor | None = None
    routing_weights: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logprobs: list[float] | None = None  # of each generated token at the sampling temperature


def _completion(req, routing: bool, logits: bool | str) -> Completion:
    c = Completion(req.text, list(req.prompt_ids), list(req.output_ids), req.finish_reason)
    if routing and req.routing:
        c.routing, c.routing_weights = torch.cat(req.routing), torch.cat(req.routing_weights)
    if logits and req.logits:
        c.logits = torch.stack(req.logits)
    if logits:
        c.logprobs = list(req.logprobs)
    return c


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        raise UserError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:  # an empty prompt starts a new document, as the model saw after each separator in training
        eod = getattr(tokenizer, "eod_id", None)
        if eod is None:
            raise UserError("prompt: empty, and the tokenizer has no end-of-document token to start from")
        ids = [eod]
    return ids


def _requests(
    model,
    tokenizer,
    prompts,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    stop,
    num_experts_per_tok,
    max_batch,
    compile,
    on_event=None,
    record_routing=False,
    record_logits=False,
    deterministic=False,
) -> tuple[Engine, list]:
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, list(stop or [])).validate()
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    if not ids:
        raise UserError("prompts: expected at least one prompt, got none")
    longest = max(len(i) for i in ids) + max_new_tokens
    if deterministic:  # the cache's size is part of every attention read's layout: make it the batch's no more
        longest = model.cfg.max_seq_len
    # The cache is sized to what these prompts need; when that exceeds the context, it is the context
    # and the engine's checks name it.
    engine = Engine(
        model,
        tokenizer,
        max_batch=max_batch or len(ids),
        max_len=min(longest, model.cfg.max_seq_len),
        num_experts_per_tok=num_experts_per_tok,
        compile=compile,
        record_routing=record_routing,
        record_logits=record_logits,
        batch_invariant=deterministic,
    )
    try:
        reqs = [engine.submit(p, params, on_event, sample_index=i) for i, p in enumerate(ids)]
    except BaseException:
        engine.close()
        raise
    return engine, reqs


def generate(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    num_experts_per_tok: int | None = None,
    max_batch: int | None = None,
    compile: bool = False,
    return_routing: bool = False,
    return_logits: bool | str = False,
    deterministic: bool = False,
):
    """Complete each prompt (a string -> a string, a list -> a list). temperature 0 is greedy; prompt i
    draws from a generator seeded with seed + i; the output ends before the first `stop` string or
    the end-of-document token. `num_experts_per_tok` overrides the routed experts per token;
    `compile` runs the decode steps through torch.compile (faster per token after a 10-30 s compile
    on first use; see `scheduler.compiled_decoder`). `return_routing` / `return_logits`: return
    `Completion`s (text, token ids, the routing per token and MoE layer, the logits and the drawn
    tokens' log-probabilities; return_logits="logprobs" keeps only the latter) instead of text.
    `deterministic`: batch-invariant decoding -- a prompt's tokens and logits do not depend on the
    other prompts or its place among them (one sequence per forward; slower, see docs/rl.md)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    engine, reqs = _requests(
        model,
        tokenizer,
        batch,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        [stop] if isinstance(stop, str) else stop,
        num_experts_per_tok,
        max_batch,
        compile,
        record_routing=return_routing,
        record_logits=return_logits,
        deterministic=deterministic,
    )
    try:
        while engine.step():
            pass
    finally:
        engine.close()
    if return_routing or return_logits:
        texts = [_completion(r, return_routing, return_logits) for r in reqs]
    else:
        texts = [r.text for r in reqs]
    return texts[0] if single else texts


def stream_generate(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str | None = None,
    num_experts_per_tok: int | None = None,
    max_batch: int | None = None,
    compile: bool = False,
) -> Iterator[str] | Iterator[tuple[int, str]]:
    """Like `generate`, yielding text as soon as it is final: pieces (str) for one prompt, or
    (prompt index, piece) for a list. Concatenated pieces equal `generate`'s output."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    events: deque[Event] = deque()
    engine, reqs = _requests(
        model,
        tokenizer,
        batch,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        [stop] if isinstance(stop, str) else stop,
        num_experts_per_tok,
        max_batch,
        compile,
        on_event=events.append,
    )
    index = {id(r): i for i, r in enumerate(reqs)}
    try:
        while True:
            more = engine.step()
            while events:
                ev = events.popleft()
                if ev.text:
                    yield ev.text if single else (index[id(ev.request)], ev.text)
            if not more:
                break
    finally:
        engine.close()
