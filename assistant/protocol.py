"""Client events of the Realtime protocol: parse and validate, without sockets or torch.

``parse_client_event(frame)`` turns one WebSocket text frame into one of the
frozen event dataclasses below, or raises an :class:`~assistant.errors.AssistantError`
whose ``param`` is the path of the offending field (``item.content[0].text``) and
whose ``event_id`` is the client's, when the frame had one.

Both dialects are accepted: GA names and the beta ones (``modalities``,
``max_response_output_tokens``, assistant parts of type ``text``). Fields this
server uses are checked strictly. Fields it cannot act on are never silently
dropped: audio output, audio formats, voices, turn detection and transcription
(``audio_not_supported``) come back in the event's ``refused`` errors while the
rest of the same ``session.update`` / ``response.create`` is applied. Fields with
no effect on a text server (``tracing``, ``truncation``, ``include``...) are accepted.

Function calling: ``tools`` are validated here (:func:`assistant.tools.parse_tools`,
which also refuses a schema constrained decoding cannot compile); ``tool_choice`` is
kept as sent, because a ``session.update`` may name a tool the session already has:
the session checks it against the effective tools. Items may be ``function_call``
(``call_id``, ``name``, ``arguments``) or ``function_call_output`` (``call_id``,
``output``) besides messages. Our extensions are additive:
``temperature``, ``top_p``, ``seed``, ``stop`` and ``repetition_penalty``, next to
OpenAI's ``frequency_penalty`` and ``presence_penalty``, inside ``session`` and
``response``; and the event ``image.match`` (:class:`ImageMatch`: one image, 1 to
:data:`MAX_MATCH_TEXTS` texts of at most :data:`MAX_MATCH_TEXT_CHARS` characters, an
optional ``prompt``), whose image URL is checked by the session like an item's.

Numbers: a JSON integer of more than 64 digits reads as infinity, so it fails
its field's range check with a coded error instead of costing CPU or overflowing.
Nesting: an event nested deeper than :data:`MAX_JSON_DEPTH` is refused before any
field is read (the readers and the schema compiler recurse). Errors quote at most
64 characters of any client value (:func:`assistant.errors.quote`).

Serialization of server events lives in :mod:`assistant.events`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from assistant.engine.request import DEFAULT_SCORING, SCORINGS
from assistant.engine.sampling import SAMPLING_FIELDS, check_sampling_value
from assistant.errors import (AssistantError, AudioNotSupported, InvalidJSON, InvalidType, InvalidValue,
                              MissingParameter, UnknownEventType, quote)
from assistant.items import DETAILS, ROLES, ItemType
from assistant.tool_calls import NAME_PATTERN
from assistant.tools import FunctionTool, parse_tools

MAX_ID_LENGTH = 64
MAX_INSTRUCTIONS_CHARS = 100_000
# One text part; far beyond any context this server runs, small enough to render quickly.
MAX_TEXT_CHARS = 200_000
MAX_METADATA_ENTRIES = 16
MAX_METADATA_CHARS = 512
MAX_INTEGER_DIGITS = 64
# Objects and arrays inside one another; a tool's schema nests two levels per level of its own.
MAX_JSON_DEPTH = 64
# image.match: texts scored per event, and the length of each text and of the prompt.
MAX_MATCH_TEXTS = 16
MAX_MATCH_TEXT_CHARS = 1_000

# Realtime audio events a text server cannot act on: one ``audio_not_supported`` error each.
# (``input_audio_buffer.clear`` is answered: the buffer is always empty here.)
AUDIO_EVENTS = frozenset({
    "input_audio_buffer.append", "input_audio_buffer.commit", "output_audio_buffer.clear",
    "conversation.item.truncate", "transcription_session.update",
})
# Session / response fields that only matter for audio (GA and beta names); any non-null value is refused.
AUDIO_FIELDS = ("voice", "input_audio_format", "output_audio_format", "input_audio_transcription",
                "turn_detection", "input_audio_noise_reduction", "speed")
FLOAT_SAMPLING_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty")


@dataclass(frozen=True)
class TextInput:
    type: Literal["input_text", "output_text"]
    text: str


@dataclass(frozen=True)
class ImageInput:
    image_url: str
    detail: str = "auto"


@dataclass(frozen=True)
class ItemInput:
    """A message (``content``), a tool call (``call_id``, ``name``, ``arguments``; role assistant) or a tool's
    result (``call_id``, ``output``; role user)."""

    id: str | None
    role: str
    content: tuple[TextInput | ImageInput, ...]
    type: ItemType = "message"
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


@dataclass(frozen=True)
class SettingChanges:
    """What an event changes: ``instructions`` (None leaves it); ``sampling``: the
    :class:`~assistant.engine.sampling.SamplingParams` fields it sets, already range-checked
    (``max_output_tokens: None`` is "inf", no cap); ``tools`` (None leaves them), validated; and
    ``tool_choice`` as sent (None leaves it), for the session to check against the effective tools."""

    instructions: str | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    tools: tuple[FunctionTool, ...] | None = None
    tool_choice: Any = None


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    changes: SettingChanges
    refused: tuple[AssistantError, ...] = ()  # fields not applied; the rest of the event is
    cancel_on_disconnect: bool | None = None  # extension; None leaves it


@dataclass(frozen=True)
class ItemCreate:
    event_id: str | None
    item: ItemInput
    previous_item_id: str | None = None  # None = append, "root" = first, else insert after


@dataclass(frozen=True)
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ItemRetrieve:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ResponseCreate:
    event_id: str | None
    changes: SettingChanges
    use_conversation: bool = True  # conversation: "auto" (default) or "none"
    input: tuple[ItemInput, ...] | None = None  # replaces the conversation as the prompt
    metadata: dict[str, str] | None = None
    refused: tuple[AssistantError, ...] = ()  # fields not applied; the rest of the event is


@dataclass(frozen=True)
class ResponseCancel:
    event_id: str | None
    response_id: str | None


@dataclass(frozen=True)
class AudioBufferClear:
    """``input_audio_buffer.clear``: answered with ``input_audio_buffer.cleared`` (it is always empty)."""

    event_id: str | None


@dataclass(frozen=True)
class ImageMatch:
    """``image.match`` (extension): score ``texts`` against ``image``; ``prompt`` None = the server's default."""

    event_id: str | None
    image: ImageInput  # image_url not yet decoded: the session checks it like an item's image
    texts: tuple[str, ...]
    prompt: str | None = None
    scoring: str = DEFAULT_SCORING  # one of request.SCORINGS


ClientEvent = (SessionUpdate | ItemCreate | ItemDelete | ItemRetrieve | ResponseCreate | ResponseCancel
               | AudioBufferClear | ImageMatch)


def read_json(text: str | bytes, what: str) -> Any:
    """JSON text → value; huge integers read as ±infinity (every field refuses them); InvalidJSON naming
    ``what`` (e.g. "every client event is a JSON object") when it is not JSON."""
    try:
        return json.loads(text, parse_int=_parse_int)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidJSON(f"The message is not valid JSON; {what}.") from None


def parse_client_event(frame: str | bytes) -> ClientEvent:
    """Parse one frame; raise a coded AssistantError carrying the client's event_id."""
    data = read_json(frame, "every client event is a JSON object")
    if not isinstance(data, dict):
        raise InvalidJSON("The message must be a JSON object with a 'type' field.")
    raw_event_id = data.get("event_id")
    event_id = raw_event_id if isinstance(raw_event_id, str) and _is_unicode(raw_event_id) else None
    try:
        if raw_event_id is not None and not isinstance(raw_event_id, str):
            raise InvalidType("'event_id' must be a string.", param="event_id")
        check_unicode(data, "")
        kind = get_field(data, "type", str, "")
        parser = _PARSERS.get(kind)
        if parser is None:
            if kind in AUDIO_EVENTS:
                raise AudioNotSupported(f"'{kind}' needs audio; this server takes text and images only.",
                                        param="type")
            raise UnknownEventType(f"Unknown event type '{quote(kind)}'. Supported: {', '.join(sorted(_PARSERS))}.",
                                   param="type")
        return parser(data, event_id)
    except AssistantError as exc:
        exc.event_id = event_id
        raise


def _parse_int(digits: str) -> int | float:
    """JSON integers beyond 64 digits read as ±infinity: no field takes them, and each says so."""
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        return -math.inf if digits.startswith("-") else math.inf
    return int(digits)


# ---------------------------------------------------------------- field readers


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(value: Any, param: str, depth: int = 0) -> None:
    """Refuse strings that are not valid Unicode text (JSON admits lone surrogates such as "\\ud800") or that
    hold NUL: they can be neither stored nor sent back; and values nested deeper than MAX_JSON_DEPTH."""
    if isinstance(value, str):
        if not _is_unicode(value):
            raise InvalidValue(f"'{param or 'the event'}' holds a lone UTF-16 surrogate; send valid Unicode text.",
                               param=param or None)
        if "\x00" in value:  # PostgreSQL's text cannot hold it; no chat text needs it
            raise InvalidValue(f"'{param or 'the event'}' holds a NUL character (U+0000); send text without it.",
                               param=param or None)
        return
    if isinstance(value, (dict, list)) and depth >= MAX_JSON_DEPTH:
        raise InvalidValue(f"'{param}' is nested more than {MAX_JSON_DEPTH} levels deep.", param=param)
    if isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key, param, depth)
            check_unicode(item, f"{param}.{quote(key)}" if param else quote(key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_unicode(item, f"{param}[{index}]", depth + 1)

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "an object", list: "an array"}


def get_field(obj: dict[str, Any], key: str, kind: type, prefix: str, *, required: bool = True) -> Any:
    """obj[key] checked against ``kind``; missing or null → MissingParameter if required, else None."""
    param = f"{prefix}{key}"
    value = obj.get(key)
    if value is None:
        if required:
            raise MissingParameter(f"Missing required parameter '{param}'.", param=param)
        return None
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise InvalidType(f"'{param}' must be {_TYPE_NAMES[kind]}.", param=param)
    return value


def _id(obj: dict[str, Any], key: str, prefix: str, *, required: bool = True) -> str | None:
    value = get_field(obj, key, str, prefix, required=required)
    if value is not None and not 0 < len(value) <= MAX_ID_LENGTH:
        raise InvalidValue(f"'{prefix}{key}' must be 1 to {MAX_ID_LENGTH} characters.", param=f"{prefix}{key}")
    return value


def _item_id(obj: dict[str, Any], prefix: str) -> str | None:
    """A client-chosen item id; "root" is reserved (``previous_item_id: "root"`` means "first")."""
    value = _id(obj, "id", prefix, required=False)
    if value == "root":
        raise InvalidValue(f"'{prefix}id' must not be \"root\": that name is reserved.", param=f"{prefix}id")
    return value


def _parse_changes(obj: dict[str, Any], prefix: str, *, beta_max_key: str) -> SettingChanges:
    instructions = get_field(obj, "instructions", str, prefix, required=False)
    if instructions is not None and len(instructions) > MAX_INSTRUCTIONS_CHARS:
        raise InvalidValue(f"'{prefix}instructions' exceeds {MAX_INSTRUCTIONS_CHARS} characters.",
                           param=f"{prefix}instructions")
    sampling: dict[str, Any] = {}
    max_key = "max_output_tokens" if "max_output_tokens" in obj else beta_max_key
    max_tokens = obj.get(max_key)
    if max_tokens == "inf":
        sampling["max_output_tokens"] = None
    elif max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidValue(f"'{prefix}{max_key}' must be a positive integer or \"inf\".",
                               param=f"{prefix}{max_key}")
        sampling["max_output_tokens"] = max_tokens
    for name in FLOAT_SAMPLING_FIELDS:
        sampling[name] = get_field(obj, name, float, prefix, required=False)
    sampling["seed"] = get_field(obj, "seed", int, prefix, required=False)
    sampling["stop"] = _parse_stop(obj, prefix)
    for name in SAMPLING_FIELDS:
        if name in sampling and sampling[name] is None and name != "max_output_tokens":
            del sampling[name]  # absent or null: leave the current value
        elif name in sampling:
            problem = check_sampling_value(name, sampling[name])
            if problem:
                raise InvalidValue(f"'{prefix}{name}' {problem}.", param=f"{prefix}{name}")
    raw_tools = obj.get("tools")
    tools = None if raw_tools is None else parse_tools(raw_tools, param=f"{prefix}tools")
    return SettingChanges(instructions, sampling, tools, obj.get("tool_choice"))


def _parse_stop(obj: dict[str, Any], prefix: str) -> tuple[str, ...] | None:
    stop = obj.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidType(f"'{prefix}stop' must be a string or an array of strings.", param=f"{prefix}stop")
    return tuple(stop)


def _refusals(obj: dict[str, Any], prefix: str) -> tuple[AssistantError, ...]:
    """The fields of a session or response that this text server cannot act on (audio), as at most one error
    naming every such field. Malformed values raise as usual."""
    audio: list[str] = []
    for key in ("output_modalities", "modalities"):
        modalities = get_field(obj, key, list, prefix, required=False)
        if modalities is None:
            continue
        if not modalities or any(m not in ("text", "audio") for m in modalities):
            raise InvalidValue(f"'{prefix}{key}' must be [\"text\"] (or include \"audio\", which is refused).",
                               param=f"{prefix}{key}")
        if "audio" in modalities:
            audio.append(f"{prefix}{key}")
    audio += [f"{prefix}{key}" for key in AUDIO_FIELDS if obj.get(key) is not None]
    audio_config = get_field(obj, "audio", dict, prefix, required=False) or {}
    for direction in ("input", "output"):
        settings = get_field(audio_config, direction, dict, f"{prefix}audio.", required=False) or {}
        audio += [f"{prefix}audio.{direction}.{key}" for key, value in settings.items() if value is not None]
    if not audio:
        return ()
    return (AudioNotSupported(
        f"This server produces text only; not applied: {', '.join(audio)}. The rest of the event was applied.",
        param=audio[0]),)


def _parse_part(part: Any, role: str, prefix: str) -> TextInput | ImageInput:
    if not isinstance(part, dict):
        raise InvalidType(f"'{prefix}' must be an object.", param=prefix)
    kind = get_field(part, "type", str, f"{prefix}.")
    allowed = {"user": ("input_text", "input_image"), "system": ("input_text",),
               "assistant": ("output_text", "text")}[role]
    if kind not in allowed:
        raise InvalidValue(f"'{prefix}.type' must be one of {', '.join(allowed)} for a {role} message.",
                           param=f"{prefix}.type")
    if kind == "input_image":
        detail = get_field(part, "detail", str, f"{prefix}.", required=False) or "auto"
        if detail not in DETAILS:
            raise InvalidValue(f"'{prefix}.detail' must be one of {', '.join(DETAILS)}.", param=f"{prefix}.detail")
        return ImageInput(get_field(part, "image_url", str, f"{prefix}."), detail)
    text = get_field(part, "text", str, f"{prefix}.")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidValue(f"'{prefix}.text' has {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted.",
                           param=f"{prefix}.text")
    return TextInput("input_text" if kind == "input_text" else "output_text", text)


def _parse_item(item: Any, prefix: str) -> ItemInput:
    if not isinstance(item, dict):
        raise InvalidType(f"'{prefix}' must be an object.", param=prefix)
    p = f"{prefix}."
    kind = get_field(item, "type", str, p, required=False) or "message"
    if kind == "function_call":
        name = get_field(item, "name", str, p)
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidValue(f"'{p}name' must be 1 to 64 letters, digits, '_' or '-'.", param=f"{p}name")
        return ItemInput(_item_id(item, p), "assistant", (), "function_call", call_id=_id(item, "call_id", p),
                         name=name, arguments=_long_text(item, "arguments", p))
    if kind == "function_call_output":
        return ItemInput(_item_id(item, p), "user", (), "function_call_output", call_id=_id(item, "call_id", p),
                         output=_long_text(item, "output", p))
    if kind != "message":
        raise InvalidValue(f"'{p}type' must be \"message\", \"function_call\" or \"function_call_output\".",
                           param=f"{p}type")
    role = get_field(item, "role", str, p)
    if role not in ROLES:
        raise InvalidValue(f"'{p}role' must be one of {', '.join(ROLES)}.", param=f"{p}role")
    content = get_field(item, "content", list, p)
    if not content:
        raise InvalidValue(f"'{p}content' must hold at least one part.", param=f"{p}content")
    parts = tuple(_parse_part(part, role, f"{p}content[{i}]") for i, part in enumerate(content))
    return ItemInput(_item_id(item, p), role, parts)


def _long_text(obj: dict[str, Any], key: str, prefix: str) -> str:
    """A required string of at most MAX_TEXT_CHARS characters (a call's arguments, a tool's output)."""
    text = get_field(obj, key, str, prefix)
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidValue(f"'{prefix}{key}' has {len(text)} characters; at most {MAX_TEXT_CHARS} are accepted.",
                           param=f"{prefix}{key}")
    return text


def _session_update(data: dict[str, Any], event_id: str | None) -> SessionUpdate:
    session = get_field(data, "session", dict, "")
    kind = session.get("type")
    if kind not in (None, "realtime"):
        raise InvalidValue("'session.type' must be \"realtime\".", param="session.type")
    return SessionUpdate(event_id, _parse_changes(session, "session.", beta_max_key="max_response_output_tokens"),
                         _refusals(session, "session."),
                         get_field(session, "cancel_on_disconnect", bool, "session.", required=False))


def _item_create(data: dict[str, Any], event_id: str | None) -> ItemCreate:
    item = _parse_item(get_field(data, "item", dict, ""), "item")
    return ItemCreate(event_id, item, _id(data, "previous_item_id", "", required=False))


def _item_delete(data: dict[str, Any], event_id: str | None) -> ItemDelete:
    return ItemDelete(event_id, _id(data, "item_id", ""))


def _item_retrieve(data: dict[str, Any], event_id: str | None) -> ItemRetrieve:
    return ItemRetrieve(event_id, _id(data, "item_id", ""))


def _response_create(data: dict[str, Any], event_id: str | None) -> ResponseCreate:
    response = get_field(data, "response", dict, "", required=False) or {}
    p = "response."
    changes = _parse_changes(response, p, beta_max_key="max_response_output_tokens")
    conversation = get_field(response, "conversation", str, p, required=False) or "auto"
    if conversation not in ("auto", "none"):
        raise InvalidValue("'response.conversation' must be \"auto\" or \"none\".", param="response.conversation")
    raw_input = get_field(response, "input", list, p, required=False)
    items = None if raw_input is None else tuple(_parse_item(it, f"{p}input[{i}]") for i, it in enumerate(raw_input))
    metadata = get_field(response, "metadata", dict, p, required=False)
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidType("'response.metadata' values must be strings.", param="response.metadata")
    if metadata is not None and (len(metadata) > MAX_METADATA_ENTRIES
                                 or any(len(k) > 64 or len(v) > MAX_METADATA_CHARS for k, v in metadata.items())):
        raise InvalidValue(f"'response.metadata' takes at most {MAX_METADATA_ENTRIES} entries, keys of up to 64 and "
                           f"values of up to {MAX_METADATA_CHARS} characters.", param="response.metadata")
    return ResponseCreate(event_id, changes, conversation == "auto", items, metadata, _refusals(response, p))


def _response_cancel(data: dict[str, Any], event_id: str | None) -> ResponseCancel:
    return ResponseCancel(event_id, _id(data, "response_id", "", required=False))


def _audio_buffer_clear(data: dict[str, Any], event_id: str | None) -> AudioBufferClear:
    return AudioBufferClear(event_id)


def _image_match(data: dict[str, Any], event_id: str | None) -> ImageMatch:
    image = get_field(data, "image", dict, "")
    detail = get_field(image, "detail", str, "image.", required=False) or "auto"
    if detail not in DETAILS:
        raise InvalidValue(f"'image.detail' must be one of {', '.join(DETAILS)}.", param="image.detail")
    texts = get_field(data, "texts", list, "")
    if not 1 <= len(texts) <= MAX_MATCH_TEXTS:
        raise InvalidValue(f"'texts' holds {len(texts)} texts; send 1 to {MAX_MATCH_TEXTS}.", param="texts")
    for index, text in enumerate(texts):
        _check_match_text(text, f"texts[{index}]")
    prompt = data.get("prompt")
    if prompt is not None:
        _check_match_text(prompt, "prompt")
    scoring = get_field(data, "scoring", str, "", required=False)
    scoring = DEFAULT_SCORING if scoring is None else scoring
    if scoring not in SCORINGS:
        raise InvalidValue(f"'scoring' must be one of {', '.join(SCORINGS)}.", param="scoring")
    return ImageMatch(event_id, ImageInput(get_field(image, "image_url", str, "image."), detail), tuple(texts), prompt,
                      scoring)


def _check_match_text(text: Any, param: str) -> None:
    if not isinstance(text, str):
        raise InvalidType(f"'{param}' must be a string.", param=param)
    if not 0 < len(text) <= MAX_MATCH_TEXT_CHARS:
        raise InvalidValue(f"'{param}' has {len(text)} characters; send 1 to {MAX_MATCH_TEXT_CHARS}.", param=param)


_PARSERS = {
    "session.update": _session_update,
    "conversation.item.create": _item_create,
    "conversation.item.delete": _item_delete,
    "conversation.item.retrieve": _item_retrieve,
    "response.create": _response_create,
    "response.cancel": _response_cancel,
    "input_audio_buffer.clear": _audio_buffer_clear,
    "image.match": _image_match,
}
