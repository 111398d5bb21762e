"""Expert warm-up: touch every routed expert once and run a short generation before serving.

A request that lands on an expert nobody has used yet pays for it: weights paged in from a
memory-mapped file or moved to the device lazily, allocator pools grown, matmul kernels chosen for new
shapes. Routing decides which experts a request needs, so without warm-up that cost surfaces as
random latency spikes in the first requests. Warm-up runs each expert of every MoE layer on one token
(directly, not through the router, so none is missed) and one short batched generation.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F


@torch.inference_mode()
def touch_experts(model) -> int:
    """Run every routed expert of every MoE layer on one token. Returns how many experts ran."""
    n = 0
    for layer in model.moe_layers.values():
        if not hasattr(layer.experts, "gate_up"):
            continue  # a swapped-in expert module (offload, expert parallel) warms itself
        gate_up, down = layer.experts.gate_up, layer.experts.down
        x = torch.zeros(1, gate_up.shape[-1], dtype=gate_up.dtype, device=gate_up.device)
        f = down.shape[-1]
        for e in range(gate_up.shape[0]):
            h = F.linear(x, gate_up[e])
            F.linear(F.silu(h[:, :f]) * h[:, f:], down[e])
            n += 1
    return n


def warmup(
    model, tokenizer, max_batch: int = 1, new_tokens: int = 4, compile: bool = False, engine=None
) -> dict[str, float]:
    """Touch every expert, then generate `new_tokens` greedily for batches of 1 and `max_batch`
    prompts. With `compile`, through compiled decode steps, so both graphs a compiled engine uses
    (batch 1, batch > 1) are built before the first request.

    `engine`: a started serving engine to warm instead of throwaway ones (its own `compile` setting then
    applies); the requests run in its thread, on its cache. What a compiled engine records on CUDA needs
    that: a CUDA graph is bound to the thread that recorded it (PyTorch keeps one graph manager per
    thread) and to the cache addresses it was recorded with, so graphs recorded by engines in the
    caller's thread would be recorded again -- from another thread's manager -- at the first request.
    Returns {"experts": count, "seconds": wall time}."""
    from moelab.infer.sampling import SamplingParams
    from moelab.infer.scheduler import Engine

    t0 = time.perf_counter()
    experts = touch_experts(model)
    token = getattr(tokenizer, "eod_id", None) or 0
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    for b in sorted({1, max_batch}):
        if engine is not None:
            _run_in_engine(engine, [[token] * 8] * b, params)
            continue
        # in a cache of max_batch rows, as the serving engine's (a compiled graph is specialised on a
        # cache of one row)
        local = Engine(model, tokenizer, max_batch=max_batch, max_len=8 + new_tokens, compile=compile)
        try:
            for _ in range(b):
                local.submit([token] * 8, params)
            while local.step():
                pass
        finally:
            local.close()
    return {"experts": experts, "seconds": time.perf_counter() - t0}


def _run_in_engine(engine, prompts: list[list[int]], params) -> None:
    """Submit `prompts` to a started engine together and wait until all have finished."""
    from moelab.errors import UserError

    if not engine.alive:
        raise RuntimeError("warmup(engine=...) needs a started engine (Engine.start)")
    done = threading.Semaphore(0)
    reqs = [engine.submit(p, params, lambda ev: done.release() if ev.finish_reason else None) for p in prompts]
    for _ in reqs:
        done.acquire()
    failed = [r for r in reqs if r.finish_reason == "error"]
    if failed:
        raise UserError(f"warm-up: a generation failed: {failed[0].error}")
