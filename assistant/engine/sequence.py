"""One request's state inside the engine, from arrival to its one ``Finished`` event.

A :class:`Sequence` is plain data plus derived counts; the scheduler moves it
between queues (``status``), the engine fills in the prompt, the KV cache and the
output tokens. It holds no tensors of its own beyond the opaque ``kv_cache``
handed back by the model, so the scheduler is tested without torch models.

Invariant: ``finish_reason`` is set exactly once, when the engine sends the
terminal ``Finished`` event; after that the sequence sends nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

from assistant.engine.detokenize import IncrementalDetokenizer, StopChecker
from assistant.engine.request import EngineEvent, FinishReason, GenerationRequest, Request, ScoreRequest
from assistant.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from assistant.engine.constraint import Constraint
    from assistant.engine.model import Prompt


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request: Request, sink: Callable[[EngineEvent], None]) -> None:
        self.request = request
        self.sink = sink
        self.status = SequenceStatus.WAITING
        self.prompt: Prompt | None = None  # a generation request's rendered prompt, set at admission
        self.constraint: Constraint | None = None  # the request's grammar, compiled at admission
        self.prompt_token_ids: list[int] = []
        self.num_image_tokens = 0
        self.prompt_key: tuple[Any, ...] = ()  # what each prompt position holds (prefix_cache.prompt_key)
        self.num_cached_image_tokens = 0  # image tokens of the reused KV prefix or from the image-embedding cache
        self.num_cached_tokens = 0  # the reused KV prefix, plus the other image tokens from the embedding cache
        self.output_token_ids: list[int] = []
        self.num_unreported_tokens = 0  # sampled but not yet counted in a TokenDelta
        self.detokenizer: IncrementalDetokenizer | None = None  # set at prefill (needs the tokenizer)
        # A grammar decides where its answer ends: a stop string inside a call's arguments would cut it invalid.
        stops = request.params.stop if isinstance(request, GenerationRequest) and not request.grammar else ()
        self.stop_checker = StopChecker(stops)
        self.generator: Any = None  # torch.Generator, set at prefill
        self.kv_cache: Any = None  # the model's cache of this sequence alone, when no decode batch holds it
        self.batch: Any = None  # the DecodeBatch whose row it is, while it decodes
        self.num_prefilled = 0  # prompt positions its KV cache holds while its prompt is being prefilled
        self.image_embeds: Any = None  # while prefilling: the embeddings of the images not prefilled yet
        # What prefill runs: the prompt, or after a preemption the prompt and the answer so far (but its last token)
        self.prefill_prompt: Prompt | None = None
        self.prefill_key: tuple[Any, ...] = ()
        self.arrived_at = time.monotonic()  # the newest is preempted first
        self.finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def is_scoring(self) -> bool:
        """A ScoreRequest: it runs whole in the step that admits it and decodes nothing."""
        return isinstance(self.request, ScoreRequest)

    @property
    def params(self) -> SamplingParams:
        assert isinstance(self.request, GenerationRequest), "a score request has no sampling parameters"
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def last_token_id(self) -> int:
        """The token the next decode step feeds: the last one sampled, or before the first, the prompt's last
        (a prompt whose KV cache holds all positions but that one joins the decode batch without a prefill)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens})")
