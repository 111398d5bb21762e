"""The generated task of `moelab bench finetune`: question/answer items, their splits, the base model's
pre-training stream and the exact-match scorer.

Three families, every item generated from the seed (no downloads, no world knowledge):
    arith    "What is 17+25?"                   -> "42"
    reverse  "Reverse the word: tamek"          -> "kemat"
    fact     "What is the capital of Borizan?"  -> "Sulavo"   (made-up countries and capitals)

Each family's items are split into held-out test, validation (for choosing learning rates: never the test) and
fine-tune train items, disjoint. The base is pre-trained on plain text in which the test, validation and train
items appear as question-and-answer prose ("What is 17+25? 42.") and as statements ("17+25=42."); test and
validation items are never in the chat template, while a few train items appear as chat conversations, so the
base has seen the template's markers. Fine-tunes train on chat conversations about the train items only, then
answer the held-out questions in the chat template. So the base has the knowledge and the fine-tune has to
connect it to the format — the setting where tuning only the routers could help (the experts that know the
answers exist; routing decides whether a chat prompt reaches them). Measured (BENCHMARKS.md), it helps a
little on a base with many fine experts and early stopping, and did not on one with 8 wide experts.
`plain_exact_match` scores the base on the same questions as prose, to show the knowledge is there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FAMILIES = ("arith", "reverse", "fact")
_C, _V = "bdfgklmnprstvz", "aeiou"


@dataclass
class Item:
    family: str
    question: str
    answer: str


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_C) + rng.choice(_V) for _ in range(syllables)) + rng.choice(_C + " ").strip()


def _distinct(rng: random.Random, n: int, make) -> list:
    seen: dict = {}
    while len(seen) < n:
        seen.setdefault(make(), None)
    return list(seen)


def family_items(rng: random.Random, family: str, n: int) -> list[Item]:
    """n distinct items of one family."""
    if family == "arith":
        pairs = _distinct(rng, n, lambda: (rng.randint(0, 49), rng.randint(0, 49)))
        return [Item(family, f"What is {a}+{b}?", str(a + b)) for a, b in pairs]
    if family == "reverse":
        words = [w for w in _distinct(rng, 2 * n, lambda: _word(rng, 2)) if w != w[::-1]][:n]
        return [Item(family, f"Reverse the word: {w}", w[::-1]) for w in words]
    countries = _distinct(rng, n, lambda: _word(rng, 3).capitalize())
    return [Item(family, f"What is the capital of {c}?", _word(rng, 2).capitalize()) for c in countries]


def statement(item: Item) -> str:
    """The item as a plain-text statement (the form without the question)."""
    q = item.question
    if item.family == "arith":
        return f"{q[8:-1]}={item.answer}."
    if item.family == "reverse":
        return f"{q.split(': ')[1]} backwards is {item.answer}."
    return f"The capital of {q[23:-1]} is {item.answer}."


@dataclass
class Task:
    test: list[Item]
    val: list[Item]
    train: list[Item]
    seen: list[Item]  # the items the pre-training stream states


def make_task(seed: int, n_test: int, n_val: int, n_train: int, n_known: int | None = None) -> Task:
    """Per family: n_test / 3 test, n_val / 3 validation and n_train / 3 fine-tune train items, disjoint.
    The pre-training stream states the test and validation items and the first n_known / 3 train items
    of each family (default all: instruction data about things the base knows, so tuning teaches the
    format rather than new facts)."""
    rng = random.Random(seed)
    test, val, train, seen = [], [], [], []
    per = [max(1, n // len(FAMILIES)) for n in (n_test, n_val, n_train)]
    known = per[2] if n_known is None else n_known // len(FAMILIES)
    for fam in FAMILIES:
        items = family_items(rng, fam, sum(per))
        t, v, tr = items[: per[0]], items[per[0] : per[0] + per[1]], items[per[0] + per[1] :]
        test += t
        val += v
        train += tr
        seen += t + v + tr[:known]
    return Task(test, val, train, seen)


def pretrain_ids(task: Task, enc, rng: random.Random, repeats: int, n_chat: int) -> list[int]:
    """The base's pre-training stream: every seen item as a question answered in prose and as a
    statement, plus the first `n_chat` train items (per family) as chat conversations (each ending in EOD), all
    `repeats` times, shuffled. The chat pieces teach the template's mechanics (markers, end of turn)
    on items that are neither tested nor validated: no test or validation item is ever in the template."""
    tok = enc.tok
    pieces = []
    for _ in range(repeats):
        for it in task.seen:
            pieces += [tok.encode(f"{it.question} {it.answer}.\n"), tok.encode(statement(it) + "\n")]
        for it in [it for fam in FAMILIES for it in [i for i in task.train if i.family == fam][:n_chat]]:
            msgs = [{"role": "user", "content": it.question}, {"role": "assistant", "content": it.answer}]
            pieces.append(enc.encode(msgs)[0] + [tok.eod_id])
    rng.shuffle(pieces)
    return [t for p in pieces for t in p]


def _greedy(model, prompts: list[list[int]], n_new: list[int], batch: int = 32) -> list[list[int]]:
    """n_new[i] greedy tokens after each prompt. Rows of one batch share a prompt length: the model
    takes no attention mask, so there is no padding (and no early stop: EM reads the tokens anyway)."""
    import torch

    outs: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for group in by_len.values():
            for s in range(0, len(group), batch):
                rows = group[s : s + batch]
                ids = torch.tensor([prompts[i] for i in rows])
                for _ in range(max(n_new[i] for i in rows)):
                    nxt = model(ids).logits[:, -1].argmax(-1)
                    ids = torch.cat([ids, nxt[:, None]], 1)
                for j, i in enumerate(rows):
                    outs[i] = ids[j, len(prompts[i]) : len(prompts[i]) + n_new[i]].tolist()
    return outs


def exact_match(model, enc, items: list[Item]) -> dict[str, float]:
    """Per family and overall share of items whose greedy chat answer is exactly the answer followed by
    the end-of-turn token (a run-on answer does not count)."""
    model.eval()
    prompts = [enc.prompt([{"role": "user", "content": it.question}]) for it in items]
    outs = _greedy(model, prompts, [len(enc.tok.encode(it.answer)) + 1 for it in items])
    hits = [o[:-1] == enc.tok.encode(it.answer) and o[-1] in enc.stop_ids for o, it in zip(outs, items, strict=True)]
    return _by_family(items, hits)


def plain_exact_match(model, tok, items: list[Item]) -> dict[str, float]:
    """The same questions as prose ("What is 17+25? " -> "42."): the knowledge the base has."""
    model.eval()
    prompts = [tok.encode(f"{it.question} ") for it in items]
    outs = _greedy(model, prompts, [len(tok.encode(it.answer)) + 1 for it in items])
    hits = [tok.decode(o) == f"{it.answer}." for o, it in zip(outs, items, strict=True)]
    return _by_family(items, hits)


def answer_loss(model, enc, items: list[Item]) -> float:
    """Mean cross-entropy (nats) of the answers and their end-of-turn token after the chat prompts: a
    smooth tie-breaker where exact match on a small validation set ties."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for it in items:
            prompt = enc.prompt([{"role": "user", "content": it.question}])
            target = [*enc.tok.encode(it.answer), enc.end_id]
            logits = model(torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1 :]
            total += float(F.cross_entropy(logits.float(), torch.tensor(target), reduction="sum"))
            count += len(target)
    return total / max(1, count)


def routing_ids(model, enc, items: list[Item]) -> list[dict]:
    """Per item, per MoE layer: the sorted top-k expert ids [T, K] of every token of the chat prompt
    followed by the answer (teacher-forced), to compare the routing of two models on the same tokens."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for it in items:
            ids = enc.prompt([{"role": "user", "content": it.question}]) + enc.tok.encode(it.answer)
            routing = model(torch.tensor([ids])).routing
            out.append({i: st.topk_ids.sort(-1).values for i, st in routing.items()})
    return out


def routing_changed(a: list[dict], b: list[dict]) -> float:
    """Share of routing decisions (one token in one layer: its set of top-k experts) that differ."""
    changed = total = 0
    for ra, rb in zip(a, b, strict=True):
        for layer, ids in ra.items():
            total += ids.shape[0]
            changed += int((ids != rb[layer]).any(-1).sum())
    return changed / max(1, total)


def _by_family(items: list[Item], hits: list[bool]) -> dict[str, float]:
    out = {}
    for fam in FAMILIES:
        h = [x for x, it in zip(hits, items, strict=True) if it.family == fam]
        if h:
            out[fam] = sum(h) / len(h)
    out["all"] = sum(hits) / max(1, len(hits))
    return out
