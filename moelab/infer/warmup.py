"""Expert warm-up: touch every routed expert once and run a short generation before serving.

A request that lands on an expert nobody has used yet pays for it: weights paged in from a
memory-mapped file or moved to the device lazily, allocator pools grown, matmul kernels chosen for new
shapes. Routing decides which experts a request needs, so without warm-up that cost surfaces as
random latency spikes in the first requests. Warm-up runs each expert of every MoE layer on one token
(directly, not through the router, so none is missed) and one short batched generation.
"""

from __future__ import annotations

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


def warmup(model, tokenizer, max_batch: int = 1, new_tokens: int = 4, compile: bool = False) -> dict[str, float]:
    """Touch every expert, then generate `new_tokens` greedily for batches of 1 and `max_batch`
    prompts. With `compile`, through compiled decode steps, so both graphs a compiled engine uses
    (batch 1, batch > 1) are built before the first request. (On CUDA each padded batch size and cache
    bucket is also recorded as a CUDA graph at its first use: a few steps' time, not a compile.)
    Returns {"experts": count, "seconds": wall time}."""
    from moelab.infer.sampling import SamplingParams
    from moelab.infer.scheduler import Engine

    t0 = time.perf_counter()
    experts = touch_experts(model)
    token = getattr(tokenizer, "eod_id", None) or 0
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    for b in sorted({1, max_batch}):  # in a cache of max_batch rows, as the serving engine's (a compiled
        # graph is specialised on a cache of one row)
        engine = Engine(model, tokenizer, max_batch=max_batch, max_len=8 + new_tokens, compile=compile)
        try:
            for _ in range(b):
                engine.submit([token] * 8, params)
            while engine.step():
                pass
        finally:
            engine.close()
    return {"experts": experts, "seconds": time.perf_counter() - t0}
