"""LoRA modules and fine-tuning modes applied to a built `Transformer`, and merging them back.

- `LoRALinear` replaces an `nn.Linear` in place and keeps its `weight` / `bias` parameters under the same
  names, so a LoRA model's state dict is the base's plus `*.lora_a` / `*.lora_b`.
- `ExpertLoRA` hangs off `ExpertFFN.lora`; the expert backend runs its per-expert A / B next to the base
  weights (`moelab/kernels/lora.py` explains the layout).
- Several adapters can be stacked on one base for serving (`stack_adapters`): every LoRA tensor gets a
  leading adapter axis, slot 0 all zeros (= the base model), and `AdapterSelect.batch` [B] says which
  slot each sequence of the batch uses. Nothing is merged, so one batch mixes adapters freely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moelab.finetune.config import FinetuneConfig, LoRAConfig
from moelab.kernels.lora import ExpertLoRA as ExpertDeltas
from moelab.kernels.lora import merged_weights


class AdapterSelect:
    """Which adapter slot each sequence of the next forward uses (multi-adapter serving); shared by
    every LoRA module of one model. `batch` None = slot 1 ... only stacked models read it."""

    def __init__(self):
        self.batch: torch.Tensor | None = None  # [B] long


def _init_a(a: torch.Tensor) -> None:
    # PEFT's default: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)); B = 0, so training starts at the base.
    bound = 1.0 / math.sqrt(a.shape[-1])
    nn.init.uniform_(a, -bound, bound)


class LoRALinear(nn.Linear):
    """y = x W^T + b + s * drop(x) A^T B^T, A [r, in], B [out, r] (stacked: [M, r, in], [M, out, r])."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale, self.dropout = alpha / rank, dropout
        dev = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        _init_a(self.lora_a)
        self.select: AdapterSelect | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        xd = F.dropout(x, self.dropout, self.training) if self.dropout else x
        if self.lora_a.ndim == 2:
            return y + F.linear(F.linear(xd, self.lora_a), self.lora_b) * self.scale
        ids = self.select.batch  # [B]: x is [B, S, in]
        a, b = self.lora_a[ids].to(x.dtype), self.lora_b[ids].to(x.dtype)
        t = torch.bmm(xd, a.transpose(1, 2))  # [B, S, r]
        return y + torch.bmm(t, b.transpose(1, 2)) * self.scale

    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding W + s B A (same parameter objects, updated in place)."""
        with torch.no_grad():
            self.weight += (self.lora_b @ self.lora_a).to(self.weight.dtype) * self.scale
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain


class ExpertLoRA(nn.Module):
    """Per-expert LoRA for the stacked routed experts: gu_a [E, r, D], gu_b [E, 2F, r], dn_a [E, r, F],
    dn_b [E, D, r] (stacked adapters: a leading [M] axis)."""

    def __init__(
        self, num_experts: int, d_model: int, expert_dim: int, rank: int, alpha: float, dropout: float, device=None
    ):
        super().__init__()
        e, d, f = num_experts, d_model, expert_dim
        self.gu_a = nn.Parameter(torch.empty(e, rank, d, device=device))
        self.gu_b = nn.Parameter(torch.zeros(e, 2 * f, rank, device=device))
        self.dn_a = nn.Parameter(torch.empty(e, rank, f, device=device))
        self.dn_b = nn.Parameter(torch.zeros(e, d, rank, device=device))
        _init_a(self.gu_a)
        _init_a(self.dn_a)
        self.scale, self.dropout = alpha / rank, dropout
        self.select: AdapterSelect | None = None

    def deltas(self, x: torch.Tensor) -> ExpertDeltas:
        """The backend's view for a forward over x [T, D] (T = B * S tokens)."""
        token_adapter = None
        if self.gu_a.ndim == 4:
            ids = self.select.batch
            token_adapter = ids.repeat_interleave(x.shape[0] // ids.shape[0])
        return ExpertDeltas(
            self.gu_a,
            self.gu_b,
            self.dn_a,
            self.dn_b,
            self.scale,
            self.dropout if self.training else 0.0,
            token_adapter,
        )


# ----------------------------------------------------------------------------------------------------
# Applying a fine-tuning mode


def _is_router(name: str) -> bool:
    return ".router." in name or name.endswith("shared_gate.weight")


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _lora_linears(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every nn.Linear a LoRA target names."""
    from moelab.model.moe import MoELayer

    want = {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.o"}
    found = []
    for block in model.layers:
        for attr, target in want.items():
            if "attn" in targets or target in targets:
                found.append((block.attn, attr))
        ffn = block.ffn
        swiglu = None
        if isinstance(ffn, MoELayer):
            swiglu = ffn.shared if "shared" in targets else None
        elif "dense" in targets:
            swiglu = ffn
        if swiglu is not None:
            found += [(swiglu, a) for a in ("gate_proj", "up_proj", "down_proj")]
    return found


def add_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    """Insert LoRA modules for `cfg.targets` (the model's own weights are left as they are)."""
    for parent, attr in _lora_linears(model, cfg.targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg.rank, cfg.alpha, cfg.dropout))
    if "experts" in cfg.targets:
        for layer in model.moe_layers.values():
            ex = layer.experts
            e, f2, d = ex.gate_up.shape
            ex.lora = ExpertLoRA(e, d, f2 // 2, cfg.rank, cfg.alpha, cfg.dropout, device=ex.gate_up.device)


def apply_finetune(model: nn.Module, cfg: FinetuneConfig) -> dict:
    """Freeze what `cfg.mode` does not train (adding LoRA modules for mode `lora`); returns counts
    {"trainable", "total"} of parameters (LoRA ones included in the total)."""
    mode = cfg.mode
    if mode == "lora":
        add_lora(model, cfg.lora)
    for name, p in model.named_parameters():
        if mode == "all":
            train = True
        elif mode == "router":
            train = _is_router(name)
        elif mode == "experts":
            train = _is_expert(name) and ".lora." not in name
        elif mode == "non_experts":
            train = not _is_expert(name)
        else:  # lora
            train = ".lora" in name or ("router" in cfg.lora.targets and _is_router(name))
        p.requires_grad_(train)
    return parameter_counts(model)


def parameter_counts(model: nn.Module) -> dict:
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA module into the base weights in place; the model becomes a plain `Transformer`
    (same state-dict keys as one built from its config)."""
    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            if isinstance(mod, LoRALinear):
                if mod.lora_a.ndim != 2:
                    raise ValueError("cannot merge stacked (multi-adapter) LoRA modules")
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, mod.merge())
        for layer in model.moe_layers.values():
            ex = layer.experts
            if ex.lora is not None:
                m = ex.lora
                gu, dn = merged_weights(ex.gate_up, ex.down, ExpertDeltas(m.gu_a, m.gu_b, m.dn_a, m.dn_b, m.scale))
                ex.gate_up.copy_(gu)
                ex.down.copy_(dn)
                ex.lora = None
    return model


def lora_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoRALinear, ExpertLoRA))]
