"""`moelab bench generate`: prefill and decode speed of the generation engine (and transformers').

Per model (a preset config with random weights, or a trained run):
- prefill tokens/s: --prompt-len / (time from the call to the first generated token), one prompt;
- decode tokens/s at each batch size: batch x (--new-tokens - 1) / (time from the first to the last
  generated token), so prefill and setup are excluded; generations are greedy and never stop early;
- per-token latency p50/p99: gaps between consecutive tokens of one decode at batch 1.
Each is measured twice: on the wall clock and on the process's CPU time (keys ending in `_cpu`),
which on a shared machine is the steadier estimate of an idle machine's speed at one thread.
`--compile` adds `moelab_compiled`: the same engine with compiled decode steps (the warm-up repeat
compiles; `scheduler.compiled_decoder`). `--compare hf` exports the same weights to transformers
(moelab.interop) and times its `generate` the same way, interleaved with ours in every repeat so
machine noise hits both alike. `--compare llamacpp` does the same with llama.cpp (llama-cpp-python)
on a GGUF f32 export: prefill and decode at batch 1 only (llama-cpp-python runs one sequence), with
--threads threads and an fp32 KV cache, so both sides compute in fp32.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from moelab.bench import write_results

PRESETS = {
    "h200": dict(
        configs=["configs/large.yaml"],
        batch_sizes=[1, 32],
        compare=["hf"],
        compile=True,
        dtype="bfloat16",
        repeats=2,
        new_tokens=64,
    )
}


def add_arguments(p):
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="h200: the GPU issue's decode table (large preset, batch 1 and 32, bf16, vs transformers, "
        "compiled decode steps too)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and activations for every side (default float32)",
    )
    p.add_argument(
        "--configs",
        nargs="*",
        default=["configs/tiny.yaml", "configs/small.yaml"],
        help="preset configs to build with random weights (default tiny and small)",
    )
    p.add_argument("--run", action="append", default=[], help="also (or instead) time a trained run/checkpoint")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported)")
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        choices=["hf", "llamacpp"],
        help="also time transformers' generate (hf) and/or llama.cpp on a GGUF f32 export (llamacpp)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time moelab with compiled decode steps (moelab_compiled; compiles in the warm-up)",
    )
    p.add_argument("--json", dest="json_out", default="benchmarks/generate.json", help="where to write results")


class _IdTokenizer:
    """The benchmark feeds token ids and never reads text: decoding costs nothing, nothing ends early."""

    eod_id = None
    vocab_size = 0

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids) -> str:
        return ""


CLOCKS = ((0, ""), (1, "_cpu"))  # index into a `_now()` pair, suffix of the result keys


def _now() -> tuple[float, float]:
    """(wall clock, this process's CPU time). On a shared machine the wall clock also counts time the
    scheduler gave to other processes; with one torch thread, CPU time is what an idle machine's wall
    clock would show (memory-bandwidth contention aside)."""
    return time.perf_counter(), time.process_time()


def _ours(model, prompt: list[int], batch: int, new_tokens: int, compile: bool = False) -> tuple[float, list[float]]:
    """(start time, timestamps of each step's tokens) for a greedy generation through the engine."""
    from moelab.infer.sampling import SamplingParams
    from moelab.infer.scheduler import Engine

    stamps: list[tuple[float, float]] = []
    t0 = _now()
    engine = Engine(model, _IdTokenizer(), max_batch=batch, max_len=len(prompt) + new_tokens, compile=compile)
    try:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
        first = engine.submit(prompt, params, lambda ev: stamps.append(_now()) if ev.token_ids else None)
        for _ in range(batch - 1):
            engine.submit(prompt, params)
        while engine.step():
            pass
    finally:
        engine.close()
    assert len(first.output_ids) == new_tokens
    _ours.last_ids = first.output_ids
    return t0, stamps


def _ours_compiled(model, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, list[float]]:
    """`_ours` with compiled decode steps; graphs compiled once per process are reused by every engine."""
    t0, stamps = _ours(model, prompt, batch, new_tokens, compile=True)
    _ours_compiled.last_ids = _ours.last_ids
    return t0, stamps


def _theirs(hf, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, list[float]]:
    import torch

    stamps: list[tuple[float, float]] = []

    device = next(hf.parameters()).device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    class Stamp:  # transformers' streamer protocol: put() per step (the prompt first), end()
        def put(self, value):
            sync()  # on a GPU the token exists once its kernels ran
            stamps.append(_now())

        def end(self):
            pass

    ids = torch.tensor([prompt] * batch, device=device)
    t0 = _now()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=Stamp(),
        )
    assert out.shape[1] == len(prompt) + new_tokens
    _theirs.last_ids = out[0, len(prompt) :].tolist()
    return t0, stamps[1:]


def _hf_model(model, tmp: Path):
    hf = _hf_model_cpu(model, tmp)
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype)


def _hf_model_cpu(model, tmp: Path):
    """transformers' model on the same weights, written and read back through moelab.interop."""
    from moelab.interop.convert import to_hf_state
    from moelab.interop.hf_config import choose_arch, to_hf_config
    from moelab.interop.hf_maps import weight_map
    from moelab.interop.parity import load_transformers_model
    from moelab.interop.safetensors_dir import write_safetensors_dir

    cfg = model.cfg
    spec = choose_arch(cfg)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    write_safetensors_dir(tmp, to_hf_state(state, weight_map(cfg, spec), __import__("torch").float32))
    (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg, spec, "float32", {})))
    return load_transformers_model(tmp, spec)


def _llamacpp(llm, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, list[float]]:
    """(start time, timestamps of each token) for a greedy generation in llama.cpp: the prompt in one
    forward, then one token per forward through its KV cache; argmax over the last logits as ours."""
    import numpy as np
    from llama_cpp import llama_get_logits_ith

    assert batch == 1, "llama-cpp-python decodes one sequence"
    n_vocab = llm.n_vocab()
    stamps, out, feed = [], [], prompt
    t0 = _now()
    llm.reset()
    for _ in range(new_tokens):
        llm.eval(feed)
        feed = [int(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())]
        stamps.append(_now())
        out += feed
    _llamacpp.last_ids = out
    return t0, stamps


def _llama_model(model, tmp: Path, n_ctx: int, threads: int):
    """llama.cpp on the same weights, written as GGUF f32 and read back through moelab.interop."""
    from moelab.interop.gguf import write_model_gguf
    from moelab.interop.llama_cpp_check import open_llama

    path = tmp / "model.gguf"
    write_model_gguf(path, model, dtype="f32", name="bench")
    return open_llama(path, n_ctx, threads=threads, logits_all=False)


def _llama_cpp_note() -> str | None:
    """Why the llama.cpp comparison cannot run here, or None."""
    import importlib.util

    from moelab.interop.gguf import llama_cpp_available

    if not llama_cpp_available():
        return "llama-cpp-python is not installed (pip install 'moelab[llamacpp]'; it compiles llama.cpp for ~10 min)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install 'moelab[interop]')"
    return None


def _build(source: str, min_len: int, device=None, dtype=None):
    name, model = _build_cpu(source, min_len)
    return name, model.to(device=device, dtype=dtype)


def _build_cpu(source: str, min_len: int):
    """(name, model) from a preset YAML (random weights, context stretched to fit the benchmark) or a run."""
    from moelab.checkpoint import load_model
    from moelab.config import load_config
    from moelab.model import Transformer

    if source.endswith((".yaml", ".yml")):
        cfg = load_config(source, [])
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, min_len)  # RoPE has no learned length
        return Path(source).stem, Transformer(cfg.model).eval()
    model, _, ckpt = load_model(source)
    if model.cfg.max_seq_len < min_len:
        from moelab.errors import UserError

        raise UserError(f"{source}: context {model.cfg.max_seq_len} < --prompt-len + --new-tokens = {min_len}")
    return ckpt.name, model


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _variants(name: str, model, args, tmp: Path, threads: int) -> tuple[dict, dict[str, str]]:
    """{variant: (model, timing fn)} and {variant: why it was skipped}."""
    from moelab.errors import UserError

    variants, skipped = {"moelab": (model, _ours)}, {}
    if args.compile:
        variants["moelab_compiled"] = (model, _ours_compiled)
    if "hf" in args.compare:
        try:
            variants["hf"] = (_hf_model(model, tmp), _theirs)
        except UserError as e:  # e.g. an ungated shared expert: no transformers class has one
            skipped["hf"] = str(e).replace("\n", "; ")
    if "llamacpp" in args.compare:
        note = _llama_cpp_note()
        if note is None:
            try:
                n_ctx = args.prompt_len + args.new_tokens
                variants["llamacpp"] = (_llama_model(model, tmp, n_ctx, threads), _llamacpp)
            except UserError as e:  # a model no llama.cpp architecture expresses
                note = str(e).replace("\n", "; ")
        if note is not None:
            skipped["llamacpp"] = note
    for vname, note in skipped.items():
        who = {"hf": "transformers", "llamacpp": "llama.cpp"}[vname]
        print(f"[{name}] {who} comparison skipped: {note}", flush=True)
    return variants, skipped


def run(args) -> int:
    import torch

    from moelab.device import resolve_device
    from moelab.infer.decoding import decode_layout

    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    device, dtype = resolve_device(args.device, "--device"), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    results = {
        "config": {
            k: getattr(args, k)
            for k in ("prompt_len", "new_tokens", "batch_sizes", "repeats", "compare", "compile", "dtype")
        },
        "device": str(device),
        "threads": threads,
        "torch": torch.__version__,
        "models": {},
    }
    if "llamacpp" in args.compare and _llama_cpp_note() is None:
        import llama_cpp

        results["llama_cpp_python"] = llama_cpp.__version__
    for source in list(args.configs) + list(args.run):
        name, model = _build(source, args.prompt_len + args.new_tokens, device, dtype)
        decode_layout(model)
        tmp = tempfile.TemporaryDirectory()
        variants, skipped = _variants(name, model, args, Path(tmp.name), threads)
        vocab = model.cfg.vocab_size
        gen = torch.Generator().manual_seed(1)
        long_prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        short_prompt = torch.randint(0, vocab, (16,), generator=gen).tolist()
        greedy_match = {}
        for vname, (m, fn) in variants.items():  # the same model on every side: greedy continuations agree
            if vname != "moelab":
                _ours(model, short_prompt, 1, 8)
                fn(m, short_prompt, 1, 8)
                greedy_match[vname] = _ours.last_ids == fn.last_ids
                print(f"[{name}] greedy tokens equal to {vname}'s: {greedy_match[vname]}", flush=True)
        samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        gaps: dict[str, list[float]] = {v + sfx: [] for v in variants for _, sfx in CLOCKS}
        for rep in range(args.repeats + 1):  # repeat 0 warms up and is discarded
            for vname, (m, fn) in variants.items():
                s = samples[vname]
                t0, stamps = fn(m, long_prompt, 1, 2)
                if rep:
                    for clock, sfx in CLOCKS:
                        s.setdefault(f"prefill_tok_s{sfx}", []).append(args.prompt_len / (stamps[0][clock] - t0[clock]))
                for b in [1] if vname == "llamacpp" else args.batch_sizes:
                    _, stamps = fn(m, short_prompt, b, args.new_tokens)
                    if not rep:
                        continue
                    for clock, sfx in CLOCKS:
                        times = [st[clock] for st in stamps]
                        rate = (len(times) - 1) * b / (times[-1] - times[0])
                        s.setdefault(f"decode_tok_s_b{b}{sfx}", []).append(rate)
                        if b == 1:
                            gaps[vname + sfx] += [y - x for x, y in zip(times, times[1:], strict=False)]
            print(f"[{name}] repeat {rep}/{args.repeats}", flush=True)
        if "llamacpp" in variants:
            variants["llamacpp"][0].close()
        tmp.cleanup()
        out = {}
        for vname in variants:
            row = {k: statistics.median(v) for k, v in samples[vname].items()}
            for _, sfx in CLOCKS:
                if gaps[vname + sfx]:
                    row[f"latency_ms_p50{sfx}"] = 1e3 * _pct(gaps[vname + sfx], 0.5)
                    row[f"latency_ms_p99{sfx}"] = 1e3 * _pct(gaps[vname + sfx], 0.99)
            out[vname] = row
        for vname in variants:
            if vname != "moelab":
                out[f"greedy_match_{vname}"] = greedy_match[vname]
        ours = [v for v in ("moelab", "moelab_compiled") if v in variants]
        for a in ours:
            for b in variants:
                if b not in (a, "moelab_compiled") and (b != "moelab" or a == "moelab_compiled"):
                    out[f"ratio_{a}_over_{b}"] = {
                        k: out[a][k] / out[b][k] for k in out[a] if "tok_s" in k and k in out[b]
                    }
        for vname, note in skipped.items():
            out[f"{vname}_skipped"] = note
        cfg = model.cfg
        out["model"] = {
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "num_experts": cfg.moe.num_experts,
            "top_k": cfg.moe.top_k,
            "params": sum(p.numel() for p in model.parameters()),
        }
        results["models"][name] = out
        _print(name, out)
        del model, variants
    write_results(args.json_out, results)
    return 0


def _print(name: str, out: dict) -> None:
    print(f"\n{name} ({out['model']['params'] / 1e6:.1f}M params): medians")
    for vname in ("moelab", "moelab_compiled", "hf", "llamacpp"):
        if vname in out:
            print(f"  {vname:15s} " + "  ".join(f"{k}={v:.1f}" for k, v in out[vname].items()))
    for key, ratios in out.items():
        if key.startswith("ratio_"):
            label = key[len("ratio_") :].replace("_over_", " / ")
            print(f"  {label}: " + "  ".join(f"{k}={v:.2f}x" for k, v in ratios.items()))
