"""`moelab bench generate`: prefill and decode speed of the generation engine (and transformers').

Per model (a preset config with random weights, or a trained run):
- prefill tokens/s: --prompt-len / (time from the call to the first generated token), one prompt;
- decode tokens/s at each batch size: batch x (--new-tokens - 1) / (time from the first to the last
  generated token), so prefill and setup are excluded; generations are greedy and never stop early;
- per-token latency p50/p99: gaps between consecutive tokens of one decode at batch 1.
Each is measured twice: on the wall clock and on the process's CPU time (keys ending in `_cpu`),
which on a shared machine is the steadier estimate of an idle machine's speed at one thread.
`--compare hf` exports the same weights to transformers (moelab.interop) and times its `generate`
the same way, interleaved with ours in every repeat so machine noise hits both alike.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from moelab.bench import write_results


def add_arguments(p):
    p.add_argument("--configs", nargs="*", default=["configs/tiny.yaml", "configs/small.yaml"],
                   help="preset configs to build with random weights (default tiny and small)")
    p.add_argument("--run", action="append", default=[], help="also (or instead) time a trained run/checkpoint")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median reported)")
    p.add_argument("--compare", nargs="*", default=[], choices=["hf"], help="also time transformers' generate")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
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


def _ours(model, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, list[float]]:
    """(start time, timestamps of each step's tokens) for a greedy generation through the engine."""
    from moelab.infer.sampling import SamplingParams
    from moelab.infer.scheduler import Engine

    stamps: list[tuple[float, float]] = []
    t0 = _now()
    engine = Engine(model, _IdTokenizer(), max_batch=batch, max_len=len(prompt) + new_tokens)
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


def _theirs(hf, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, list[float]]:
    import torch

    stamps: list[tuple[float, float]] = []

    class Stamp:  # transformers' streamer protocol: put() per step (the prompt first), end()
        def put(self, value):
            stamps.append(_now())

        def end(self):
            pass

    ids = torch.tensor([prompt] * batch)
    t0 = _now()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                          streamer=Stamp())
    assert out.shape[1] == len(prompt) + new_tokens
    _theirs.last_ids = out[0, len(prompt):].tolist()
    return t0, stamps[1:]


def _hf_model(model, tmp: Path):
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


def _build(source: str, min_len: int):
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


def run(args) -> int:
    import torch

    from moelab.errors import UserError
    from moelab.infer.prepare import decode_layout

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"config": {k: getattr(args, k) for k in ("prompt_len", "new_tokens", "batch_sizes", "repeats",
                                                        "compare")},
               "threads": torch.get_num_threads(), "torch": torch.__version__, "models": {}}
    for source in list(args.configs) + list(args.run):
        name, model = _build(source, args.prompt_len + args.new_tokens)
        decode_layout(model)
        variants = {"moelab": (model, _ours)}
        tmp = tempfile.TemporaryDirectory()
        hf_note = None
        if "hf" in args.compare:
            try:
                variants["hf"] = (_hf_model(model, Path(tmp.name)), _theirs)
            except UserError as e:  # e.g. an ungated shared expert: no transformers class has one
                hf_note = str(e).replace("\n", "; ")
                print(f"[{name}] transformers comparison skipped: {hf_note}", flush=True)
        vocab = model.cfg.vocab_size
        gen = torch.Generator().manual_seed(1)
        long_prompt = torch.randint(0, vocab, (args.prompt_len,), generator=gen).tolist()
        short_prompt = torch.randint(0, vocab, (16,), generator=gen).tolist()
        if "hf" in variants:  # the same model on both sides: greedy continuations agree
            _ours(model, short_prompt, 1, 8)
            _theirs(variants["hf"][0], short_prompt, 1, 8)
            greedy_match = _ours.last_ids == _theirs.last_ids
            print(f"[{name}] greedy tokens equal to transformers': {greedy_match}", flush=True)
        samples: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        gaps: dict[str, list[float]] = {v + sfx: [] for v in variants for _, sfx in CLOCKS}
        for rep in range(args.repeats + 1):  # repeat 0 warms up and is discarded
            for vname, (m, fn) in variants.items():
                s = samples[vname]
                t0, stamps = fn(m, long_prompt, 1, 2)
                if rep:
                    for clock, sfx in CLOCKS:
                        s.setdefault(f"prefill_tok_s{sfx}", []).append(args.prompt_len / (stamps[0][clock] - t0[clock]))
                for b in args.batch_sizes:
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
        tmp.cleanup()
        out = {}
        for vname in variants:
            row = {k: statistics.median(v) for k, v in samples[vname].items()}
            for _, sfx in CLOCKS:
                if gaps[vname + sfx]:
                    row[f"latency_ms_p50{sfx}"] = 1e3 * _pct(gaps[vname + sfx], 0.5)
                    row[f"latency_ms_p99{sfx}"] = 1e3 * _pct(gaps[vname + sfx], 0.99)
            out[vname] = row
        if "hf" in out:
            out["greedy_match_hf"] = greedy_match
            out["ratio_moelab_over_hf"] = {k: out["moelab"][k] / out["hf"][k] for k in out["moelab"]
                                           if "tok_s" in k and k in out["hf"]}
        if hf_note:
            out["hf_skipped"] = hf_note
        cfg = model.cfg
        out["model"] = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "num_experts": cfg.moe.num_experts,
                        "top_k": cfg.moe.top_k, "params": sum(p.numel() for p in model.parameters())}
        results["models"][name] = out
        _print(name, out)
        del model, variants
    write_results(args.json_out, results)
    return 0


def _print(name: str, out: dict) -> None:
    print(f"\n{name} ({out['model']['params'] / 1e6:.1f}M params): medians")
    for vname in ("moelab", "hf"):
        if vname in out:
            print(f"  {vname:7s} " + "  ".join(f"{k}={v:.1f}" for k, v in out[vname].items()))
    if "ratio_moelab_over_hf" in out:
        print("  ratio   " + "  ".join(f"{k}={v:.2f}x" for k, v in out["ratio_moelab_over_hf"].items()))
