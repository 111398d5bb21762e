"""Apply `hf_maps` rules: a moelab state dict -> HF tensors, and HF tensors -> a moelab state dict.

Import is strict: every rule must find its tensor with the right shape, every tensor on disk must be
used by some rule, and `ZeroTensor`s must hold zeros. Problems are collected and reported together,
one line each, naming the tensor and its file.
"""

from __future__ import annotations

import torch

from moelab.config import ModelConfig
from moelab.errors import UserError
from moelab.interop.hf_maps import IGNORED_SUFFIXES, Rename, Rule, StackExperts, ZeroTensor
from moelab.interop.safetensors_dir import TensorSource

MAX_LINES = 6


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every moelab tensor's shape for `cfg`, from a model built on the meta device (no memory)."""
    from moelab.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def to_hf_state(state: dict[str, torch.Tensor], rules: list[Rule], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF tensors (legacy per-expert names) in `dtype`, contiguous and unshared, ready for safetensors."""
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        if isinstance(r, Rename):
            out[r.theirs] = state[r.ours]
        elif isinstance(r, StackExperts):
            w = state[r.ours]  # [E, rows, cols]
            for e, names in enumerate(r.per_expert):
                for name, part in zip(names, w[e].chunk(len(names), dim=0), strict=True):
                    out[name] = part
        else:
            out[r.theirs] = torch.zeros(r.shape)
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class _Problems:
    def __init__(self):
        self.missing: list[str] = []
        self.lines: list[str] = []

    def raise_if_any(self, where: str) -> None:
        lines = list(self.lines)
        if self.missing:
            more = f" (and {len(self.missing) - 3} more)" if len(self.missing) > 3 else ""
            lines.insert(0, f"{where}: missing tensors {', '.join(self.missing[:3])}{more}")
        if lines:
            extra = [f"... and {len(lines) - MAX_LINES} more problems"] if len(lines) > MAX_LINES else []
            raise UserError("\n".join(lines[:MAX_LINES] + extra))


def from_hf_state(src: TensorSource, rules: list[Rule], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Read every rule's tensors from `src` into a moelab state dict (dtypes as stored)."""
    bad = _Problems()

    def read(name: str, shape) -> torch.Tensor | None:
        got = src.shape(name)
        if tuple(got) != tuple(shape):
            bad.lines.append(
                f"{src.where(name)}: tensor {name} has shape {_fmt(got)}, expected {_fmt(shape)} (from config.json)"
            )
            return None
        return src.take(name)

    state: dict[str, torch.Tensor] = {}
    for r in rules:
        if isinstance(r, Rename):
            name = next((n for n in (r.theirs, *r.alt) if n in src), None)
            if name is None:
                bad.missing.append(r.theirs)
            elif (t := read(name, expected[r.ours])) is not None:
                state[r.ours] = t
        elif isinstance(r, StackExperts):
            t = _read_experts(src, r, expected[r.ours], read, bad)
            if t is not None:
                state[r.ours] = t
        elif isinstance(r, ZeroTensor):
            if r.theirs not in src:
                bad.missing.append(r.theirs)
            elif (t := read(r.theirs, r.shape)) is not None and bool(t.any()):
                bad.lines.append(
                    f"{src.where(r.theirs)}: tensor {r.theirs} is not zero, and moelab has no such "
                    "parameter (cannot be expressed)"
                )
    unused = [k for k in src.keys() if k not in src.taken and not k.endswith(IGNORED_SUFFIXES)]
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        bad.lines.append(
            f"{src.dir}: unexpected tensors not used by the {len(rules)}-rule map: {', '.join(unused[:3])}{more}"
        )
    bad.raise_if_any(str(src.dir))
    return state


def _read_experts(src: TensorSource, r: StackExperts, shape, read, bad: _Problems) -> torch.Tensor | None:
    per_expert_present = [n for names in r.per_expert for n in names if n in src]
    if r.fused in src:
        if per_expert_present:
            bad.lines.append(f"{src.dir}: both fused {r.fused} and per-expert {per_expert_present[0]} are present")
            return None
        return read(r.fused, shape)
    _, rows, cols = shape
    experts = []
    for names in r.per_expert:
        parts = []
        for name in names:
            if name not in src:
                bad.missing.append(name)
            elif (t := read(name, (rows // len(names), cols))) is not None:
                parts.append(t)
        if len(parts) == len(names):
            experts.append(torch.cat(parts, dim=0))
    if len(experts) != len(r.per_expert):
        if not per_expert_present:  # neither layout: name the fused one too
            bad.missing.append(r.fused + " (fused layout)")
        return None
    return torch.stack(experts)
