"""The `finetune:` config section: which parameters train, and the LoRA adapters' shape.

Kept apart from `moelab/config.py` (which only nests it) so fine-tuning's options live with its code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("all", "lora", "router", "experts", "non_experts")
# LoRA targets. `attn` = all four projections; `router` trains the router gates in full: a gate is
# [E, D] with E of 8..64, so a rank-8 factorisation would save little and constrain a lot.
TARGETS = ("attn", "attn.q", "attn.k", "attn.v", "attn.o", "experts", "shared", "dense", "router")


@dataclass
class LoRAConfig:
    """Low-rank adapters (mode `lora`): W' = W + (alpha / rank) B A, B starting at zero."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input, training only
    targets: list[str] = field(default_factory=lambda: ["attn", "experts"])

    def validate(self, prefix: str) -> list[str]:
        p = []
        if self.rank < 1:
            p.append(f"{prefix}.rank: expected >= 1, got {self.rank}")
        if self.alpha <= 0:
            p.append(f"{prefix}.alpha: expected > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            p.append(f"{prefix}.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if not isinstance(self.targets, list) or not self.targets:
            p.append(f"{prefix}.targets: expected a non-empty list out of {', '.join(TARGETS)}, got {self.targets!r}")
        else:
            bad = [t for t in self.targets if t not in TARGETS]
            if bad:
                p.append(f"{prefix}.targets: unknown {bad}; expected some of {', '.join(TARGETS)}")
        return p


@dataclass
class FinetuneConfig:
    """Fine-tuning from a base checkpoint (`moelab train --init-from BASE`, or `base:` here).
    mode: all (every weight), lora (adapters only, see `lora`), router (router gates and biases),
    experts (routed experts only), non_experts (everything but the routed experts)."""

    mode: str = "all"
    base: str | None = None  # the base checkpoint; filled in from --init-from by the trainer
    base_fingerprint: str | None = None  # sha256 of the base's model.safetensors (written by the trainer)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    @property
    def is_lora(self) -> bool:
        return self.mode == "lora"

    def validate(self, prefix: str = "finetune") -> list[str]:
        p = []
        if self.mode not in MODES:
            p.append(f"{prefix}.mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        return p + self.lora.validate(f"{prefix}.lora")
