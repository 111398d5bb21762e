"""Turning next-token logits into token ids: temperature, top-k, top-p (nucleus), greedy, seeded draws.

Every function takes a batch of rows [B, V] with per-row settings, because a continuously batched
decode step mixes requests that asked for different things. Sampling runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moelab.errors import UserError

# What torch.Generator.manual_seed takes: an int64 or a uint64.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def check_text(text: str, what: str) -> None:
    """Refuse text that is not Unicode: lone surrogates, which is how Python carries the bytes of a command
    line argument that is not UTF-8 (`--prompt $'\\xff'`); a tokenizer would fail on them with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        shown = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        raise UserError(f"{what}: not valid UTF-8 text ({shown} at character {e.start})") from None


def wrap_seed(seed: int) -> int:
    """seed + a sample index past the top wraps around like a uint64 (torch refuses more)."""
    return seed % (SEED_MAX + 1) if seed > SEED_MAX else seed


@dataclass
class SamplingParams:
    """What one request asks for. temperature 0 = greedy; top_k None/0 and top_p None/1.0 = off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: draws come from torch's global generator (not reproducible)

    stop: list[str] = field(default_factory=list)  # generation ends before the first occurrence of any

    def validate(self, where: str = "sampling") -> SamplingParams:
        """Raise UserError naming the first bad field; returns self for chaining."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                "max_new_tokens",
                "an integer >= 1",
                self.max_new_tokens,
            ),
            (
                isinstance(self.temperature, (int, float)) and 0 <= self.temperature,
                "temperature",
                "a number >= 0",
                self.temperature,
            ),
            (
                self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0),
                "top_k",
                "an integer >= 0 (0 = off)",
                self.top_k,
            ),
            (
                self.top_p is None or (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1),
                "top_p",
                "a number in (0, 1]",
                self.top_p,
            ),
            (
                self.seed is None or (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX),
                "seed",
                f"an integer in [{SEED_MIN}, {SEED_MAX}]",
                self.seed,
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop),
        ]
        for ok, name, expected, got in checks:
            if not ok:
                raise UserError(f"{where}.{name}: expected {expected}, got {got!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: str | torch.device = "cpu", offset: int = 0) -> torch.Generator | None:
        """A generator seeded with seed + offset (offset tells apart several samples of one request)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(wrap_seed(self.seed + offset))


def _per_row(value, default, b: int, device, dtype) -> torch.Tensor:
    """A scalar or a sequence of per-row values (None = default) as a [B, 1] tensor."""
    if not isinstance(value, Sequence):
        value = [value] * b
    return torch.tensor([default if v is None else v for v in value], device=device, dtype=dtype)[:, None]


def logits_to_probs(
    logits: torch.Tensor,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | None | Sequence[int | None] = None,
    top_p: float | None | Sequence[float | None] = None,
) -> torch.Tensor:
    """logits [B, V] -> probabilities [B, V] (fp32) after temperature, then top-k, then top-p.

    top-k keeps the k highest logits of a row; top-p then keeps the smallest set of most likely tokens
    whose probability reaches top_p (always at least one). Settings are scalars or one per row;
    temperature must be > 0 here (greedy rows never reach this function)."""
    logits = logits.float()
    b, v = logits.shape
    t = _per_row(temperature, 1.0, b, logits.device, torch.float32)
    logits = logits / t
    ks = [0 if k is None else k for k in (top_k if isinstance(top_k, Sequence) else [top_k] * b)]
    ps = [1.0 if p is None else p for p in (top_p if isinstance(top_p, Sequence) else [top_p] * b)]
    use_k = any(0 < k < v for k in ks)
    use_p = any(p < 1.0 for p in ps)
    if not (use_k or use_p):
        return logits.softmax(-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    rank = torch.arange(v, device=logits.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_k:
        k = torch.tensor([k if 0 < k < v else v for k in ks], device=logits.device)[:, None]
        drop |= rank >= k
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if use_p:
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop |= before >= _per_row(ps, 1.0, b, logits.device, torch.float32)
    drop[:, 0] = False
    keep = torch.empty_like(drop).scatter_(1, order, ~drop)
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)


def sample(probs: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """One draw per row of probs [B, V] -> ids [B]. Row i uses generators[i] (None = global RNG)."""
    if generators is None or all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None] | None = None
) -> torch.Tensor:
    """The next token of each row of logits [B, V], honouring each row's SamplingParams. -> [B]."""
    greedy = [p.greedy for p in params]
    if all(greedy):
        return logits.argmax(dim=-1)
    rows = [i for i, g in enumerate(greedy) if not g]
    sub = logits if len(rows) == len(params) else logits[rows]
    probs = logits_to_probs(
        sub, [params[i].temperature for i in rows], [params[i].top_k for i in rows], [params[i].top_p for i in rows]
    )
    drawn = sample(probs, None if generators is None else [generators[i] for i in rows])
    if len(rows) == len(params):
        return drawn
    out = logits.argmax(dim=-1)
    out[rows] = drawn
    return out
