"""Every error the assistant reports to a client, with its stable wire code.

One hierarchy, rooted at :class:`AssistantError`. Each error carries:

- ``code``: a stable, documented string sent as ``error.code`` on the wire;
- ``type``: the Realtime error type (``invalid_request_error`` for the client's
  mistakes, ``server_error`` for ours);
- ``param``: the path of the offending field inside the client event, if any
  (``item.content[1].image_url``);
- ``message``: what was expected, in words a client developer can act on.

A message quotes at most :data:`MAX_QUOTED_CHARS` characters of any one client value (:func:`quote`), and a
``param`` path is at most :data:`MAX_PARAM_CHARS` long, so an error never echoes a large part of a client's input.

The session turns any ``AssistantError`` into one ``error`` event and keeps the
connection open. Anything else raised while handling an event is a bug: the
client sees only :class:`InternalError`'s generic message, never a traceback.

Codes (see README "Errors"):

==================================== ==================================================
code                                 meaning
==================================== ==================================================
invalid_json                         the frame is not a JSON object
unknown_event_type                   ``type`` is not an event this server accepts
missing_required_parameter           a required field is absent
invalid_type                         a field has the wrong JSON type
invalid_value                        a field has the right type but a refused value
item_not_found                       an ``item_id`` / ``previous_item_id`` is unknown
item_already_exists                  ``item.id`` is already used in this conversation
conversation_not_found               ``?conversation=ID`` names no stored conversation
conversation_already_has_active_response  ``response.create`` while one is running
response_not_found                   ``response.cancel`` names another response than the running one
response_cancel_not_active           ``response.cancel`` while no response runs
replay_unavailable                   ``?last_event_id=EVT``: the events after EVT are no longer held (or never
                                     were); the live events follow, and ``response.done`` (or
                                     ``conversation.item.retrieve``) has the whole output
audio_not_supported                  an audio event, or audio fields (formats, voice, turn
                                     detection, audio output): the rest of the event is applied
unsupported_schema                   a tool's ``parameters`` or a ``response_format`` schema that
                                     constrained decoding cannot compile (an unsupported keyword,
                                     a regex pattern it cannot take); nothing is generated
message_too_large                    a message exceeds ``max_message_bytes``: HTTP 413; on a WebSocket it is
                                     refused from its frame header, and the connection closes with 1009 and
                                     the reason ``message_too_large: ...`` (no error event)
send_timeout                         only as a close reason (1008): the client left what the server sent
                                     unread for ``send_timeout`` seconds (:mod:`assistant.websocket_protocol`)
missing_api_key                      keys are required and none was sent (HTTP 401)
invalid_api_key                      the key is unknown or revoked (HTTP 401)
origin_not_allowed                   a browser page from another origin (not in ``--allowed-origins``)
                                     tried to use the server (HTTP 403)
rate_limit_exceeded                  the tenant already runs ``--max-responses-per-tenant`` responses
                                     (HTTP 429); retry when one ends
image_*                              an image was refused (see assistant.images)
too_many_images / too_many_image_tokens  image budgets per message or conversation
server_overloaded                    the engine's queue is full; retry later
server_shutting_down                 the server is draining (SIGTERM): no new responses; a response
                                     cut by the drain ends ``incomplete`` (``server_shutdown``).
                                     Retry on a new connection once the server is back
context_length_exceeded              the latest message (with the instructions) does not fit the
                                     model's context, even with all older turns left out
invalid_prompt                       the model cannot take the conversation (its chat template
                                     refused it, it holds images and the model takes none, or it is
                                     empty: conversation "none", no input, no instructions)
image_not_found                      an image the response needs was deleted (with its item)
                                     while the response waited for the model
generation_failed                    generation failed inside the model (the server log says why)
upstream_unavailable                 the remote engine (``--engine openai``) could not be reached, timed
                                     out, failed or refused the request (HTTP 502); retryable: the
                                     conversation is intact
not_supported_by_engine              the engine in use cannot do this (``image.match`` with a remote engine)
storage_unavailable                  the database cannot be written or reached (a full disk, a database
                                     that is down); retryable: nothing half-done was kept, and a
                                     response cut short by it is stored as the client was told
internal_error                       our fault; details are in the server log only
==================================== ==================================================
"""

from __future__ import annotations

MAX_QUOTED_CHARS = 64
MAX_PARAM_CHARS = 256


def quote(text: str) -> str:
    """Client input as an error message or ``param`` quotes it: its first :data:`MAX_QUOTED_CHARS` characters."""
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


class AssistantError(Exception):
    """Base of every error that reaches a client as an ``error`` event."""

    code: str = "internal_error"
    type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # A path of client-chosen keys; each is quoted, but a deep one is long.
        self.param = param if param is None or len(param) <= MAX_PARAM_CHARS else param[:MAX_PARAM_CHARS] + "..."
        # The client's event_id, filled in by whoever knows it (protocol or session).
        self.event_id: str | None = None
        if code is not None:
            self.code = code

    def to_wire(self) -> dict[str, object]:
        """The ``error`` object of an ``error`` event."""
        return {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "event_id": self.event_id,
        }


class InvalidRequest(AssistantError):
    """The client sent something malformed; ``code`` says which kind of wrong."""

    code = "invalid_value"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class UnknownEventType(InvalidRequest):
    code = "unknown_event_type"


class MissingParameter(InvalidRequest):
    code = "missing_required_parameter"


class InvalidType(InvalidRequest):
    code = "invalid_type"


class InvalidValue(InvalidRequest):
    code = "invalid_value"


class MessageTooLarge(InvalidRequest):
    code = "message_too_large"


class NotFound(InvalidRequest):
    """Something named by id does not exist; ``code`` says what."""

    code = "item_not_found"


class ItemNotFound(NotFound):
    code = "item_not_found"


class ConversationNotFound(NotFound):
    code = "conversation_not_found"


class ResponseNotFound(NotFound):
    code = "response_not_found"


class ResponseCancelNotActive(NotFound):
    code = "response_cancel_not_active"


class ReplayUnavailable(NotFound):
    code = "replay_unavailable"


class AudioNotSupported(InvalidRequest):
    code = "audio_not_supported"


class UnsupportedSchema(InvalidRequest):
    code = "unsupported_schema"


class ItemAlreadyExists(InvalidRequest):
    code = "item_already_exists"


class ResponseInProgress(InvalidRequest):
    code = "conversation_already_has_active_response"


class ImageRejected(InvalidRequest):
    """An image part was refused; ``code`` is one of the ``image_*`` codes."""

    code = "image_invalid"


class BudgetExceeded(InvalidRequest):
    """A configured bound was hit (images or image tokens per message/conversation)."""

    code = "too_many_images"


class Unauthorized(AssistantError):
    """No key, or one that is unknown or revoked: refused before any work (HTTP 401)."""

    code = "invalid_api_key"


class OriginNotAllowed(AssistantError):
    """A browser page from an origin that is not allowed (HTTP 403): cross-site WebSocket hijacking stops here."""

    code = "origin_not_allowed"


class RateLimitExceeded(AssistantError):
    """A per-tenant bound was hit (HTTP 429); ``type`` is OpenAI's for a request-count limit."""

    code = "rate_limit_exceeded"
    type = "requests"


class ServerShuttingDown(AssistantError):
    """The server is draining before it exits (see :mod:`assistant.drain`); retryable once it is back."""

    code = "server_shutting_down"
    type = "server_error"


class InternalError(AssistantError):
    """Our fault. The message is deliberately generic; the log has the details."""

    code = "internal_error"
    type = "server_error"

    def __init__(self, message: str = "The server hit an internal error; the conversation is intact.") -> None:
        super().__init__(message)


class StorageUnavailable(AssistantError):
    """The store cannot be written or reached (disk full, I/O error, database down). Retryable: the request was
    not applied (each store call is one transaction) and the server recovers by itself when storage returns."""

    code = "storage_unavailable"
    type = "server_error"

    def __init__(self, message: str = "The conversation store is unavailable (full disk or unreachable "
                 "database); nothing was half-written. Retry later.") -> None:
        super().__init__(message)

# The close reason's code when a WebSocket client reads nothing for ``send_timeout`` seconds (no error event:
# the client is not reading).
SEND_TIMEOUT = "send_timeout"

# The codes a failed engine request carries (``Finished.code``) and the error type a client sees each with.
# The engine's own failure, MODEL_ERROR, is shown as "generation_failed" with a generic message.
MODEL_ERROR = "generation_failed"
UNSUPPORTED_SCHEMA = UnsupportedSchema.code
UPSTREAM_UNAVAILABLE = "upstream_unavailable"
NOT_SUPPORTED_BY_ENGINE = "not_supported_by_engine"
ENGINE_ERROR_TYPES = {
    UPSTREAM_UNAVAILABLE: "server_error",
    NOT_SUPPORTED_BY_ENGINE: "invalid_request_error",
    UNSUPPORTED_SCHEMA: "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "invalid_prompt": "invalid_request_error",
    "image_not_found": "invalid_request_error",
    "server_overloaded": "server_error",
    StorageUnavailable.code: "server_error",  # a response stopped because its output could not be stored
    MODEL_ERROR: "server_error",
}


def engine_error(code: str | None, message: str | None) -> AssistantError | None:
    """A failed engine request's error (``Finished.code`` and ``.error``) as a client may see it: its code and
    message; None when the model itself failed (the server log has the details, the client a generic message)."""
    if code not in ENGINE_ERROR_TYPES or code == MODEL_ERROR:
        return None
    error = AssistantError(message or code, code=code)
    error.type = ENGINE_ERROR_TYPES[code]
    return error
