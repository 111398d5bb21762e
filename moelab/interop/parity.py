"""Prove a conversion: load the HF side with transformers and run both models on the same random
tokens. Loading refuses missing (never-loaded, so randomly initialised), unexpected or mis-shaped
tensors; the forward comparison reports max |delta logit| and whether greedy decoding agrees.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.errors import UserError
from moelab.interop.hf_maps import ArchSpec

DEFAULT_TOLERANCE = 1e-3  # relative to max(1, max |logit|); fp32 on both sides


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def load_transformers_model(hf_dir: str | Path, spec: ArchSpec):
    """`AutoModelForCausalLM.from_pretrained` in fp32 and eval mode, refusing any loading problem."""
    import transformers

    transformers.logging.set_verbosity_error()  # their warnings repeat what loading_info says
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"{hf_dir}: transformers cannot load it ({str(e).strip().splitlines()[0]})") from None
    problems = []
    for key, what in (
        ("missing_keys", "never loaded (left at random init)"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "mis-shaped"),
        ("error_msgs", "load errors"),
    ):
        items = sorted(str(x) for x in (info.get(key) or []))
        if items:
            more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{hf_dir}: transformers reports {what}: {', '.join(items[:3])}{more}")
    if type(model).__name__ != spec.hf_class:
        problems.append(f"{hf_dir}: transformers built {type(model).__name__}, expected {spec.hf_class}")
    if problems:
        raise UserError("\n".join(problems))
    return model.eval()


@dataclass
class ParityReport:
    max_abs_delta: float  # max |logit_ours - logit_theirs| over every position and vocab entry
    max_abs_logit: float
    shape: tuple[int, int]  # (sequences, tokens) compared
    greedy_ours: list[int]
    greedy_theirs: list[int]
    # median over positions of each position's max |delta|: what rounded weights are judged by (see `check`)
    median_abs_delta: float = float("nan")

    @property
    def greedy_equal(self) -> bool:
        return self.greedy_ours == self.greedy_theirs

    def line(self, theirs: str = "transformers") -> str:
        greedy = "identical" if self.greedy_equal else "DIFFERENT"
        return (
            f"parity vs {theirs}: max |delta logit| = {self.max_abs_delta:.3g} (median position "
            f"{self.median_abs_delta:.3g}, max |logit| {self.max_abs_logit:.3g}) on {self.shape[0]}x"
            f"{self.shape[1]} random tokens; greedy continuation of {len(self.greedy_ours)} tokens {greedy}"
        )

    def check(self, tolerance: float, what: str, *, rounded: bool = False) -> None:
        """Refuse when the logits differ by more than `tolerance` (relative to max(1, max |logit|)): at
        every position, or with `rounded` (weights rounded to f16/q8_0 on their side) at the median
        position. Rounding moves router logits slightly, so a token whose top-k choice is a near tie can
        pick another expert there, which changes its logits (and a little of the later tokens') by far
        more than the rounding itself: measured here, 0.33-0.65 at positions whose router margin was
        under 0.005, against 0.003 (f16) and 0.06 (q8_0) elsewhere. A wrong conversion is wrong at
        nearly every position, so the median still catches it."""
        limit = tolerance * max(1.0, self.max_abs_logit)
        value, which = (self.median_abs_delta, "at the median position") if rounded else (self.max_abs_delta, "")
        if not value <= limit:  # also catches NaN
            raise UserError(
                f"{what}: logits differ by {value:.3g}{' ' + which if which else ''} > tolerance "
                f"{limit:.3g}; the conversion is wrong, nothing was written"
            )


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _ours_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


@torch.no_grad()
def greedy(logits_fn, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy continuation by full forwards (no cache): slow and obviously correct."""
    ids = prompt
    for _ in range(steps):
        nxt = logits_fn(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


@torch.no_grad()
def compare(
    ours,
    theirs,
    vocab_size: int,
    max_len: int,
    *,
    theirs_logits=_hf_logits,
    seqs: int = 2,
    seq_len: int = 16,
    greedy_steps: int = 8,
    seed: int = 0,
) -> ParityReport:
    """Both models on `seqs` random sequences, then a greedy continuation of a random prompt."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = max(1, min(seq_len, max_len - greedy_steps))
    ids = torch.randint(0, vocab_size, (seqs, seq_len), generator=gen)
    a, b = _ours_logits(ours, ids), theirs_logits(theirs, ids)
    prompt = ids[:1, : max(1, seq_len // 2)]
    per_position = (a - b).abs().amax(-1)
    return ParityReport(
        max_abs_delta=float(per_position.max()),
        max_abs_logit=float(a.abs().max()),
        shape=tuple(ids.shape),
        median_abs_delta=float(per_position.flatten().median()),
        greedy_ours=greedy(lambda x: _ours_logits(ours, x), prompt, greedy_steps),
        greedy_theirs=greedy(lambda x: theirs_logits(theirs, x), prompt, greedy_steps),
    )
