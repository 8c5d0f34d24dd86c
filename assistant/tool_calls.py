"""Tool calls in the model's text: the format, a streaming parser, and calls and results rendered back.

The format (Hermes / Qwen 2.5 style), which :func:`assistant.tools.build_grammar`
makes the only one the model can write when it calls tools::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    </tool_call>

An answer is either free text or one or more such blocks, one line break apart;
the arguments are compact JSON (``", "`` and ``": "``, no line breaks), so the
block's end, ``}\\n</tool_call>``, never occurs inside them.

:class:`ToolCallParser` turns the text deltas of one answer into events: text
deltas, or per call a :class:`CallStarted` (index, generated ``call_...`` id,
name), :class:`ArgumentsDelta` pieces and one :class:`CallDone` with the whole
arguments. A started call always gets its ``CallDone``, even when the answer was
cut short (finish reason "length": its arguments are then incomplete JSON). Text
that turns out not to be in the format (no grammar held the model to it) comes
out as text. :func:`parse_output` is the same parser over a finished answer.

An engine that recognises calls itself (a remote engine: its upstream's
``tool_calls`` deltas) hands them over typed, as
:class:`~assistant.engine.request.ToolCallDelta`; :meth:`ToolCallParser.push_call`
turns those into the same events, so both kinds of engine give one stream.

Pure: no torch, no sockets; the HTTP and Realtime layers map the events onto
their own wire events.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto

from assistant.engine.request import ChatMessage, TextChunk, ToolCallDelta

TAG = "<tool_call>"
OPEN = TAG + "\n"
HEADER_START = OPEN + '{"name": "'
HEADER_END = '", "arguments": '
CLOSE = "}\n</tool_call>"
SEPARATOR = "\n"
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
NAME_START_PATTERN = re.compile(r"[a-zA-Z0-9_-]{0,64}")  # what may still become a name
CALL_ID_CHARS = string.ascii_letters + string.digits
_TOOL_RESULT = re.compile(r"<tool_response>\n(.*?)\n</tool_response>(?:\n|$)", re.DOTALL)  # tool_result_text's


def new_call_id() -> str:
    """``call_`` and 24 random letters and digits, as OpenAI's ids look."""
    return "call_" + "".join(secrets.choice(CALL_ID_CHARS) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStarted:
    index: int  # the call's position in this answer, from 0
    call_id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    delta: str


@dataclass(frozen=True)
class CallDone:
    index: int
    call: ToolCall


OutputEvent = TextDelta | CallStarted | ArgumentsDelta | CallDone


class _State(Enum):
    START = auto()  # nothing decided: the answer may still begin with TAG
    TEXT = auto()  # a text answer: everything passes through
    HEADER = auto()  # inside a call, before its arguments
    ARGUMENTS = auto()
    BETWEEN = auto()  # after a call: another, or the end


class ToolCallParser:
    """One answer's text deltas in, :data:`OutputEvent` lists out (see the module docstring)."""

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self._new_id = new_id
        self._state = _State.START
        self._held = ""  # text not turned into events yet
        self._calls: list[ToolCall] = []
        self._arguments = ""  # the current call's, so far
        self._typed_index: int | None = None  # the engine's index of the typed call now open (push_call)

    def push(self, text: str) -> list[OutputEvent]:
        if self._typed_index is not None:  # text after the engine's own calls is not theirs: a message
            return [TextDelta(text)] if text.strip() else []
        self._held += text
        events: list[OutputEvent] = []
        while self._held and self._step(events):
            pass
        return events

    def push_call(self, delta: ToolCallDelta) -> list[OutputEvent]:
        """A piece of a call the engine recognised itself: text held so far comes out first, a new ``index``
        ends the call before it and starts the next (with a new id), then the arguments follow."""
        events = self.finish() if self._typed_index is None else []  # held text, or a text call cut short
        if delta.index != self._typed_index:
            if self._typed_index is not None:
                events.append(self._done())
            self._typed_index = delta.index
            call_id = self._new_id()
            self._calls.append(ToolCall(call_id, delta.name or "", ""))
            events.append(CallStarted(len(self._calls) - 1, call_id, delta.name or ""))
            self._state = _State.ARGUMENTS  # finish() closes it, cut short or not
        if delta.arguments:
            events.append(ArgumentsDelta(len(self._calls) - 1, delta.arguments))
            self._arguments += delta.arguments
        return events

    def finish(self) -> list[OutputEvent]:
        """The answer is over: what is held comes out; a call cut short is done with what it has."""
        events: list[OutputEvent] = []
        if self._state in (_State.START, _State.TEXT) and self._held:
            events.append(TextDelta(self._held))
        elif self._state is _State.ARGUMENTS:
            if self._held:
                events.append(ArgumentsDelta(len(self._calls), self._held))
            self._arguments += self._held
            events.append(self._done())
        # A header cut short names no call yet, and a held separator is only a line break: both are dropped.
        self._held = ""
        return events

    def _step(self, events: list[OutputEvent]) -> bool:
        """Turn what the held text allows into events; whether another step may make progress."""
        held = self._held
        match self._state:
            case _State.START:
                if held.startswith(TAG):
                    self._state = _State.HEADER
                elif not TAG.startswith(held):
                    self._state = _State.TEXT
                return self._state is not _State.START
            case _State.TEXT:
                events.append(TextDelta(held))
                self._held = ""
            case _State.HEADER:
                name, end = _header(held)
                if name is None and end:  # not the format: what was held is text after all
                    self._state = _State.TEXT
                    return True
                if name is not None:
                    call_id = self._new_id()
                    self._calls.append(ToolCall(call_id, name, ""))
                    events.append(CallStarted(len(self._calls) - 1, call_id, name))
                    self._held, self._state, self._arguments = held[end:], _State.ARGUMENTS, ""
                    return True
            case _State.ARGUMENTS:
                end = held.find(CLOSE)
                piece = held[:end] if end >= 0 else held[:len(held) - _held_back(held, CLOSE)]
                if piece:
                    events.append(ArgumentsDelta(len(self._calls) - 1, piece))
                    self._arguments += piece
                if end >= 0:
                    events.append(self._done())
                    self._held, self._state = held[end + len(CLOSE):], _State.BETWEEN
                    return True
                self._held = held[len(piece):]
            case _State.BETWEEN:
                if held.startswith(SEPARATOR + TAG):
                    self._held, self._state = held[len(SEPARATOR):], _State.HEADER
                    return True
                if not (SEPARATOR + TAG).startswith(held):
                    self._state = _State.TEXT  # text after the calls: no grammar held the model
                    return True
        return False

    def _done(self) -> CallDone:
        """The current (last) call, its arguments complete."""
        started = self._calls[-1]
        self._calls[-1] = ToolCall(started.call_id, started.name, self._arguments)
        self._arguments = ""
        return CallDone(len(self._calls) - 1, self._calls[-1])


def _header(held: str) -> tuple[str | None, int]:
    """``(name, end)`` once ``held`` starts with a whole call header (``end`` where the arguments start);
    ``(None, 0)`` while it may still become one; ``(None, 1)`` when it cannot."""
    if len(held) < len(HEADER_START):
        return None, 0 if HEADER_START.startswith(held) else 1
    if not held.startswith(HEADER_START):
        return None, 1
    rest = held[len(HEADER_START):]
    quote = rest.find('"')
    if quote < 0:
        return None, 0 if NAME_START_PATTERN.fullmatch(rest) else 1
    name, after = rest[:quote], rest[quote:]
    if not NAME_PATTERN.fullmatch(name):
        return None, 1
    if len(after) < len(HEADER_END):
        return None, 0 if HEADER_END.startswith(after) else 1
    if not after.startswith(HEADER_END):
        return None, 1
    return name, len(HEADER_START) + quote + len(HEADER_END)


def _held_back(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that ``marker`` starts with (it may be the marker's start)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


@dataclass(frozen=True)
class ParsedOutput:
    text: str  # "" when the answer is tool calls
    calls: tuple[ToolCall, ...]


def parse_output(text: str, new_id: Callable[[], str] = new_call_id) -> ParsedOutput:
    """A finished answer as text or tool calls (what the streaming parser gives, gathered)."""
    parser = ToolCallParser(new_id)
    events = parser.push(text) + parser.finish()
    calls = tuple(event.call for event in events if isinstance(event, CallDone))
    return ParsedOutput("".join(event.text for event in events if isinstance(event, TextDelta)), calls)


def render_tool_calls(calls: Sequence[tuple[str, str]]) -> str:
    """An earlier answer's calls ``(name, arguments JSON)`` as the model wrote them, for the conversation."""
    blocks = []
    for name, arguments in calls:
        try:
            arguments = json.dumps(json.loads(arguments), ensure_ascii=False)  # compact, as the grammar has it
        except ValueError:
            pass  # not JSON (cut short, or a client's own): shown as it is
        blocks.append(f'{HEADER_START}{name}{HEADER_END}{arguments}{CLOSE}')
    return SEPARATOR.join(blocks)


def tool_result_text(output: str) -> str:
    return f"<tool_response>\n{output}\n</tool_response>"


def parse_tool_results(text: str) -> list[str] | None:
    """The outputs in a user turn made only of :func:`tool_results_message`'s blocks; None when it is anything
    else (a remote engine sends them upstream as ``tool`` messages again)."""
    outputs, position = [], 0
    while position < len(text):
        match = _TOOL_RESULT.match(text, position)
        if match is None:
            return None
        outputs.append(match.group(1))
        position = match.end()
    return outputs or None


def tool_results_message(outputs: Sequence[str]) -> ChatMessage:
    """The results of one answer's calls, in order, as the next user turn: every chat template takes the user
    role (SmolLM2's takes any, but others refuse "tool"), and the prompt tells the model where results come."""
    return ChatMessage("user", (TextChunk("\n".join(tool_result_text(output) for output in outputs)),))
