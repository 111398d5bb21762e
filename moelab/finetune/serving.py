"""Several LoRA adapters over one base model, unmerged, for one continuous batch (`moelab serve BASE
--adapter name=RUN ...`).

Every LoRA tensor gets a leading adapter axis: slot 0 is all zeros (the base model itself), slot i the
i-th adapter. Adapters may differ in rank and targets: ranks are zero-padded to the largest (zero rows
of A / columns of B add nothing) and each adapter's alpha / rank is folded into its B, so one module
serves all. The engine tells the modules which slot each row of a batch uses (`AdapterSelect`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.errors import UserError
from moelab.finetune.config import LoRAConfig
from moelab.finetune.lora import AdapterSelect, add_lora, lora_modules


def _read_adapter(run: str, base_fp: str) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    from moelab.checkpoint import load_state, read_config, resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    cfg = read_config(ckpt)
    if not cfg.finetune.is_lora:
        raise UserError(f"--adapter {run}: not a LoRA run (finetune.mode={cfg.finetune.mode})")
    if cfg.finetune.base_fingerprint != base_fp:
        raise UserError(
            f"--adapter {run}: trained on base {cfg.finetune.base}, not on the base being served "
            f"(fingerprint {str(cfg.finetune.base_fingerprint)[:12]} vs {base_fp[:12]})"
        )
    if "router" in cfg.finetune.lora.targets:
        raise UserError(
            f"--adapter {run}: trains the router gates in full, which cannot be switched per request; "
            "serve its merged checkpoint (moelab merge) instead"
        )
    return cfg.finetune.lora, load_state(ckpt / "model.safetensors")


def stack_adapters(model: torch.nn.Module, base_ckpt: Path, adapters: dict[str, str]) -> tuple[AdapterSelect, dict]:
    """Add stacked LoRA modules for `adapters` (name -> run) to the plain base `model` in place.
    Returns (the AdapterSelect the engine drives, name -> slot)."""
    from moelab.finetune.adapters import fingerprint

    base_fp = fingerprint(base_ckpt)
    loaded = [(name, *_read_adapter(run, base_fp)) for name, run in adapters.items()]
    rank = max(cfg.rank for _, cfg, _ in loaded)
    targets = sorted({t for _, cfg, _ in loaded for t in cfg.targets})
    add_lora(model, LoRAConfig(rank=rank, alpha=float(rank), dropout=0.0, targets=targets))  # scale 1
    names = {m: n for n, m in model.named_modules() if m in lora_modules(model)}
    select = AdapterSelect()
    m_slots = len(loaded) + 1
    with torch.no_grad():
        for mod, prefix in names.items():
            for pname, p in list(mod.named_parameters(recurse=False)):
                if pname in ("weight", "bias"):
                    continue
                stacked = p.new_zeros(m_slots, *p.shape)
                is_b = pname.endswith("_b")
                for slot, (_, cfg, weights) in enumerate(loaded, 1):
                    w = weights.get(f"{prefix}.{pname}")
                    if w is None:
                        continue  # this adapter does not target this module: its slot stays zero
                    r = cfg.rank
                    if is_b:
                        stacked[slot, ..., :r] = w.to(p.dtype) * (cfg.alpha / r)
                    else:
                        stacked[slot, ..., :r, :] = w.to(p.dtype)
                setattr(mod, pname, torch.nn.Parameter(stacked, requires_grad=False))
            mod.scale = 1.0
            mod.select = select
    return select, {name: slot for slot, (name, _, _) in enumerate(loaded, 1)}
