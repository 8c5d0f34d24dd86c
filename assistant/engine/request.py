"""What goes into the engine and what comes out: the engine's whole public contract.

The session builds a :class:`GenerationRequest` from stored items (text, and
images by reference: sha256 and detail, never bytes or tensors) and receives a
stream of :class:`TokenDelta` events (and, from a remote engine, :class:`ToolCallDelta`) ending in
exactly one :class:`Finished`.
An image's bytes are fetched through the request's :data:`ImageSource` (one
call for all the images a prompt needs) only when the model's embedding cache
does not hold the image's embeddings yet.

A :class:`ScoreRequest` (image–text matching, :mod:`assistant.engine.matching`)
streams no deltas: its one event is the :class:`Finished`, with ``reason="stop"``
and one :class:`MatchScore` per text in ``scores`` when it ran; cancelled or
failed like any request otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from assistant.engine.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]
# The question a ScoreRequest's texts answer, unless it names another.
DEFAULT_MATCH_PROMPT = "Describe this image."
# How image.match ranks texts (MatchScore.score): "likelihood" the mean log-likelihood per token with the image,
# "gain" what the image added to the log-likelihood.
SCORINGS = ("likelihood", "gain")
DEFAULT_SCORING = "likelihood"


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class ImageChunk:
    """A validated image, by reference: the sha256 of its stored file bytes, and the detail to encode it at."""

    sha256: str
    detail: Literal["low", "high", "auto"] = "auto"


# sha256s → the stored bytes of those images (an image that is gone is left out): one store query for all.
ImageSource = Callable[[Sequence[str]], Mapping[str, bytes]]


def no_images(sha256s: Sequence[str]) -> Mapping[str, bytes]:
    """The source of a request that holds no image."""
    return {}


@dataclass(frozen=True)
class InlineImages:
    """A source for bytes the caller already holds (an image that is not stored, as ``image.match`` sends)."""

    data: Mapping[str, bytes]

    def __call__(self, sha256s: Sequence[str]) -> Mapping[str, bytes]:
        return {sha256: self.data[sha256] for sha256 in sha256s if sha256 in self.data}


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    parts: tuple[TextChunk | ImageChunk, ...]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    image_source: ImageSource = no_images  # the bytes of the messages' images, asked for on cache misses only
    # The output must match this grammar (llguidance's Lark dialect; assistant.tools writes it), or None.
    grammar: str | None = None
    # Function tools in OpenAI's shape for a chat template that renders them itself (ChatModel.renders_tools);
    # otherwise empty, and the tools are described in the system message instead.
    tools: tuple[Mapping[str, Any], ...] = ()
    # With tools: "required" when the answer must call one of them (a remote engine passes it upstream as
    # OpenAI's tool_choice; the local engine has the grammar for that).
    tool_choice: Literal["auto", "required"] = "auto"
    # Chat Completions' response_format (json_schema) when the answer must be JSON of a schema: a remote engine
    # passes it upstream; the local engine has the grammar for that.
    response_format: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``texts`` as the assistant's answer to ``prompt`` about ``image``, with and without the image.

    ``instructions`` is the system message ("" for none), as in a conversation. Its
    ``Finished`` carries the scores and counts no tokens (those fields stay 0).
    """

    request_id: str
    image: ImageChunk
    texts: tuple[str, ...]
    prompt: str = DEFAULT_MATCH_PROMPT
    instructions: str = ""
    image_source: ImageSource = no_images
    scoring: str = DEFAULT_SCORING  # one of SCORINGS: what MatchScore.score is


Request = GenerationRequest | ScoreRequest


@dataclass(frozen=True)
class MatchScore:
    """How well one text matches the image (higher is better): ``score`` is, by ``scoring``, the text's mean
    log-likelihood per token as the answer with the image ("likelihood"), or what the image added to its
    log-likelihood ("gain", :attr:`image_gain`).

    Both log-likelihoods are natural-log sums over the text's ``num_tokens`` tokens
    (the answer's own tokens, not the template's end-of-turn markup). The gain (pointwise
    mutual information) cancels how likely a text is on its own, but a model fine-tuned
    to describe images makes any sentence in its captions' style likelier once an image
    is there, and more so the longer it is: the gain ranked long captions of other images
    first. Choosing the true caption among 5 (200 synthetic images of a seed training
    never used, the default model at int4-cpu): by the gain 69.5 %, by the summed
    log-likelihood 97.5 %, by the mean per token 98.5 % (the sum favours short texts).
    The gain suits a model whose answers' style does not hang on the image and texts
    whose likelihoods on their own differ much.
    """

    index: int  # the text's position in the request
    text: str
    log_likelihood: float  # with the image
    log_likelihood_without_image: float
    num_tokens: int
    scoring: str = DEFAULT_SCORING  # one of SCORINGS

    @property
    def score(self) -> float:
        return self.image_gain if self.scoring == "gain" else self.mean_log_likelihood

    @property
    def image_gain(self) -> float:
        return self.log_likelihood - self.log_likelihood_without_image

    @property
    def mean_log_likelihood(self) -> float:
        return self.log_likelihood / self.num_tokens

    @property
    def mean_log_likelihood_without_image(self) -> float:
        return self.log_likelihood_without_image / self.num_tokens


def ranking(scores: Sequence[MatchScore]) -> list[int]:
    """The texts' indices, best score first; equal scores keep the texts' order."""
    return [s.index for s in sorted(scores, key=lambda s: (-s.score, s.index))]


@dataclass(frozen=True)
class TokenDelta:
    """New text, safe to show (never a split UTF-8 character, never part of a stop string)."""

    text: str
    num_tokens: int


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a function call that the engine itself recognised (a remote engine's upstream ``tool_calls``).

    ``index`` numbers the calls of one answer from 0; a call's first delta carries its ``name``, later ones only
    more ``arguments`` text. The local engine never emits it: its calls are text that
    :class:`~assistant.tool_calls.ToolCallParser` finds.
    """

    index: int
    name: str | None
    arguments: str
    num_tokens: int = 1


@dataclass(frozen=True)
class Finished:
    """The one terminal event of a request."""

    reason: FinishReason
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_image_tokens: int = 0
    num_cached_image_tokens: int = 0  # image tokens of a reused KV prefix, or whose embeddings were cached
    num_cached_tokens: int = 0  # the reused KV prefix (text and image) plus the other cached image tokens
    error: str | None = None  # log-safe description when reason == "error"
    code: str | None = None  # when reason == "error": an assistant.errors code (ENGINE_ERROR_CODES)
    scores: tuple[MatchScore, ...] = ()  # a ScoreRequest's result, one per text, when reason == "stop"


EngineEvent = TokenDelta | ToolCallDelta | Finished
