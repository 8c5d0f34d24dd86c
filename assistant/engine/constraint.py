"""Grammar-constrained decoding: each step, the tokens a request's grammar forbids get a logit of -inf.

The grammar is a string in llguidance's Lark dialect (JSON schemas inline as
``%json{...}``); :mod:`assistant.tools` writes the ones for tool calls and
``response_format``. The engine knows tokens, not what the grammar means.

- :class:`GrammarCompiler` belongs to one tokenizer. ``compile`` runs at admission,
  off the engine thread: it builds the matcher (the tokenizer's token trie once,
  ~0.5 s for a 49k vocabulary, on first use; a grammar in ~2 ms), keeps the last
  ``max_cached`` grammars so a conversation's tool set is not recompiled every
  turn, and hands each request its own copy (microseconds). A grammar the library
  refuses raises :class:`UnsupportedGrammar`, a :class:`PromptError`: the request
  ends with code ``unsupported_schema`` and nothing starts.
- :class:`Constraint` is one request's state, used on the engine thread only:
  ``mask_logits`` before sampling (end-of-sequence tokens stay allowed only where
  the grammar accepts what came so far), ``advance`` after; ``is_finished`` once
  the grammar is complete and nothing may follow (the engine then ends the
  sequence with "stop").

Cost with SmolLM2's 49,152 tokens on one CPU thread: ~0.2 ms a token for the
mask, its application and the advance (``python -m bench.grammar``), against tens
of ms for a decode step of that model on the same CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import numpy as np

from assistant.engine.model import PromptError

if TYPE_CHECKING:
    import llguidance
    import torch

MAX_ERROR_CHARS = 300  # the library's error, cut to what a client can read


class UnsupportedGrammar(PromptError):
    """The constrained-decoding library cannot compile the grammar (an unsupported JSON-schema keyword, a
    regex pattern it cannot take, ...); the message says what, for the client."""


class GrammarCompiler:
    """Compiles grammars for one tokenizer, keeping the last ``max_cached`` compiled (thread-safe)."""

    def __init__(self, tokenizer: Any, eos_token_ids: Collection[int], *, max_cached: int = 32) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_cached = max_cached
        self._ll_tokenizer: llguidance.LLTokenizer | None = None  # built on the first compile
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar → pristine matcher
        self._lock = threading.Lock()

    def compile(self, grammar: str) -> Constraint:
        """A fresh constraint for ``grammar``; raises UnsupportedGrammar if it cannot be compiled."""
        with self._lock:
            pristine = self._compiled.get(grammar)
            if pristine is None:
                pristine = self._compile(grammar)
                self._compiled[grammar] = pristine
                if len(self._compiled) > self.max_cached:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(grammar)
            return Constraint(pristine.deep_copy(), self.eos_token_ids)

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        import llguidance
        import llguidance.hf

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=sorted(self.eos_token_ids))
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()  # the first mask builds the lexer's start: here, not on the engine thread
        if matcher.is_error():
            raise UnsupportedGrammar(f"constrained decoding cannot use this schema or grammar: "
                                     f"{_brief(matcher.get_error())}")
        return matcher

    def __len__(self) -> int:
        return len(self._compiled)


class Constraint:
    """One request's grammar state: mask, then advance, once per sampled token (engine thread only)."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int]) -> None:
        self._matcher = matcher
        self._eos_token_ids = eos_token_ids

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and nothing may follow: the sequence ends here."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """What came so far is a complete match: an end-of-sequence token may come next."""
        return self._matcher.is_accepting()

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``(vocab,)`` with -inf for every token the grammar forbids next (a new tensor: the model's
        logits are inference tensors)."""
        import torch

        bitmask = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)  # (ceil(tokens / 32) * 4,)
        self._check()
        vocab = logits.shape[-1]
        forbidden = np.unpackbits(~bitmask, bitorder="little")[:vocab].view(bool)  # (≤ vocab,)
        if len(forbidden) < vocab:  # logits past the tokenizer's vocabulary (padded embeddings) are never sampled
            forbidden = np.concatenate([forbidden, np.ones(vocab - len(forbidden), dtype=bool)])
        return torch.where(torch.from_numpy(forbidden).to(logits.device), float("-inf"), logits)

    def advance(self, token_id: int) -> None:
        """Move past the sampled token (an end-of-sequence token ends the sequence instead)."""
        if token_id in self._eos_token_ids:
            return
        self._matcher.consume_token(token_id)
        self._check()

    def _check(self) -> None:
        # Only a token the mask forbade, or a library limit hit mid-way, gets here: a bug, not the client's doing.
        if self._matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {_brief(self._matcher.get_error())}")


def _brief(error: str) -> str:
    return " ".join(error.split())[:MAX_ERROR_CHARS]
