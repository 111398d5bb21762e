"""How much a generated sample looks like Python: the demo's target in numbers (issue 19: "samples that look
like Python: keywords, indentation, balanced brackets"). Three checks per sample, each 0 or 1:

- keywords: at least two distinct Python keywords or builtins used as words (`def`, `return`, `self`, ...);
- indentation: a line ending in `:` followed by a line indented deeper by a multiple of 4 spaces (a block),
  or, in a sample that starts mid-block, two or more lines indented by a multiple of 4;
- brackets: every complete line's (), [] and {} balance and nest, and no string literal is left open on it
  (a sample's last line may be cut mid-way, so it is not judged).

The score of a set of samples is the mean over samples and checks (0..1). An untrained model's samples score
near 0 (random tokens rarely form two keywords and never blocks), so the demo prints both: that is the
baseline the trained score must beat, not 0.
"""

from __future__ import annotations

import keyword
import re

WORDS = set(keyword.kwlist) | {"self", "print", "len", "range", "str", "int", "isinstance", "super", "__init__"}
PAIRS = {")": "(", "]": "[", "}": "{"}
THRESHOLD = 0.6  # the demo calls samples "Python-like" at or above this mean score


def _balanced(line: str) -> bool:
    stack: list[str] = []
    quote = None
    for ch in line:
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in PAIRS:
            if not stack or stack.pop() != PAIRS[ch]:
                return False
        elif ch == "#":
            break
    return quote is None and not stack


def checks(text: str) -> dict[str, bool]:
    """The three checks of one sample (prompt included)."""
    words = {w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) if w in WORDS}
    lines = text.split("\n")
    complete = [ln for ln in lines[:-1] if ln.strip()]  # the last line may be cut mid-way
    indents = [len(ln) - len(ln.lstrip(" ")) for ln in lines if ln.strip()]
    block = any(
        a.rstrip().endswith(":")
        and b.strip()
        and (ind_b := len(b) - len(b.lstrip(" "))) > len(a) - len(a.lstrip(" "))
        and ind_b % 4 == 0
        for a, b in zip(lines, lines[1:], strict=False)
    )
    nested = sum(1 for i in indents if i and i % 4 == 0) >= 2
    return {
        "keywords": len(words) >= 2,
        "indentation": block or nested,
        "brackets": bool(complete) and all(_balanced(ln) for ln in complete),
    }


def score(texts: list[str]) -> float:
    """Mean of the checks over all samples (0..1)."""
    if not texts:
        return 0.0
    return sum(sum(checks(t).values()) / 3 for t in texts) / len(texts)
