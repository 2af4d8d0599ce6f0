"""Token ids -> text as it is produced: incremental decoding and stop strings.

Byte-level BPE tokens may end in the middle of a UTF-8 character, so a token's text is
only final once the character is complete; and text that might be the start of a stop
string is held back until it is clear it is not one. What `push` returns is therefore
safe to print at once and never has to be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers

# Re-decode at most this many tokens before the newest one: byte-level BPE decoding is
# context-free apart from a character split across tokens (at most 4 bytes).
_CONTEXT_TOKENS = 6


class TextStream:
    """The text of one request's output, built token by token."""

    def __init__(self, tokenizer: tokenizers.Tokenizer | None, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # decoded text of every token whose characters are complete
        self.done = 0  # tokens whose text is in self.text
        self.emitted = 0  # characters of self.text already returned by push
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        """Add a token; return the newly final text (may be empty). Sets `stopped` when a stop
        string appears; the text is then cut before it."""
        if self.tokenizer is None or self.stopped:
            self.ids.append(token)
            return ""
        self.ids.append(token)
        start = max(self.done - _CONTEXT_TOKENS, 0)
        before = self._decode(self.ids[start : self.done])
        now = self._decode(self.ids[start:])
        if now.endswith("\ufffd") or not now.startswith(before):
            return ""  # an incomplete character: wait for the next token
        self.text += now[len(before) :]
        self.done = len(self.ids)
        if self.stop:
            # Search only where a stop string can newly appear.
            lo = max(self.emitted - max(map(len, self.stop)), 0)
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self.flush()
            safe = len(self.text) - _held_back(self.text, self.stop)
        else:
            safe = len(self.text)
        delta = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        """The rest of the text at the end of the request (held-back text, a trailing
        incomplete character as U+FFFD)."""
        if self.tokenizer is not None and not self.stopped and self.done < len(self.ids):
            start = max(self.done - _CONTEXT_TOKENS, 0)
            self.text += self._decode(self.ids[start:])[len(self._decode(self.ids[start : self.done])) :]
            self.done = len(self.ids)
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
