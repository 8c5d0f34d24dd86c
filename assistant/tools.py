"""Function tools and structured output for both APIs: validate, prompt, constrain. Pure: no torch, no sockets.

The Chat Completions API and the Realtime session call, per response:

1. validate what the client sent: :func:`parse_tools` (Chat Completions'
   ``{"type": "function", "function": {...}}`` and Realtime's flat
   ``{"type": "function", "name": ...}``), :func:`parse_tool_choice` (``"auto"``,
   ``"none"``, ``"required"``, or one named function in either shape) and
   :func:`parse_response_format` (``text``, ``json_object``, ``json_schema``).
   Mistakes raise :mod:`assistant.errors` coded errors whose ``param`` is the
   path of the field (``tools[1].function.parameters``); a schema that
   constrained decoding cannot compile raises ``unsupported_schema`` here, before
   anything is queued;
2. :func:`tools_prompt`: the text to append to the system message, from the
   template ``prompts/tools.md`` (``$tools``: one JSON line per tool; ``$rules``:
   what ``tool_choice`` and ``parallel_tool_calls`` allow);
3. :func:`build_grammar`: the ``GenerationRequest.grammar`` that makes every
   answer valid by construction: with ``auto`` free text (or the
   ``response_format`` JSON) OR tool calls; with ``required`` calls only; with a
   named function one call of it; with ``none`` no call. Every call names a
   declared tool and its arguments follow that tool's ``parameters`` schema;
4. :mod:`assistant.tool_calls` parses the answer back (streaming or whole) and
   renders calls and results into the next turn's messages.

Grammars are in llguidance's Lark dialect: JSON schemas inline as ``%json{...}``,
their output kept compact (``", "``, ``": "``) so a small model cannot wander
into whitespace. ``strict: true`` asks for OpenAI's strict subset (every object
closed with ``additionalProperties: false`` and listing all its properties as
``required``); the arguments are held to the schema either way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from string import Template
from typing import Any, Literal

from assistant.errors import InvalidType, InvalidValue, MissingParameter, UnsupportedSchema, quote
from assistant.prompts import PROMPTS_DIR
from assistant.tool_calls import CLOSE, HEADER_END, HEADER_START, NAME_PATTERN, SEPARATOR, TAG

TOOLS_PROMPT_FILE = PROMPTS_DIR / "tools.md"
MAX_TOOLS = 128  # OpenAI's limit
MAX_SCHEMA_CHARS = 100_000  # one tool's parameters (or a response format's schema), as JSON
MAX_DESCRIPTION_CHARS = 4_000
NO_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # llguidance's options
# Any text that does not start as a tool call: llguidance's lexemes take & (and) and ~ (not).
FREE_TEXT = f"TEXT: /(.|\\n)*/ & ~/{TAG}(.|\\n)*/"


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None  # the one function to call, when mode == "function"


@dataclass(frozen=True)
class ResponseFormat:
    """``json_object`` (schema ``{"type": "object"}``) or ``json_schema``; ``text`` is no format (None)."""

    schema: Mapping[str, Any]
    name: str | None = None
    strict: bool = False

    def to_openai(self) -> dict[str, Any]:
        """As Chat Completions' ``response_format`` (for a remote engine, which holds the answer to it itself)."""
        return {"type": "json_schema", "json_schema": {"name": self.name or "response", "schema": dict(self.schema),
                                                       "strict": self.strict}}


# ------------------------------------------------------------------ validation


def parse_tools(value: Any, *, param: str = "tools") -> tuple[FunctionTool, ...]:
    """The function tools of a request (None: none), in either API's shape."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidType(f"'{param}' must be an array of tools", param=param)
    if len(value) > MAX_TOOLS:
        raise InvalidValue(f"'{param}' holds {len(value)} tools; at most {MAX_TOOLS} are allowed", param=param)
    tools = tuple(_parse_tool(tool, f"{param}[{i}]") for i, tool in enumerate(value))
    names = [tool.name for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidValue(f"two tools are named '{name}'; tool names must be unique", param=f"{param}[{i}]")
    return tools


def _parse_tool(tool: Any, param: str) -> FunctionTool:
    if not isinstance(tool, dict):
        raise InvalidType(f"'{param}' must be an object", param=param)
    if tool.get("type") != "function":
        raise InvalidValue(f"'{param}.type' must be 'function' (the only tool type this server runs)",
                           param=f"{param}.type")
    tool, param = _unwrap(tool, "function", param)  # Chat Completions nests it; Realtime's tools are flat
    name = _name(tool, param)
    description = tool.get("description") or ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidValue(f"'{param}.description' must be a string of at most {MAX_DESCRIPTION_CHARS} characters",
                           param=f"{param}.description")
    strict = _optional_bool(tool, "strict", param)
    parameters = tool.get("parameters")
    parameters = dict(NO_PARAMETERS) if parameters is None else _object_schema(parameters, f"{param}.parameters")
    if strict:
        _check_strict(parameters, f"{param}.parameters")
    check_schema(parameters, param=f"{param}.parameters")
    return FunctionTool(name, description, parameters, strict)


def parse_tool_choice(value: Any, tools: Sequence[FunctionTool], *, param: str = "tool_choice") -> ToolChoice:
    """``tool_choice`` against the request's tools; None means "auto" with tools, "none" without (OpenAI's)."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise InvalidValue(f"'{param}' must be 'auto', 'none', 'required' or a function", param=param)
        if value == "required" and not tools:
            raise InvalidValue(f"'{param}' is 'required' but no tools are given", param=param)
        return ToolChoice(value)  # type: ignore[arg-type]
    if not isinstance(value, dict):
        raise InvalidType(f"'{param}' must be a string or an object", param=param)
    if value.get("type") != "function":
        raise InvalidValue(f"'{param}.type' must be 'function'", param=f"{param}.type")
    value, param = _unwrap(value, "function", param)  # Chat Completions nests it; Realtime's is flat
    name = _required_string(value, "name", param)
    if name not in {tool.name for tool in tools}:
        raise InvalidValue(f"'{param}.name' names '{quote(name)}', which is not among the tools",
                           param=f"{param}.name")
    return ToolChoice("function", name)


def parse_response_format(value: Any, *, param: str = "response_format") -> ResponseFormat | None:
    """``{"type": "text" | "json_object" | "json_schema", ...}``; ``json_schema``'s fields nested under
    ``json_schema`` (Chat Completions) or flat (Responses' ``text.format``). None and ``text`` give None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidType(f"'{param}' must be an object", param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat({"type": "object"})
    if kind != "json_schema":
        raise InvalidValue(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'", param=f"{param}.type")
    value, param = _unwrap(value, "json_schema", param)
    name = _name(value, param)
    schema = value.get("schema")
    if not isinstance(schema, dict):
        raise InvalidType(f"'{param}.schema' must be a JSON schema object", param=f"{param}.schema")
    strict = _optional_bool(value, "strict", param)
    if strict:
        _check_strict(schema, f"{param}.schema")
    check_schema(schema, param=f"{param}.schema")
    return ResponseFormat(schema, name, strict)


def check_schema(schema: Mapping[str, Any], *, param: str) -> None:
    """Raise UnsupportedSchema if constrained decoding cannot compile ``schema`` (no tokenizer needed)."""
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidValue(f"'{param}' is {len(text)} characters as JSON; at most {MAX_SCHEMA_CHARS} are allowed",
                           param=param)
    error = _schema_error(text)
    if error:
        # llguidance's words may quote the schema's strings (a pattern, a name, a type) anywhere, as they are or
        # escaped as in JSON (a string of backslashes comes out doubled): each at most as quote() quotes any client
        # input, the whole at most 256 characters.
        forms = {form for text in _long_strings(schema) for form in (text, *_escaped(text))}
        for form in sorted(forms, key=len, reverse=True):
            error = error.replace(form, quote(form))
        raise UnsupportedSchema(f"'{param}' cannot be used for constrained decoding: {error[:256]}", param=param)


def _escaped(text: str) -> tuple[str, str]:
    """``text`` as a JSON string's inside, with and without non-ASCII escaped."""
    return json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]


def _long_strings(value: Any) -> set[str]:
    """The keys and string values in ``value`` (a JSON document) that quote() would shorten, as they are or
    escaped as in JSON."""
    if isinstance(value, str):
        return {value} if any(quote(form) != form for form in (value, *_escaped(value))) else set()
    if isinstance(value, Mapping):
        return set().union(*(_long_strings(key) | _long_strings(item) for key, item in value.items()))
    if isinstance(value, list):
        return set().union(*(_long_strings(item) for item in value))
    return set()


@functools.lru_cache(maxsize=512)
def _schema_error(schema_json: str) -> str:
    """What llguidance says against the schema ("" if nothing); ~2 ms, so a conversation's tools are checked once,
    not every turn."""
    import llguidance  # no torch: a Rust extension

    try:
        error = llguidance.LLMatcher.validate_grammar(f"start: {_json(json.loads(schema_json))}")
    except BaseException as exc:  # a Rust panic arrives as pyo3's PanicException, a BaseException
        if type(exc).__name__ != "PanicException":
            raise
        # llguidance 1.x panics cutting its own message inside a multi-byte character (a long emoji string where
        # it wanted an array, found by tests/test_fuzz.py): the schema is unusable either way.
        return "the grammar library could not read it"
    return _library_error(error) if error else ""


def _library_error(error: str) -> str:
    """llguidance's message without its position prefix and its echo of the grammar."""
    lines = [line for line in error.splitlines()
             if not line.lstrip()[:1].isdigit() and not set(line.strip()) <= {"^"}]
    text = " ".join(" ".join(lines).split())
    return text.split(": ", 1)[1] if text.startswith("at ") and ": " in text else text


def _object_schema(schema: Any, param: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise InvalidType(f"'{param}' must be a JSON schema object", param=param)
    kind = schema.get("type", "object")
    if kind != "object":
        raise InvalidValue(f"'{param}' must describe an object (type 'object'), not {quote(json.dumps(kind))}",
                           param=param)
    return {**schema, "type": "object"}


def _check_strict(schema: Any, param: str) -> None:
    """OpenAI's strict subset: every object closed and listing all its properties as required."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            _check_strict(item, f"{param}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    properties = schema.get("properties")
    if schema.get("type") == "object" or isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            raise InvalidValue(f"strict schemas need 'additionalProperties': false on every object, "
                               f"and '{param}' has none", param=param)
        missing = sorted(set(properties or {}) - set(schema.get("required") or []))
        if missing:
            raise InvalidValue(f"strict schemas list every property as required; '{param}' leaves out "
                               f"{quote(', '.join(missing))}", param=f"{param}.required")
    for key in ("properties", "$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            _check_strict(sub, f"{param}.{key}.{quote(name)}")
    for key in ("items", "anyOf"):
        if key in schema:
            _check_strict(schema[key], f"{param}.{key}")


def _unwrap(value: dict[str, Any], key: str, param: str) -> tuple[dict[str, Any], str]:
    """``value[key]`` and its path when the object nests its fields under ``key``, else ``value`` itself."""
    if key not in value:
        return value, param
    nested, param = value[key], f"{param}.{key}"
    if not isinstance(nested, dict):
        raise InvalidType(f"'{param}' must be an object", param=param)
    return nested, param


def _name(value: dict[str, Any], param: str) -> str:
    """A function's (or a response format's) name, as OpenAI allows them."""
    name = _required_string(value, "name", param)
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidValue(f"'{param}.name' must be 1 to 64 letters, digits, '_' or '-'", param=f"{param}.name")
    return name


def _required_string(value: dict[str, Any], key: str, param: str) -> str:
    if key not in value:
        raise MissingParameter(f"'{param}.{key}' is required", param=f"{param}.{key}")
    if not isinstance(value[key], str):
        raise InvalidType(f"'{param}.{key}' must be a string", param=f"{param}.{key}")
    return value[key]


def _optional_bool(value: dict[str, Any], key: str, param: str) -> bool:
    flag = value.get(key)
    if flag is not None and not isinstance(flag, bool):
        raise InvalidType(f"'{param}.{key}' must be a boolean", param=f"{param}.{key}")
    return bool(flag)


# ------------------------------------------------------------------ prompt and grammar


def calls_allowed(tools: Sequence[FunctionTool], choice: ToolChoice) -> bool:
    return bool(tools) and choice.mode != "none"


def tools_prompt(tools: Sequence[FunctionTool], choice: ToolChoice, *, parallel_tool_calls: bool = True) -> str:
    """What to append to the system message so the model knows its tools ("" when it may call none)."""
    if not calls_allowed(tools, choice):
        return ""
    lines = [json.dumps({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                           "parameters": tool.parameters}}, ensure_ascii=False)
             for tool in tools]
    rules = {"auto": "Call a function only when it helps; otherwise answer in plain text.",
             "required": "You must call a function.",
             "function": f"You must call the function {choice.name}."}[choice.mode]
    if parallel_tool_calls and choice.mode != "function":
        rules += " You may call several functions at once: one <tool_call> block each, one line apart."
    else:
        rules += " Call one function at most."
    return _tools_template().substitute(tools="\n".join(lines), rules=rules).strip()


@functools.cache
def _tools_template() -> Template:
    return Template(TOOLS_PROMPT_FILE.read_text(encoding="utf-8"))  # read once: callers may be on the event loop


def template_tools(tools: Sequence[FunctionTool], choice: ToolChoice) -> tuple[dict[str, Any], ...]:
    """The tools the model may call, in OpenAI's shape, for a chat template that describes tools itself
    (``GenerationRequest.tools``; then :func:`tools_prompt` is not used)."""
    if not calls_allowed(tools, choice):
        return ()
    return tuple({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                   "parameters": dict(tool.parameters)}}
                 for tool in tools if choice.mode != "function" or tool.name == choice.name)


def template_tool_choice(choice: ToolChoice) -> Literal["auto", "required"]:
    """``GenerationRequest.tool_choice`` beside :func:`template_tools` (which already keeps only a named tool)."""
    return "required" if choice.mode in ("required", "function") else "auto"


def build_grammar(tools: Sequence[FunctionTool], choice: ToolChoice, *, parallel_tool_calls: bool = True,
                  response_format: ResponseFormat | None = None) -> str | None:
    """The grammar every answer must match (see the module docstring), or None when any text will do."""
    answer = _json(response_format.schema) if response_format else "TEXT"
    if not calls_allowed(tools, choice):
        return f"start: {answer}" if response_format else None
    callable_tools = [tool for tool in tools if choice.mode != "function" or tool.name == choice.name]
    calls = f"call ({json.dumps(SEPARATOR)} call)*" if parallel_tool_calls and choice.mode != "function" else "call"
    rules = [f"start: {answer} | {calls}" if choice.mode == "auto" else f"start: {calls}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(callable_tools)))]
    rules += [f"call_{i}: {json.dumps(HEADER_START + tool.name + HEADER_END)} {_json(tool.parameters)} "
              f"{json.dumps(CLOSE)}" for i, tool in enumerate(callable_tools)]
    if choice.mode == "auto" and not response_format:
        rules.append(FREE_TEXT)
    return "\n".join(rules)


def _json(schema: Mapping[str, Any]) -> str:
    """A Lark rule body for JSON that follows ``schema``, compact."""
    return "%json" + json.dumps({**schema, "x-guidance": COMPACT_JSON})
