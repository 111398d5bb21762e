"""Prompts and rewards for `moelab rl`: built-in verifiable tasks (no download) and user reward functions.

A task yields (prompt, answer) pairs from a seeded generator: the same seed and step give the same
prompts, which is what makes a resumed run exact without storing a prompt queue. The built-in reward is
exact match: 1.0 when the completion, up to its first newline and stripped, equals the answer.
A user reward is `module:function` with `reward(prompt, completion) -> float`; it is called on every
sample and must return a finite number (`check_reward` turns anything else into one UserError line).
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable

from moelab.errors import UserError


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(0, 50), rng.randrange(0, 50)
    return f"{a}+{b}=", str(a + b)


def sorting(rng: random.Random) -> tuple[str, str]:
    letters = rng.sample("abcdefghij", rng.randrange(3, 6))
    return f"sort {''.join(letters)}=", "".join(sorted(letters))


def reversal(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice("abcdefgh") for _ in range(rng.randrange(3, 7)))
    return f"reverse {word}=", word[::-1]


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": arithmetic,
    "sorting": sorting,
    "reversal": reversal,
}


def task_prompts(task: str, seed: int, n: int) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs of a built-in task, a pure function of (task, seed)."""
    if task not in TASKS:
        raise UserError(f"--task: expected one of {', '.join(TASKS)}, got {task!r}")
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def answer_of(completion: str) -> str:
    return completion.split("\n", 1)[0].strip()


def exact_match(answer: str, completion: str) -> float:
    return 1.0 if answer_of(completion) == answer else 0.0


def task_text(task: str, seed: int, n: int) -> str:
    """Pre-training text for a task: `prompt answer` lines (the bench's base model learns the format)."""
    return "".join(f"{p}{a}\n" for p, a in task_prompts(task, seed, n))


def load_reward(spec: str) -> Callable[[str, str], float]:
    """`module:function` -> the function (imported by its dotted module path)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"--reward: expected module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--reward {spec}: cannot load it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"--reward {spec}: {name} is not a function")
    return fn


def check_reward(spec: str, fn: Callable[[str, str], float], prompt: str, completion: str) -> float:
    """Call a user reward; anything but a finite number is one clear UserError naming the sample."""
    try:
        value = fn(prompt, completion)
    except Exception as e:
        raise UserError(
            f"reward {spec} raised {type(e).__name__}: {e} (prompt {prompt!r}, completion {completion!r})"
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(
            f"reward {spec} returned {value!r} for prompt {prompt!r}, completion {completion!r}; "
            "expected a finite number"
        )
    return float(value)
