"""Text from token ids, one token at a time, safe to show as it streams.

Two small state machines, used in this order for each generated token:

- :class:`IncrementalDetokenizer` turns token ids into text and never emits a
  partial UTF-8 character. A byte-level tokenizer may split one character (an
  emoji, a CJK ideograph) across tokens; decoding such a prefix ends in U+FFFD,
  so that text is held back until the character completes. It decodes a short
  window of ids (the TGI / vLLM ``prefix_offset`` / ``read_offset`` scheme)
  rather than single tokens, so SentencePiece leading spaces ("▁word") and
  byte-fallback tokens ("<0xE2>") come out right.
- :class:`StopChecker` holds back text that could be the start of a stop
  string, and says when one completes: the text before it is emitted, the stop
  string and anything after it never are.

Neither knows about the model or the engine; both are pure and tested with real
tokenizers on CPU.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# How many prompt ids to decode along with the first output ids: enough context
# for SentencePiece to keep a leading space, small enough to be cheap.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Push token ids, get back the text they newly make safe to show."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list((prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:])
        # ids[prefix_offset:read_offset] were already emitted and serve as context;
        # ids[read_offset:] are pushed but not yet emitted.
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text newly complete (often "", never half a character)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """The text still held back (e.g. a trailing invalid byte, shown as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class StopChecker:
    """Push text, get back what is safe to emit and whether a stop string completed."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.held = ""
        self.is_stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Return ``(text to emit, stopped)``; after a stop, everything is swallowed."""
        if self.is_stopped:
            return "", True
        if not self.stop:
            return text, False
        buffer = self.held + text
        matches = [i for i in (buffer.find(s) for s in self.stop) if i >= 0]
        if matches:
            self.is_stopped = True
            self.held = ""
            return buffer[:min(matches)], True
        keep = self._longest_partial_stop(buffer)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, when generation ends without completing a stop string."""
        text, self.held = ("" if self.is_stopped else self.held), ""
        return text

    def _longest_partial_stop(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buffer)), longest, -1):
                if buffer.endswith(s[:k]):
                    longest = k
                    break
        return longest
