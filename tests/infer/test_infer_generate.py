"""generate / stream_generate / the engine against a naive full-recompute loop."""

import pytest
import torch

from moelab.errors import UserError
from moelab.infer.generate import generate, stream_generate
from moelab.infer.sampling import SamplingParams
from moelab.infer.scheduler import Engine


def naive_greedy(model, tokenizer, prompt: str, n: int) -> str:
    """Recompute the whole sequence every step; stop at end-of-document."""
    ids = tokenizer.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tokenizer.eod_id:
                break
            out.append(nxt)
    return tokenizer.decode(out)


PROMPTS = ["The quick brown fox", "a", "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich"]


def test_batched_greedy_equals_naive_loop(model, tokenizer):
    got = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0)
    assert got == [naive_greedy(model, tokenizer, p, 12) for p in PROMPTS]
    assert generate(model, tokenizer, PROMPTS[0], max_new_tokens=12, temperature=0) == got[0]


def test_small_max_batch_queues_and_still_matches(model, tokenizer):
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0, max_batch=1) == generate(
        model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0
    )


def test_seeded_sampling_is_reproducible(model, tokenizer):
    kw = dict(max_new_tokens=16, temperature=1.3, top_k=50, top_p=0.95)
    a = generate(model, tokenizer, PROMPTS, seed=11, **kw)
    assert a == generate(model, tokenizer, PROMPTS, seed=11, **kw)
    assert a != generate(model, tokenizer, PROMPTS, seed=12, **kw)
    # prompt i uses seed + i, whatever else is in the batch
    assert generate(model, tokenizer, [PROMPTS[1]], seed=12, **kw) == [a[1]]


def test_stream_pieces_equal_generate(model, tokenizer):
    text = generate(model, tokenizer, PROMPTS[0], max_new_tokens=20, temperature=0.9, seed=3)
    pieces = list(stream_generate(model, tokenizer, PROMPTS[0], max_new_tokens=20, temperature=0.9, seed=3))
    assert len(pieces) > 1 and "".join(pieces) == text
    multi = list(stream_generate(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0))
    joined = ["".join(t for i, t in multi if i == k) for k in range(len(PROMPTS))]
    assert joined == generate(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0)


def test_stop_string_ends_generation(model, tokenizer):
    full = generate(model, tokenizer, PROMPTS[2], max_new_tokens=24, temperature=0)
    assert len(full) > 4
    stop = full[3:5]
    cut = generate(model, tokenizer, PROMPTS[2], max_new_tokens=24, temperature=0, stop=[stop, "\x00never"])
    assert cut == full[: full.find(stop)]


def test_num_experts_per_tok_override(model, tokenizer):
    ref_model_k1 = type(model)(model.cfg).eval()
    ref_model_k1.load_state_dict(model.state_dict())
    ref_model_k1.set_router_attr("top_k", 1)
    want = naive_greedy(ref_model_k1, tokenizer, PROMPTS[0], 10)
    assert generate(model, tokenizer, PROMPTS[0], max_new_tokens=10, temperature=0, num_experts_per_tok=1) == want
    assert want != generate(model, tokenizer, PROMPTS[0], max_new_tokens=10, temperature=0)
    assert all(layer.router.top_k == 2 and layer.record_stats for layer in model.moe_layers.values())  # restored
    with pytest.raises(UserError, match="num_experts_per_tok"):
        generate(model, tokenizer, "x", num_experts_per_tok=5)


def test_context_limits_are_user_errors(model, tokenizer):
    ctx = model.cfg.max_seq_len
    with pytest.raises(UserError, match="context"):
        generate(model, tokenizer, "x" * ctx, max_new_tokens=1)
    with pytest.raises(UserError, match="max_tokens"):
        generate(model, tokenizer, "x" * 10, max_new_tokens=ctx - 9)
    engine = Engine(model, tokenizer, max_batch=1)  # exactly filling the context is fine
    try:
        req = engine.submit([120] * 10, SamplingParams(max_new_tokens=ctx - 10, temperature=0))
        while engine.step():
            pass
    finally:
        engine.close()
    assert req.finish_reason in ("length", "stop") and len(req.output_ids) <= ctx - 10


def test_continuous_batching_join_and_leave(model, tokenizer):
    """Requests submitted while others run join at the next step and give what they give alone."""
    engine = Engine(model, tokenizer, max_batch=2)
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0)  # noqa: E731
    ids = [tokenizer.encode(p) for p in PROMPTS]
    try:
        first = engine.submit(ids[0], greedy(20))
        engine.step()
        engine.step()
        second = engine.submit(ids[1], greedy(3))  # joins the running batch
        third = engine.submit(ids[2], greedy(6))  # waits for a free row
        engine.step()
        assert engine.num_running == 2 and engine.num_waiting == 1
        while not second.done:
            engine.step()
        engine.step()
        assert engine.num_running == 2 and not first.done  # third took second's row at once
        while engine.step():
            pass
    finally:
        engine.close()
    for req, prompt, n in [(first, PROMPTS[0], 20), (second, PROMPTS[1], 3), (third, PROMPTS[2], 6)]:
        assert req.text == naive_greedy(model, tokenizer, prompt, n)


def test_cancel_frees_the_row(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    try:
        a = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=50, temperature=0))
        b = engine.submit([4, 5], SamplingParams(max_new_tokens=6, temperature=0))
        engine.step()
        engine.cancel(a)
        engine.step()
        assert a.finish_reason == "cancelled" and engine.num_running == 1 and engine.num_waiting == 0
        while engine.step():
            pass
        assert b.finish_reason in ("length", "stop")
    finally:
        engine.close()


def test_warmup_runs_every_expert_and_changes_nothing(model, tokenizer, monkeypatch):
    import torch.nn.functional as F

    import moelab.infer.warmup as warmup_module

    seen = set()

    class Spy:  # records which weight tensors warm-up multiplies by
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def linear(x, w, b=None):
            seen.add(w.data_ptr())
            return F.linear(x, w, b)

    before = generate(model, tokenizer, PROMPTS[0], max_new_tokens=8, temperature=0)
    monkeypatch.setattr(warmup_module, "F", Spy())
    info = warmup_module.warmup(model, tokenizer, max_batch=2)
    experts = [
        (layer.experts.gate_up[e], layer.experts.down[e])
        for layer in model.moe_layers.values()
        for e in range(layer.cfg.num_experts)
    ]
    assert info["experts"] == len(experts)
    assert {w.data_ptr() for pair in experts for w in pair} <= seen
    assert generate(model, tokenizer, PROMPTS[0], max_new_tokens=8, temperature=0) == before


def test_compiled_decoding_equals_eager_and_warmup_builds_every_graph(model, tokenizer, caplog):
    """torch.compile'd decode steps give the eager tokens, for a batch of different lengths and for rows
    joining mid-flight; after the warm-up, an engine of the same size compiles nothing new."""
    from torch._dynamo.utils import counters

    from moelab.infer.warmup import warmup

    eager = generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0)
    warmup(model, tokenizer, max_batch=3, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # batch 1 and batch > 1 were compiled
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=12, temperature=0, compile=True) == eager
    engine = Engine(model, tokenizer, max_batch=3, compile=True)
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0)  # noqa: E731
    try:
        first = engine.submit(tokenizer.encode(PROMPTS[0]), greedy(12))
        engine.step()
        second = engine.submit(tokenizer.encode(PROMPTS[2]), greedy(12))  # joins at a different length
        while engine.step():
            pass
    finally:
        engine.close()
    assert [first.text, second.text] == [eager[0], eager[2]]
    assert counters["stats"]["unique_graphs"] == graphs
    assert "compiled decoding failed" not in caplog.text


def test_compiled_decoding_with_a_kv_bucket_has_few_shapes(model, tokenizer):
    """The CUDA-graph form of a compiled decode step (graphs themselves need a GPU): the attended cache
    length is rounded up to the bucket, so a 60-token generation presents three mask shapes instead of
    sixty -- a graph is recorded per shape -- and the tokens are the eager ones."""
    prompts = PROMPTS[:2]
    eager = generate(model, tokenizer, prompts, max_new_tokens=60, temperature=0)
    engine = Engine(model, tokenizer, max_batch=2, max_len=96, compile=True, kv_bucket=32)
    shapes = []
    compiled = engine._decoder

    def decoder(idx, **kw):
        shapes.append((tuple(idx.shape), tuple(kw["attn_mask"].shape)))
        return compiled(idx, **kw)

    engine._decoder = decoder
    greedy = SamplingParams(max_new_tokens=60, temperature=0)
    try:
        reqs = [engine.submit(tokenizer.encode(p), greedy) for p in prompts]
        while engine.step():
            pass
    finally:
        engine.close()
    assert [r.text for r in reqs] == eager
    assert len(shapes) >= 40
    assert {s[1][-1] for s in shapes} <= {32, 64, 96}
    assert len(set(shapes)) <= 6  # (batch 2, 1 as rows finish) x buckets, never one per step


def test_compiled_decoding_pads_the_batch_to_few_sizes(model, tokenizer):
    """With `pad_batch` (on by default where decode steps replay as CUDA graphs) a compiled step runs
    1, 2 or 4 rows while requests join and leave; idle rows change no request's tokens."""
    lengths = [5, 17, 30, 9]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0] + " jumps", PROMPTS[1] + "b"]
    eager = [
        generate(model, tokenizer, p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, lengths, strict=True)
    ]
    engine = Engine(model, tokenizer, max_batch=4, max_len=64, compile=True, pad_batch=True)
    batches = []
    compiled = engine._decoder

    def decoder(idx, **kw):
        batches.append(idx.shape[0])
        return compiled(idx, **kw)

    engine._decoder = decoder
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0)  # noqa: E731
    try:
        reqs = [engine.submit(tokenizer.encode(p), greedy(n)) for p, n in zip(prompts[:3], lengths[:3], strict=True)]
        for _ in range(3):
            engine.step()
        reqs.append(engine.submit(tokenizer.encode(prompts[3]), greedy(lengths[3])))  # joins mid-flight
        while engine.step():
            pass
    finally:
        engine.close()
    assert [r.text for r in reqs] == eager
    assert set(batches) <= {1, 2, 4} and 3 not in batches and len(batches) >= 29


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_logit_anywhere_is_refused(model, tokenizer, bad):
    engine = Engine(model, tokenizer, max_batch=2)
    real = engine._decoder

    def broken(idx, **kw):
        out = real(idx, **kw)
        out.logits[-1, -1, 7] = bad  # one value, in the last row
        return out

    engine._decoder = broken
    try:
        for p in PROMPTS[:2]:
            engine.submit(tokenizer.encode(p), SamplingParams(max_new_tokens=4, temperature=0))
        with pytest.raises(UserError, match="logits are not finite"):
            while engine.step():
                pass
    finally:
        engine.close()


def test_warmup_of_a_started_engine_runs_in_its_thread(model, tokenizer):
    """`moelab serve` warms its own engine: the warm-up's decode steps run in the engine's thread, on its
    cache (on CUDA, graphs are bound to the recording thread and to the cache's addresses)."""
    import threading

    from moelab.infer.warmup import warmup

    engine = Engine(model, tokenizer, max_batch=2, compile=True)
    with pytest.raises(RuntimeError, match="needs a started engine"):
        warmup(model, tokenizer, max_batch=2, engine=engine)
    seen = []
    real = engine._decoder

    def decoder(idx, **kw):
        seen.append((threading.get_ident(), idx.shape[0]))
        return real(idx, **kw)

    engine._decoder = decoder
    engine.start()
    try:
        info = warmup(model, tokenizer, max_batch=2, compile=True, engine=engine)
    finally:
        engine.close()
    assert info["experts"] == sum(layer.cfg.num_experts for layer in model.moe_layers.values())
    assert {t for t, _ in seen} == {engine._thread.ident} != {threading.get_ident()}
    assert {b for _, b in seen} == {1, 2}  # both batch forms ran


def test_compiled_decoding_falls_back_to_eager(model, tokenizer, monkeypatch, caplog):
    import moelab.infer.scheduler as scheduler

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(scheduler, "compiled_decoder", lambda m, graphs=None: broken)
    eager = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0, compile=True) == eager
    assert "compiled decoding failed (RuntimeError: no C++ compiler); decoding eagerly" in caplog.text


def test_decode_graphs_only_where_the_step_has_no_host_sync(model, monkeypatch, gpu_capability):
    """CUDA graphs for compiled decode steps only when every MoE layer's experts are sync-free there
    (grouped_mm: CUDA, bf16); a host read of expert ids inside a graph capture would be an error."""
    from moelab.infer.scheduler import decode_graphs

    cuda = torch.device("cuda")
    assert decode_graphs(model, cuda, torch.bfloat16)  # auto -> grouped_mm (widths are multiples of 8)
    assert not decode_graphs(model, cuda, torch.float32)  # auto -> cpu_buckets: the few-token operator
    assert not decode_graphs(model)  # on the CPU: no graphs
    gpu_capability((8, 0))  # an A100: torch's grouped matmul reads group sizes on the host
    assert not decode_graphs(model, cuda, torch.bfloat16)
    gpu_capability((9, 0))
    monkeypatch.setenv("MOELAB_CUDA_GRAPHS", "0")
    assert not decode_graphs(model, cuda, torch.bfloat16)
    monkeypatch.delenv("MOELAB_CUDA_GRAPHS")
    layer = next(iter(model.moe_layers.values()))
    monkeypatch.setattr(layer, "experts", torch.nn.Identity())  # a swapped-in module (offload): plans on the host
    assert not decode_graphs(model, cuda, torch.bfloat16)
