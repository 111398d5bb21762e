"""The chat template: how a conversation becomes token ids, and which of them an instruction tune trains.

Stored with the tokenizer as `tokenizer/chat_template.json` (so it travels with datasets, runs,
checkpoints and servers like the tokenizer does; the tokenizer's fingerprint does not cover it):

    {"roles": {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}, "end": "<|end|>"}

A message renders as  <role marker> content <end>; a generation prompt ends with the assistant marker
and the model's turn ends at <end> (or the EOD token). Markers are the tokenizer's special tokens when it
has them (`moelab tokenizer byte --special '<|user|>' ...`), inserted by id so no user text can forge
them; a tokenizer without them is refused (it would have to spell them as text, which user content can
imitate). Loss mask: an assistant message's content and its <end> train; markers, system and user
tokens do not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import UserError

FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass
class ChatTemplate:
    roles: dict[str, str] = field(default_factory=lambda: {r: f"<|{r}|>" for r in ROLES})
    end: str = "<|end|>"

    @property
    def specials(self) -> list[str]:
        """The special tokens a tokenizer needs for this template."""
        return [self.roles[r] for r in ROLES] + [self.end]

    def to_json(self) -> dict:
        return {"roles": dict(self.roles), "end": self.end}

    def save(self, tokenizer_dir: str | Path) -> None:
        (Path(tokenizer_dir) / FILE).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @staticmethod
    def load(tokenizer_dir: str | Path) -> ChatTemplate:
        """The template stored with a tokenizer, or the default when there is none."""
        path = Path(tokenizer_dir) / FILE
        if not path.is_file():
            return ChatTemplate()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            roles, end = data["roles"], data["end"]
            if set(roles) != set(ROLES) or not all(isinstance(v, str) and v for v in [*roles.values(), end]):
                raise ValueError("roles must name system, user and assistant markers")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a chat template ({e})") from None
        return ChatTemplate(dict(roles), end)


class ChatEncoder:
    """A template bound to a tokenizer: conversation -> (ids, trained mask)."""

    def __init__(self, tokenizer, template: ChatTemplate):
        specials = tokenizer.special_tokens
        missing = [s for s in template.specials if s not in specials]
        if missing:
            raise UserError(
                f"the tokenizer has no special tokens {missing} for the chat template; make one with "
                f"them (moelab tokenizer byte|train {' '.join('--special ' + repr(s) for s in missing)})"
            )
        self.tok, self.template = tokenizer, template
        self.role_id = {r: specials[template.roles[r]] for r in ROLES}
        self.end_id = specials[template.end]
        self.stop_ids = {self.end_id, tokenizer.eod_id}

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Validated messages -> ids, mask (1 = a target the loss trains on)."""
        ids, mask = [], []
        for m in messages:
            content = self.tok.encode(m["content"])
            trained = 1 if m["role"] == "assistant" else 0
            ids += [self.role_id[m["role"]], *content, self.end_id]
            mask += [0] + [trained] * (len(content) + 1)
        return ids, mask

    def prompt(self, messages: list[dict]) -> list[int]:
        """A generation prompt: the conversation so far, then the assistant marker."""
        return self.encode(messages)[0] + [self.role_id["assistant"]]


def check_messages(messages, where: str = "messages") -> list[dict]:
    """[{role, content}, ...] validated, or ValueError with a one-line reason."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}]: expected an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}].role: expected one of {', '.join(ROLES)}, got {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out
