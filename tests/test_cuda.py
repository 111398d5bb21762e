"""CUDA end to end, small (well under a minute on one GPU): train + resume in bf16 and fp16 (GradScaler),
a checkpoint written on the GPU read on the CPU and back, generation and the serving engine, analysis.
Skipped without CUDA; run with `pytest -m cuda tests/test_cuda.py`. Data is built in tmp dirs (no downloads)."""

import json
import time
from pathlib import Path

import pytest
import torch
from device_checks import assert_on_device, tiny_checkpoint

from moelab.data import prepare

pytestmark = pytest.mark.cuda

CUDA = "cuda:0"
TINY = {
    "model": {
        "vocab_size": 264,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 128,
        "max_seq_len": 64,
        "moe": {"num_experts": 4, "top_k": 2, "expert_dim": 64},
    },
    "data": {"seq_len": 64},
    "train": {
        "steps": 6,
        "batch_size": 8,
        "lr": 0.003,
        "warmup_steps": 1,
        "schedule": "constant",
        "seed": 3,
        "device": "cuda",
    },
    "eval": {"every": 3, "batches": 2},
    "checkpoint": {"every": 3, "keep_last": 3},
    "log": {"every": 1, "progress": False},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_data")
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(20):  # generated documents; tinyshakespeare too when it is there
        (corpus / f"doc{d:02d}.py").write_text("".join(f"def f{d}_{i}(x):\n    return x * {i}\n" for i in range(40)))
    if text.is_file():
        (corpus / "shakespeare.txt").write_text(text.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    prepare([str(corpus)], "byte", root / "data", val_fraction=0.1, workers=0)
    return root / "data"


def _cfg(data: Path, **train) -> dict:
    import copy

    cfg = copy.deepcopy(TINY)
    cfg["data"]["path"] = str(data)
    cfg["train"].update(train)
    return cfg


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_train_and_resume_on_cuda(data, tmp_path, dtype):
    from moelab.train.loop import Trainer

    run = tmp_path / "run"
    trainer = Trainer(_cfg(data, dtype=dtype, steps=3, activation_checkpointing=True), run)
    assert trainer.device == torch.device(CUDA)
    assert (trainer.scaler is not None) == (dtype == "float16")
    assert_on_device(trainer.model, CUDA)
    res = trainer.run()
    # fp16: the GradScaler's first scale (2**16) may overflow once and skip that step, as designed
    assert res.step == 3 and res.skipped_steps <= (1 if dtype == "float16" else 0)
    recs = _records(run)
    assert all(0 < r["mfu"] <= 1 for r in recs) and recs[-1]["train/loss"] == recs[-1]["train/loss"]  # not NaN
    assert recs[-1]["peak_mem_bytes"] > 0 and recs[-1]["val/loss"] is not None
    from moelab.train.state import read_train_state

    _, state, _ = read_train_state(res.checkpoint)
    assert "cuda" in state["rng"]  # the CUDA RNG state is checkpointed
    if dtype == "float16":
        assert state["scaler"]["scale"] > 0

    resumed = Trainer(_cfg(data, dtype=dtype, steps=6, activation_checkpointing=True), run, resume=True)
    resumed.run()
    assert resumed.step == 6
    assert_on_device(resumed.model, CUDA)
    if dtype == "float16":
        assert resumed.scaler.get_scale() > 0
    # resume is exact on CUDA too: the same last loss as one uninterrupted 6-step run (to fp tolerance)
    straight = tmp_path / "straight"
    Trainer(_cfg(data, dtype=dtype, steps=6, activation_checkpointing=True), straight).run()
    a, b = _records(run)[-1]["train/loss"], _records(straight)[-1]["train/loss"]
    assert abs(a - b) < 2e-2 * abs(b), (a, b)


def test_compile_and_init_from_on_cuda(data, tmp_path):
    from moelab.train.loop import Trainer

    first = Trainer(_cfg(data, steps=2, dtype="bfloat16"), tmp_path / "a")
    first.run()
    second = Trainer(_cfg(data, steps=2, dtype="bfloat16", compile=True), tmp_path / "b", init_from=tmp_path / "a")
    assert_on_device(second.model, CUDA)
    assert second.run().step == 2


def test_checkpoint_cuda_to_cpu_and_back(data, tmp_path):
    from moelab.checkpoint import load_model, save_checkpoint
    from moelab.config import Config, ModelConfig, MoEConfig
    from moelab.model import Transformer

    cfg = Config(
        model=ModelConfig(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            ffn_dim=64,
            max_seq_len=32,
            moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32),
        )
    )
    cfg.data.seq_len = 32
    torch.manual_seed(0)
    gpu = Transformer(cfg.model).to(CUDA).eval()
    x = torch.randint(0, 64, (2, 16))
    want = gpu(x.to(CUDA)).logits.float().cpu()
    save_checkpoint(tmp_path / "gpu", gpu, cfg)
    cpu, _, _ = load_model(tmp_path / "gpu", "cpu")
    assert_on_device(cpu, "cpu")
    torch.testing.assert_close(cpu(x).logits, want, atol=1e-4, rtol=1e-4)
    save_checkpoint(tmp_path / "cpu", cpu, cfg)
    back, _, _ = load_model(tmp_path / "cpu", CUDA)
    assert_on_device(back, CUDA)
    torch.testing.assert_close(back(x.to(CUDA)).logits.float().cpu(), want, atol=1e-4, rtol=1e-4)

    # a training checkpoint written on the GPU resumes on the CPU
    from moelab.train.loop import Trainer

    Trainer(_cfg(data, steps=2), tmp_path / "run").run()
    on_cpu = Trainer(_cfg(data, steps=3, device="cpu"), tmp_path / "run", resume=True)
    on_cpu.run()
    assert on_cpu.step == 3
    assert_on_device(on_cpu.model, "cpu")


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_generate_and_serving_engine_on_cuda(tmp_path, dtype):
    from moelab.infer.generate import generate, load
    from moelab.infer.sampling import SamplingParams
    from moelab.infer.scheduler import Engine

    ckpt = tiny_checkpoint(tmp_path)
    model, tok = load(ckpt, "cuda", dtype)
    assert_on_device(model, CUDA)
    texts = generate(model, tok, ["ROMEO:", "To be"], max_new_tokens=8, temperature=0.8, top_k=20, seed=0)
    assert len(texts) == 2
    again = generate(model, tok, ["ROMEO:", "To be"], max_new_tokens=8, temperature=0.8, top_k=20, seed=0)
    assert texts == again  # seeded sampling on the GPU is reproducible
    engine = Engine(model, tok, max_batch=4)  # the server's engine, stepped in this thread
    try:
        assert engine.device == torch.device(CUDA) and engine.cache.k.device == torch.device(CUDA)
        reqs = [engine.submit(tok.encode(p), SamplingParams(max_new_tokens=6, temperature=0.0)) for p in ("a", "bc")]
        for _ in range(50):
            if all(r.finish_reason for r in reqs):
                break
            engine.step()
        assert [r.finish_reason for r in reqs] == ["length", "length"] and all(len(r.output_ids) == 6 for r in reqs)
    finally:
        engine.close()


def test_compiled_decode_replays_cuda_graphs(tmp_path, caplog):
    """`generate --compile` and the serving engine in bf16: the decode step is captured as CUDA graphs
    (inductor skipped none), and every generated token's logits equal an eager full forward over the same
    tokens (teacher-forced on the compiled run's own tokens, so a bf16 near-tie cannot make the
    comparison flaky), also while rows leave and steps run padded with idle rows."""
    from torch._dynamo.utils import counters

    from moelab.infer.generate import generate, load
    from moelab.infer.sampling import SamplingParams
    from moelab.infer.scheduler import GRAPH_KV_BUCKET, Engine, decode_graphs
    from moelab.infer.warmup import warmup

    PROMPTS = [("ROMEO:", 5), ("To be", 19), ("a", 11)]
    model, tok = load(tiny_checkpoint(tmp_path), "cuda", "bfloat16")
    assert decode_graphs(model)
    skips = counters["inductor"]["cudagraph_skips"]
    outs = generate(
        model, tok, ["ROMEO:", "To be, or not"], max_new_tokens=24, temperature=0, compile=True, return_logits=True
    )
    # the serving engine as `moelab serve --compile` runs it: in its own thread, warmed there first; rows
    # leave at different steps, so steps run padded with idle rows
    engine = Engine(model, tok, max_batch=4, compile=True, record_logits=True)
    assert engine.pad_batch and engine.cache.kv_bucket == GRAPH_KV_BUCKET
    engine.start()
    try:
        warmup(model, tok, max_batch=4, compile=True, engine=engine)
        reqs = [engine.submit(tok.encode(p), SamplingParams(max_new_tokens=n, temperature=0)) for p, n in PROMPTS]
        deadline = time.monotonic() + 120
        while not all(r.done for r in reqs) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    assert all(r.finish_reason in ("length", "stop") for r in reqs)
    assert counters["inductor"]["cudagraph_skips"] == skips
    # compiled all along: no fallback to eager decoding (which would pass the checks below without graphs)
    assert engine._decoder is not engine.model and "compiled decoding failed" not in caplog.text
    runs = [(c.prompt_ids, c.token_ids, c.logits) for c in outs]
    runs += [(r.prompt_ids, r.output_ids, torch.stack(r.logits)) for r in reqs]
    for prompt_ids, token_ids, logits in runs:
        ids = torch.tensor([prompt_ids + token_ids[:-1]], device=CUDA)
        with torch.no_grad():
            ref = model(ids).logits[0, len(prompt_ids) - 1 :].float().cpu()
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max() <= 0.05 * ref.abs().max() + 0.02


def test_offloaded_experts_on_cuda(tmp_path):
    """Experts served from the memory-mapped checkpoint through an LRU of device slots: the rest of the
    model on the GPU, the slots on the GPU, and the same greedy tokens as the resident model."""
    from moelab.infer.generate import generate, load
    from moelab.offload import load_offloaded

    ckpt = tiny_checkpoint(tmp_path)
    resident, tok = load(ckpt, "cuda")
    off, _, policy = load_offloaded(ckpt, "lru:2", device="cuda")
    assert_on_device(off, CUDA)
    assert policy.device.type == "cuda"
    prompts = ["ROMEO:", "To be"]
    want = generate(resident, tok, prompts, max_new_tokens=10, temperature=0)
    assert generate(off, tok, prompts, max_new_tokens=10, temperature=0) == want
    assert policy.metrics.misses > 0


def test_analyze_on_cuda(data, tmp_path):
    from moelab.analysis.run import analyze_run
    from moelab.train.loop import Trainer

    Trainer(_cfg(data, steps=2), tmp_path / "run").run()
    analysis, report = analyze_run(tmp_path / "run", tokens=2048, device="cuda")
    assert report.is_file() and analysis["layers"]
