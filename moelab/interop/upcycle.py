"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): turn a dense model into an MoE one
by copying each chosen FFN into E experts and adding a freshly initialised router.

With SIGMA = 0 every expert equals the dense FFN and the router's top-k weights sum to 1
(softmax top-k, renormalised, dropless), so the upcycled model computes exactly the dense function
whatever the router picks. SIGMA > 0 adds N(0, (SIGMA * std(W))^2) to each expert's copy of each
weight matrix W, independently per expert, so experts can specialise from step 0.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from moelab.checkpoint import COMPLETE, atomic_dir, load_model, write_model
from moelab.config import Config, DataConfig, ModelConfig
from moelab.errors import UserError
from moelab.fileio import check_output_dir

CHECK_TOLERANCE = 1e-4  # relative to max(1, max |logit|) when SIGMA = 0


def parse_layers(text: str) -> Any:
    """CLI pattern -> `MoEConfig.layers`: all | every:N | first_dense:K | 0,2,5."""
    text = text.strip()
    if re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        return [int(x) for x in text.split(",")]
    return text


def upcycled_config(cfg: ModelConfig, experts: int, top_k: int, layers: Any = "all") -> ModelConfig:
    """The dense config with MoE layers whose experts have the dense FFN's width."""
    if cfg.moe_layer_ids():
        raise UserError(f"the model already has MoE layers {cfg.moe_layer_ids()}; upcycling starts from a dense model")
    if experts < 1 or not 1 <= top_k <= experts:
        raise UserError(
            f"upcycle: expected --experts >= 1 and 1 <= --top-k <= --experts, got --experts {experts} --top-k {top_k}"
        )
    moe = dataclasses.replace(
        cfg.moe,
        num_experts=experts,
        top_k=top_k,
        expert_dim=cfg.ffn_dim,
        layers=layers,
        router="softmax_topk",
        normalize=True,
        routed_scaling_factor=1.0,
        num_shared_experts=0,
        capacity_factor=None,
        eval_capacity_factor=None,
        router_bias=False,
    )
    new = dataclasses.replace(cfg, moe=moe)
    problems = new.validate()
    if problems:
        raise UserError("\n".join(f"upcycle: {p.replace('model.moe.layers', '--layers')}" for p in problems))
    if not new.moe_layer_ids():
        raise UserError(f"upcycle: --layers {layers!r} selects no layer of {cfg.n_layers}")
    return new


@torch.no_grad()
def upcycle_model(
    dense: torch.nn.Module,
    cfg: ModelConfig,
    *,
    experts: int,
    top_k: int,
    layers: Any = "all",
    noise: float = 0.0,
    seed: int = 0,
):
    """(upcycled Transformer in eval mode, its ModelConfig) from a dense moelab Transformer."""
    from moelab.model import Transformer

    if noise < 0:
        raise UserError(f"upcycle: --noise must be >= 0, got {noise}")
    new_cfg = upcycled_config(cfg, experts, top_k, layers)
    torch.manual_seed(seed)  # the routers' N(0, init_std) draw
    model = Transformer(new_cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    dense_state = dense.state_dict()
    moe_ids = set(new_cfg.moe_layer_ids())
    keep = {k: v for k, v in dense_state.items() if not any(k.startswith(f"layers.{i}.ffn.") for i in moe_ids)}
    _, unexpected = model.load_state_dict(keep, strict=False)  # the new experts and routers stay missing
    if unexpected:
        raise RuntimeError(f"dense weights without a place in the upcycled model: {unexpected}")
    for i in moe_ids:
        ffn = dense.layers[i].ffn
        gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight], dim=0)  # [2F, D]
        experts_mod = model.layers[i].ffn.experts
        for e in range(experts):
            experts_mod.gate_up[e] = _jitter(gate_up, ffn.gate_proj.weight, ffn.up_proj.weight, noise, gen)
            experts_mod.down[e] = _jitter(ffn.down_proj.weight, ffn.down_proj.weight, None, noise, gen)
    return model.eval(), new_cfg


def _jitter(w: torch.Tensor, first: torch.Tensor, second: torch.Tensor | None, sigma: float, gen) -> torch.Tensor:
    if sigma == 0:
        return w
    scale = torch.cat(
        [first.std().expand(first.shape[0]), *([second.std().expand(second.shape[0])] if second is not None else [])]
    )[:, None]
    return w + sigma * scale * torch.randn(w.shape, generator=gen, dtype=w.dtype)


@torch.no_grad()
def max_logit_delta(a: torch.nn.Module, b: torch.nn.Module, vocab_size: int, max_len: int, seed: int = 0):
    """(max |delta logit|, max |logit|) on two random sequences."""
    ids = torch.randint(0, vocab_size, (2, min(16, max_len)), generator=torch.Generator().manual_seed(seed))
    la, lb = a(ids).logits.float(), b(ids).logits.float()
    return float((la - lb).abs().max()), float(la.abs().max())


def load_dense(path: str | Path, check: bool = True):
    """(dense Transformer, full Config, tokenizer source, notes) from an HF directory or a moelab run."""
    path = Path(path)
    if (path / "config.json").is_file():
        from moelab.interop.hf import read_hf_model, verify_against_transformers

        model, cfg, spec, notes = read_hf_model(path)
        if check and (report := verify_against_transformers(model, path, spec, notes=notes)) is not None:
            notes.append(report.line())
        full = Config(model=cfg, data=DataConfig(seq_len=min(DataConfig.seq_len, cfg.max_seq_len)))
        return model, full, ("hf", path), notes
    model, full, ckpt = load_model(path)
    return model, full, ("moelab", ckpt / "tokenizer"), []


def upcycle(
    dense_path: str | Path,
    out_dir: str | Path,
    *,
    experts: int,
    top_k: int,
    layers: Any = "all",
    noise: float = 0.0,
    seed: int = 0,
    check: bool = True,
    overwrite: bool = False,
) -> dict:
    """Upcycle DENSE (HF Llama/Qwen2 directory or moelab run) into a moelab checkpoint at `out_dir`.
    Returns a summary (layers, max |delta logit| against the dense model, notes)."""
    from moelab.interop.hf_tokenizer import import_tokenizer

    out = Path(out_dir)
    check_output_dir(out, overwrite, COMPLETE, empty_ok=True)  # before the work, not after
    dense, full, (kind, tok), notes = load_dense(dense_path, check)
    model, cfg = upcycle_model(dense, full.model, experts=experts, top_k=top_k, layers=layers, noise=noise, seed=seed)
    delta, scale = max_logit_delta(model, dense, cfg.vocab_size, cfg.max_seq_len)
    if noise == 0 and delta > CHECK_TOLERANCE * max(1.0, scale):
        raise RuntimeError(f"upcycled model differs from the dense one by {delta:.3g} with --noise 0")
    new_full = dataclasses.replace(full, model=cfg)

    def write(tmp: Path) -> None:
        tok_dir = tok if kind == "moelab" else None
        if kind == "hf":
            notes.append(import_tokenizer(tok, tmp / "tokenizer", cfg.vocab_size))
        write_model(
            tmp,
            model,
            new_full,
            tok_dir,
            extra={
                "upcycled_from": str(Path(dense_path).resolve()),
                "experts": experts,
                "top_k": top_k,
                "noise": noise,
            },
        )

    atomic_dir(out, write, overwrite, COMPLETE)
    return {"moe_layers": cfg.moe_layer_ids(), "max_abs_delta": delta, "max_abs_logit": scale, "notes": notes}
