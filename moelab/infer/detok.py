"""Token ids in, text out as it becomes final: incremental detokenization with stop strings.

Decoding one token at a time is wrong for two reasons: a byte-level token may be half of a UTF-8
character, and SentencePiece drops the leading space of the first piece it decodes. So the text of
the newest tokens is taken as the difference between decoding a short window with and without them
(the window starts a few tokens back, in the prompt at first), and nothing ending in an incomplete
character is released.

Stop strings (OpenAI semantics): generation ends just before the first occurrence, which is not part
of the output. Text that could still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"  # what decode() makes of a partial UTF-8 sequence
_WINDOW = 5  # prompt tokens to start the first window with


class TextStream:
    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_WINDOW:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = [s for s in stop if s]
        self.text = ""  # generated text so far (released + held back)
        self.released = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found; `text` ends right before it

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now final (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
            return ""  # wait for the rest of the character
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """Generation ended without a stop string: release everything held back."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):  # a trailing incomplete character: show it as U+FFFD
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self.tokenizer.decode(self.ids[self.prefix_offset :])[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)  # that tail may still hold a stop string (one with U+FFFD in it)

    def _release(self, final: bool = False) -> str:
        if self.stop:
            hits = [i for i in (self.text.find(s, self.released) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                out = self.text[self.released :]
                self.released = len(self.text)
                return out
        end = len(self.text) - (0 if final else self._held())
        out = self.text[self.released : end]
        self.released = max(self.released, end)
        return out

    def _held(self) -> int:
        """Length of the longest tail of `text` that is the beginning of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
