"""GGUF export for llama.cpp, with the tokenizer embedded, checked by running llama.cpp itself.

The llama.cpp architecture follows from the model (llama.cpp fixes each one's routing rules in code):
- `llama` (Mixtral-style MoE, or dense): renormalised top-k, no qk-norm, no shared expert. llama.cpp
  rotates interleaved pairs here, so q/k rows are permuted per head from our rotate-half layout
  (the `permute` of llama.cpp's convert_hf_to_gguf.py);
- `bailingmoe`: renormalised or not (a GGUF key says which), plus an ungated shared expert counted in
  routed experts' widths; interleaved RoPE as `llama`, so the same permutation;
- `qwen2moe`: un-normalised top-k plus a sigmoid-gated shared expert; `qwen3moe`: renormalised
  top-k and per-head qk-norm; `olmoe`: un-normalised top-k and full-width qk-norm. These three use
  rotate-half RoPE (NEOX) like moelab, so no permutation.
Every layer must be MoE (or, for `llama`, every layer dense): llama.cpp has no per-layer mix here.

Tokenizer: llama.cpp's SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`). A moelab
SentencePiece model gives its pieces, scores and types; the byte tokenizer is expressed as 256 byte
pieces with byte 0x20 as the piece "▁" (llama.cpp writes spaces as "▁" before looking pieces up).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from moelab.config import ModelConfig
from moelab.errors import UserError
from moelab.fileio import parent_problem, remove_stale_siblings, write_file_atomic
from moelab.interop.hf import ConversionResult
from moelab.interop.hf_config import routed_normalized
from moelab.interop.parity import ParityReport

# Relative max |delta logit| llama.cpp may show (fp32 KV cache); f16 weights and q8_0 (which also quantises the
# activations in its dot products) are compared against moelab in fp32, so they get more room.
TOLERANCES = {"f32": 1e-4, "f16": 1e-2, "q8_0": 1.5e-1}
SP_SPACE = "\u2581"
INTERLEAVED_ROPE = ("llama", "bailingmoe")  # llama.cpp's LLAMA_ROPE_TYPE_NORM; the others rotate halves (NEOX)
UNTIED_ONLY = ("qwen2moe", "olmoe", "bailingmoe")  # these always read output.weight

WRITER_KEY = "moelab.writer"


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_arch(cfg: ModelConfig) -> str:
    """The llama.cpp architecture that computes exactly what `cfg` does, else UserError with why."""
    m, moe_ids = cfg.moe, cfg.moe_layer_ids()
    p = []
    if moe_ids and len(moe_ids) != cfg.n_layers:
        p.append(
            f"layers {sorted(set(range(cfg.n_layers)) - set(moe_ids))} are dense but others are MoE "
            "(llama.cpp needs all MoE or all dense)"
        )
    if moe_ids:
        if m.router not in ("softmax_topk", "topk_softmax") or m.routed_scaling_factor != 1.0:
            p.append(f"router {m.router!r} (scale {m.routed_scaling_factor}) is not softmax top-k")
        if m.capacity_factor is not None or m.eval_capacity_factor is not None:
            p.append("capacity limits cannot be expressed (llama.cpp is dropless)")
    if p:
        raise UserError("cannot export as GGUF: " + "; ".join(p))
    if not moe_ids:
        if cfg.qk_norm == "none":
            return "llama"
        raise UserError(
            f"cannot export as GGUF: no llama.cpp architecture has a dense model with "
            f"qk_norm={cfg.qk_norm!r} (llama.cpp's llama has no qk-norm)"
        )
    norm = routed_normalized(cfg)
    full_width = cfg.n_heads * cfg.hdim == cfg.d_model
    shared_width = (m.shared_expert_dim or m.expert_dim) * m.num_shared_experts
    if m.num_shared_experts:
        if cfg.qk_norm != "none":
            why = (
                f"shared experts with qk_norm={cfg.qk_norm!r} (its shared-expert architectures, qwen2moe and "
                "bailingmoe, have no qk-norm)"
            )
        elif m.shared_expert_gate and norm:
            why = (
                "a sigmoid-gated shared expert with renormalised top-k weights (qwen2moe, its one gated shared "
                "expert, never renormalises: moe.normalize=false)"
            )
        elif m.shared_expert_gate and not full_width:
            why = (
                f"a gated shared expert with n_heads * head_dim = {cfg.n_heads * cfg.hdim} != d_model "
                f"{cfg.d_model} (qwen2moe sizes attention by d_model)"
            )
        elif m.shared_expert_gate:
            return "qwen2moe"
        elif shared_width % m.expert_dim:
            why = (
                f"an ungated shared expert of width {shared_width}, not a multiple of the expert width "
                f"{m.expert_dim} (bailingmoe counts shared experts in routed experts' widths)"
            )
        else:
            return "bailingmoe"
    elif cfg.qk_norm == "none":
        if norm:
            return "llama"
        why = (
            "un-normalised top-k weights without qk-norm or a shared expert (llama/Mixtral always "
            "renormalises: moe.normalize=true)"
        )
    elif cfg.qk_norm == "head":
        if norm:
            return "qwen3moe"
        why = "per-head qk-norm with un-normalised top-k weights (qwen3moe always renormalises)"
    elif norm:
        why = "full-width qk-norm with renormalised top-k weights (olmoe never renormalises)"
    elif not full_width or cfg.kv_heads != cfg.n_heads:
        why = (
            f"full-width qk-norm with kv_heads {cfg.kv_heads}/{cfg.n_heads}, n_heads * head_dim "
            f"{cfg.n_heads * cfg.hdim} / d_model {cfg.d_model} (olmoe sizes both norms by d_model: no GQA)"
        )
    else:
        return "olmoe"
    raise UserError(f"cannot export as GGUF: no llama.cpp architecture has {why}")


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows [x0..x_{h/2-1}, y0..] (rotate-half) -> [x0, y0, x1, y1, ...] (interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Tracked(dict):
    """A state dict that records which entries were read, so nothing is dropped silently."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.used.add(key)
        return super().get(key, default)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> fp32 tensor (numpy order; ggml reverses the dims). Raises UserError if the
    model holds a tensor the mapping does not place."""
    state = _Tracked(state)
    out = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings or arch in UNTIED_ONLY:
        out["output.weight"] = state.get("lm_head.weight", state["embed.weight"])
    moe_ids = set(cfg.moe_layer_ids())
    for i in range(cfg.n_layers):
        s, b = f"layers.{i}.", f"blk.{i}."
        q, k = state[s + "attn.q_proj.weight"], state[s + "attn.k_proj.weight"]
        qb, kb = state.get(s + "attn.q_proj.bias"), state.get(s + "attn.k_proj.bias")
        if arch in INTERLEAVED_ROPE:
            q, k = permute_rope(q, cfg.n_heads), permute_rope(k, cfg.kv_heads)
            if qb is not None:
                qb, kb = permute_rope(qb, cfg.n_heads), permute_rope(kb, cfg.kv_heads)
        out.update(
            {
                b + "attn_norm.weight": state[s + "attn_norm.weight"],
                b + "attn_q.weight": q,
                b + "attn_k.weight": k,
                b + "attn_v.weight": state[s + "attn.v_proj.weight"],
                b + "attn_output.weight": state[s + "attn.o_proj.weight"],
                b + "ffn_norm.weight": state[s + "ffn_norm.weight"],
            }
        )
        if qb is not None:
            out.update({b + "attn_q.bias": qb, b + "attn_k.bias": kb, b + "attn_v.bias": state[s + "attn.v_proj.bias"]})
        if cfg.qk_norm != "none":
            out[b + "attn_q_norm.weight"] = state[s + "attn.q_norm.weight"]
            out[b + "attn_k_norm.weight"] = state[s + "attn.k_norm.weight"]
        if i not in moe_ids:
            for name in ("gate", "up", "down"):
                out[f"{b}ffn_{name}.weight"] = state[f"{s}ffn.{name}_proj.weight"]
            continue
        f = cfg.moe.expert_dim
        gate_up = state[s + "ffn.experts.gate_up"]  # [E, 2F, D]: gate rows then up rows
        out.update(
            {
                b + "ffn_gate_inp.weight": state[s + "ffn.router.weight"],
                b + "ffn_gate_exps.weight": gate_up[:, :f],
                b + "ffn_up_exps.weight": gate_up[:, f:],
                b + "ffn_down_exps.weight": state[s + "ffn.experts.down"],
            }
        )
        if cfg.moe.num_shared_experts:
            for name in ("gate", "up", "down"):
                out[f"{b}ffn_{name}_shexp.weight"] = state[f"{s}ffn.shared.{name}_proj.weight"]
            if cfg.moe.shared_expert_gate:
                out[b + "ffn_gate_inp_shexp.weight"] = state[s + "ffn.shared_gate.weight"].reshape(-1)
    unplaced = sorted(set(state) - state.used - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if unplaced:
        raise UserError(f"cannot export as GGUF ({arch}): no place for {unplaced[:3]}")
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def gguf_vocab(tok, vocab_size: int) -> dict:
    """tokens, scores, token types and special ids for llama.cpp's SentencePiece-style tokenizer."""
    from gguf import TokenType

    if tok.kind == "byte":
        tokens = [SP_SPACE if b == 0x20 else f"<0x{b:02X}>" for b in range(256)]
        types = [TokenType.NORMAL if b == 0x20 else TokenType.BYTE for b in range(256)]
        scores = [0.0] * 256
        unk, space_prefix = 0, False
    else:
        sp = tok._sp
        tokens, scores, types = [], [], []
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            types.append(
                TokenType.UNKNOWN
                if sp.is_unknown(i)
                else TokenType.CONTROL
                if sp.is_control(i)
                else TokenType.BYTE
                if sp.is_byte(i)
                else TokenType.UNUSED
                if sp.is_unused(i)
                else TokenType.NORMAL
            )
        unk = sp.unk_id()
        first = tok.encode("a")  # a dummy-prefix model writes "a" as "▁a"
        space_prefix = bool(first) and sp.id_to_piece(first[0]).startswith(SP_SPACE)
    for special, i in tok.special_tokens.items():
        if i >= len(tokens):
            tokens += [f"[PAD{j}]" for j in range(len(tokens), i)] + [special]
            scores += [0.0] * (i + 1 - len(scores))
            types += [TokenType.UNUSED] * (i - len(types)) + [TokenType.CONTROL]
    if len(tokens) > vocab_size:
        raise UserError(
            f"cannot export as GGUF: the tokenizer has {len(tokens)} tokens but the model only {vocab_size} ids"
        )
    pad = vocab_size - len(tokens)
    return {
        "tokens": tokens + [f"[PAD{j}]" for j in range(len(tokens), vocab_size)],
        "scores": scores + [0.0] * pad,
        "types": types + [TokenType.UNUSED] * pad,
        "unk": unk,
        "eos": tok.eod_id,
        "space_prefix": space_prefix,
    }


def _encode(name: str, t: torch.Tensor, dtype: str):
    """(array, raw dtype or None). Vectors and routers stay f32; q8_0 needs rows of 32k values."""
    from gguf import GGMLQuantizationType, quants

    a = t.numpy()
    if dtype == "f32" or a.ndim == 1 or "ffn_gate_inp" in name:
        return a, None
    if dtype == "q8_0" and a.shape[-1] % 32 == 0:
        return quants.quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def write_gguf(
    path: Path, cfg: ModelConfig, arch: str, tensors: dict[str, torch.Tensor], vocab: dict, dtype: str, name: str
) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    m, moe = cfg.moe, bool(cfg.moe_layer_ids())
    w.add_name(name)
    w.add_string(WRITER_KEY, "moelab")  # lets --overwrite tell a file moelab wrote from a user's
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(m.expert_dim if moe and arch in ("llama", "olmoe") else cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.hdim)
    w.add_value_length(cfg.hdim)
    w.add_rope_dimension_count(cfg.hdim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if moe:
        w.add_expert_count(m.num_experts)
        w.add_expert_used_count(m.top_k)
        if arch != "llama":
            w.add_expert_feed_forward_length(m.expert_dim)
        if m.num_shared_experts:
            width = (m.shared_expert_dim or m.expert_dim) * m.num_shared_experts
            w.add_expert_shared_feed_forward_length(width)
            if arch == "bailingmoe":  # its shared FFN is expert_shared_count routed experts wide
                w.add_expert_shared_count(width // m.expert_dim)
                w.add_expert_weights_norm(routed_normalized(cfg))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    w.add_unk_token_id(vocab["unk"])
    w.add_eos_token_id(vocab["eos"])
    w.add_bos_token_id(vocab["eos"])  # never added (add_bos_token false); llama.cpp wants some id
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab["space_prefix"])
    for tname, t in tensors.items():
        arr, raw = _encode(tname, t, dtype)
        w.add_tensor(tname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_model_gguf(path: str | Path, model, tok=None, dtype: str = "f32", name: str = "moelab") -> str:
    """Write the in-memory `model` (with tokenizer `tok`) as GGUF at `path`, read it back, return the arch.
    Without `tok` the byte vocabulary stands in: enough for callers that feed token ids (benchmarks)."""
    from moelab.tokenizer import ByteTokenizer

    cfg = model.cfg
    arch = gguf_arch(cfg)
    if tok is None:
        if cfg.vocab_size < 257:
            raise UserError(
                f"cannot export as GGUF without a tokenizer: the stand-in byte vocabulary needs "
                f"vocab_size >= 257, the model has {cfg.vocab_size}"
            )
        tok = ByteTokenizer()
    vocab = gguf_vocab(tok, cfg.vocab_size)
    tensors = gguf_tensors(model.state_dict(), cfg, arch)
    write_gguf(Path(path), cfg, arch, tensors, vocab, dtype, name)
    _read_back(Path(path), tensors)
    return arch


def _is_moelab_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return False
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get(WRITER_KEY)
        return field is not None and bytes(field.parts[field.data[0]]).decode("utf-8", "replace") == "moelab"
    except (OSError, ValueError, KeyError, IndexError):
        return False


def check_output_file(out: Path, overwrite: bool) -> None:
    """Refuse an output path that cannot or must not be written: a file in the way of its directory, a
    directory, an existing file without --overwrite, or with it one that is not a GGUF file moelab wrote
    (so a typo never replaces a user's notes.txt or a dataset's meta.json)."""
    problem = parent_problem(out)
    if problem:
        raise UserError(f"{out}: cannot write the output file ({problem})")
    if out.is_dir():
        raise UserError(f"{out}: is a directory; expected the name of a .gguf file to write")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out}: already exists (choose a new file name or pass --overwrite)")
        if not _is_moelab_gguf(out):
            raise UserError(f"{out}: refusing to replace it: --overwrite only replaces a GGUF file moelab wrote")


def export_gguf(
    run: str | Path,
    out_file: str | Path,
    *,
    dtype: str = "f32",
    check: bool = True,
    tolerance: float | None = None,
    overwrite: bool = False,
) -> ConversionResult:
    """Write run/checkpoint `run` as one GGUF file; with llama-cpp-python installed, run it and compare."""
    from moelab.checkpoint import load_model
    from moelab.tokenizer import Tokenizer

    out = Path(out_file)
    if importlib.util.find_spec("gguf") is None:
        raise UserError("the gguf package is not installed (pip install 'moelab[interop]')")
    if dtype not in TOLERANCES:
        raise UserError(f"--dtype: expected one of {', '.join(TOLERANCES)}, got {dtype!r}")
    check_output_file(out, overwrite)
    model, full, ckpt = load_model(run)
    gguf_arch(full.model)  # refuse an inexpressible model before asking for its tokenizer
    if not (ckpt / "tokenizer" / "tokenizer.json").is_file():
        raise UserError(f"{ckpt}: no tokenizer/ in the checkpoint; a GGUF file must embed one")
    tok = Tokenizer.load(ckpt / "tokenizer")
    result = ConversionResult(out, "")

    def write(tmp: Path) -> None:  # checked on the temporary file: a failed check replaces nothing
        result.arch = write_model_gguf(tmp, model, tok, dtype, Path(run).name)
        if check and llama_cpp_available():
            from moelab.interop.llama_cpp_check import compare_llama_cpp

            result.report, tok_note = compare_llama_cpp(tmp, model, tok)
            result.notes.append(tok_note)
            limit = TOLERANCES[dtype] if tolerance is None else tolerance
            result.report.check(limit, f"GGUF export ({result.arch}, {dtype})", rounded=dtype != "f32")
        elif check:
            result.notes.append("llama-cpp-python is not installed: the llama.cpp logit check was skipped")

    remove_stale_siblings(out)
    write_file_atomic(out, write)
    return result


def _read_back(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor is in the file with its shape (ggml order is reversed) and decodes to its source:
    exactly for f32, rounded to the nearest f16 for f16, within half a step plus the step's own f16
    rounding for q8_0. Catches a tensor written under the wrong name, transposed or mis-encoded."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    reader = gguf.GGUFReader(str(path))
    found = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    want = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != want:
        bad = sorted(set(found.items()) ^ set(want.items()))[:3]
        raise RuntimeError(f"GGUF read-back differs from what was written: {bad}")
    for t in reader.tensors:
        src = tensors[t.name].numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
        if t.tensor_type == Q.Q8_0:
            # |q d16 - x| <= d/2 + 127 |d16 - d|, d = the block's step max|x| / 127, d16 = d rounded to f16
            step = np.abs(src.reshape(-1, 32)).max(-1, keepdims=True) / 127
            ok = (np.abs(got - src).reshape(-1, 32) <= step * (0.5 + 127 * 2.0**-11) * (1 + 1e-6)).all()
        else:
            ok = np.array_equal(got, src.astype(np.float16).astype(np.float32) if t.tensor_type == Q.F16 else src)
        if not ok:
            raise RuntimeError(f"GGUF read-back: {t.name} ({t.tensor_type.name}) does not decode to its source")


__all__ = ["ParityReport", "export_gguf", "write_model_gguf", "gguf_arch", "gguf_tensors", "gguf_vocab", "permute_rope"]
