"""Hugging Face import and export, each proving itself before anything is written.

`export_hf(run, out_dir)` writes config.json + safetensors (+ tokenizer files when expressible) that
`AutoModelForCausalLM.from_pretrained` loads as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE (or dense
Llama). Before the output directory appears, the written files are read back through the importer
(bit-equal to the source weights) and, when transformers is installed, loaded by transformers and
run side by side with moelab (max |delta logit|, greedy continuation).

`import_hf(hf_dir, out_dir)` reads single-file or sharded safetensors in either expert layout into an
ordinary moelab checkpoint directory (config.yaml + model.safetensors [+ tokenizer/] + COMPLETE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelab import fileio
from moelab.checkpoint import COMPLETE, assign_state, atomic_dir, load_model, own_state_names, state_problems
from moelab.config import Config, DataConfig, ModelConfig
from moelab.errors import UserError
from moelab.interop import hf_tokenizer
from moelab.interop.convert import expected_shapes, from_hf_state, to_hf_state
from moelab.interop.hf_config import choose_arch, export_problems, from_hf_config, to_hf_config
from moelab.interop.hf_maps import ARCHS, ArchSpec, ZeroTensor, weight_map
from moelab.interop.parity import (
    DEFAULT_TOLERANCE,
    ParityReport,
    compare,
    load_transformers_model,
    transformers_available,
)
from moelab.interop.safetensors_dir import TensorSource, write_safetensors_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConversionResult:
    out: Path
    arch: str
    report: ParityReport | None = None  # None when transformers is not installed or the check was skipped
    notes: list[str] = field(default_factory=list)


def read_hf_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: no such directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: not found (a Hugging Face model directory has config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------------
# Import


def _all_biases_zero(src: TensorSource, cfg: ModelConfig) -> bool:
    names = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(cfg.n_layers) for p in "qkv"]
    return all(n in src for n in names) and not any(bool(src.peek(n).any()) for n in names)


def read_hf_model(hf_dir: str | Path):
    """(moelab Transformer in eval mode, ModelConfig, ArchSpec, notes) from an HF directory, with
    every tensor accounted for. No transformers needed."""
    from moelab.model import Transformer

    hf_dir = Path(hf_dir)
    data = read_hf_config(hf_dir)
    cfg, spec, notes = from_hf_config(data, str(hf_dir / "config.json"))
    with TensorSource(hf_dir) as src:
        hf_bias = cfg.qkv_bias
        if hf_bias and _all_biases_zero(src, cfg):
            cfg.qkv_bias = False  # zero q/k/v biases (Qwen2 always has them) are no biases at all
        tied_head = src.take("lm_head.weight") if cfg.tie_embeddings and "lm_head.weight" in src else None
        state = from_hf_state(src, weight_map(cfg, spec, hf_bias=hf_bias), expected_shapes(cfg))
    if tied_head is not None and not torch.equal(tied_head.to(state["embed.weight"].dtype), state["embed.weight"]):
        raise UserError(f"{hf_dir}: lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings=true")
    with torch.device("meta"):
        model = Transformer(cfg)
    problems = state_problems(own_state_names(model), state)
    if problems:  # the weight map and the model disagree: a bug, not bad input
        raise RuntimeError(f"weight map out of sync with the model: {problems}")
    assign_state(model, state)
    model.init_buffers("cpu")
    return model.eval(), cfg, spec, notes


def verify_against_transformers(
    model,
    hf_dir: Path,
    spec: ArchSpec,
    tolerance: float = DEFAULT_TOLERANCE,
    notes: list[str] | None = None,
    label: str | None = None,
) -> ParityReport | None:
    """Compare `model` with transformers' reading of `hf_dir`; raise UserError beyond `tolerance`.
    Returns None (and adds a note) when transformers is not installed."""
    if not transformers_available():
        if notes is not None:
            notes.append("transformers is not installed: the logit parity check was skipped")
        return None
    theirs = load_transformers_model(hf_dir, spec)
    report = compare(model, theirs, model.cfg.vocab_size, model.cfg.max_seq_len)
    report.check(tolerance, label or str(hf_dir))
    return report


def import_hf(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert an HF directory into a moelab checkpoint directory at `out_dir`."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    fileio.check_output_dir(out, overwrite, COMPLETE, empty_ok=True)  # before the work, not after
    model, cfg, spec, notes = read_hf_model(hf_dir)
    result = ConversionResult(out, spec.model_type, notes=notes)
    if check:
        result.report = verify_against_transformers(model, hf_dir, spec, tolerance, notes)
    full = Config(model=cfg, data=DataConfig(seq_len=min(DataConfig.seq_len, cfg.max_seq_len)))

    def write(tmp: Path) -> None:
        from moelab.checkpoint import write_model

        tok_note = hf_tokenizer.import_tokenizer(hf_dir, tmp / "tokenizer", cfg.vocab_size)
        notes.append(tok_note)
        write_model(
            tmp, model, full, None, extra={"imported_from": str(hf_dir.resolve()), "architecture": spec.model_type}
        )

    atomic_dir(out, write, overwrite, COMPLETE)
    return result


# ----------------------------------------------------------------------------------------------------
# Export


def resolve_arch(cfg: ModelConfig, arch: str | None) -> ArchSpec:
    if arch is None:
        return choose_arch(cfg)
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    problems = export_problems(cfg, spec)
    if problems:
        raise UserError("\n".join(f"cannot export as {arch}: {p}" for p in problems))
    return spec


def export_hf(
    run: str | Path,
    out_dir: str | Path,
    *,
    arch: str | None = None,
    dtype: str = "float32",
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> ConversionResult:
    """Write run/checkpoint `run` as a Hugging Face model directory `out_dir`."""
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    fileio.check_output_dir(out, overwrite, COMPLETE, empty_ok=True)  # before the work, not after
    model, full, ckpt = load_model(run)
    cfg = full.model
    spec = resolve_arch(cfg, arch)
    rules = weight_map(cfg, spec)
    source = {k: v.detach().float() for k, v in model.state_dict().items()}
    mapped = {r.ours for r in rules if not isinstance(r, ZeroTensor)}
    mapped |= {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(source) - mapped:  # never drop a tensor silently
        raise UserError(f"cannot export as {spec.model_type}: it has no place for {sorted(set(source) - mapped)[:3]}")
    tensors = to_hf_state(source, rules, DTYPES[dtype])
    result = ConversionResult(out, spec.model_type)

    def write(tmp: Path) -> None:
        special, tok_note = hf_tokenizer.export_tokenizer(ckpt / "tokenizer", tmp)
        result.notes.append(tok_note)
        write_safetensors_dir(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(
            json.dumps(to_hf_config(cfg, spec, dtype, special), indent=2) + "\n", encoding="utf-8"
        )
        result.report = _verify_export(tmp, spec, source, DTYPES[dtype], check, tolerance, result.notes)

    atomic_dir(out, write, overwrite, COMPLETE)
    return result


def _verify_export(
    tmp: Path,
    spec: ArchSpec,
    source: dict[str, torch.Tensor],
    dtype: torch.dtype,
    check: bool,
    tolerance: float,
    notes: list[str],
) -> ParityReport | None:
    """Read the written files back with the importer (must equal the source weights rounded to
    `dtype`), then compare against transformers' reading of the same files."""
    ours, _, _, _ = read_hf_model(tmp)
    for name, t in ours.state_dict().items():
        want = source[name].to(dtype).float()
        if not torch.equal(t, want):  # a mapping bug, never the user's input
            raise RuntimeError(f"export round trip changed {name}: max delta {(t - want).abs().max():.3g}")
    if not check:
        return None
    return verify_against_transformers(ours, tmp, spec, tolerance, notes, f"export as {spec.model_type}")
