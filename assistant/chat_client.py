"""``assistant chat``: a terminal client of the Realtime socket, for a person at a keyboard.

The logic is pure and tested without a socket or a terminal: :func:`realtime_url` (what ``--url`` may be),
:func:`parse_line` (a typed line → a command), :func:`image_part` (a file → an ``input_image`` part) and
:class:`Turn` (one prompt's server events in → text to print and client events to send out). The I/O is at the
edges, in :func:`chat`: ``websockets``' synchronous client, ``input()`` at the prompt, stdout for answers and
stderr for everything else (so ``assistant chat < questions.txt > answers.txt`` keeps the answers apart).

A turn stores the user's message first and asks for the response only once the server has accepted it, so a
refused message (an image too large, ...) costs no response. Ctrl-C while an answer streams sends
``response.cancel`` and returns to the prompt (a second Ctrl-C before the server confirms quits); at the prompt,
Ctrl-C or Ctrl-D ends the program, which then prints the conversation id to continue with ``--conversation``.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

REALTIME_PATH = "/v1/realtime"
DEFAULT_URL = "http://127.0.0.1:8765"
MAX_SERVER_FRAME_BYTES = 32 * 1024 * 1024  # conversation.item.retrieved may carry images as data URLs
POLL_S = 0.1  # how often a streaming turn looks for a Ctrl-C between frames
IMAGE_TYPES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
               (b"GIF89a", "image/gif"))
# Model output is untrusted: control characters (ESC starts terminal commands) are shown as U+FFFD, not obeyed.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
HELP = ("Type a message and press Enter. /image PATH attaches an image to the next message; Ctrl-C stops an "
        "answer; Ctrl-D (or Ctrl-C at the prompt) quits.")


def realtime_url(url: str, conversation_id: str | None = None) -> str:
    """The Realtime URL from what a user would pass: ``http(s)://HOST:PORT``, the API's base URL (``.../v1``, as the
    SDKs take it) or the ``ws(s)://.../v1/realtime`` URL itself; ``?conversation=ID`` added when given."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"{url!r} is not a server address: expected http://HOST:PORT (or ws://HOST:PORT/v1/realtime)")
    path = parts.path.rstrip("/")
    if not path.endswith(REALTIME_PATH):
        path = path.removesuffix("/v1") + REALTIME_PATH
    query = urlencode({"conversation": conversation_id}) if conversation_id else parts.query
    return urlunsplit((scheme, parts.netloc, path, query, ""))


@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Attach:
    path: Path


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Help:
    text: str = HELP


Command = Say | Attach | Quit | Help


def parse_line(line: str) -> Command | None:
    """A typed line as a command; None for a blank line. ``//text`` sends ``/text``."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("//"):
        return Say(text[1:])
    if not text.startswith("/"):
        return Say(text)
    name, _, argument = text.partition(" ")
    argument = argument.strip()
    if name == "/image":
        return Attach(Path(argument).expanduser()) if argument else Help("Usage: /image PATH")
    if name in ("/quit", "/exit"):
        return Quit()
    if name == "/help":
        return Help()
    return Help(f"Unknown command {name}. {HELP}")


def image_part(path: Path) -> dict[str, Any]:
    """An ``input_image`` part with the file as a data URL. Only the type is guessed here (from the first bytes);
    the server validates the image itself. OSError when the file cannot be read."""
    data = path.read_bytes()
    mime = next((mime for magic, mime in IMAGE_TYPES if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    encoded = base64.b64encode(data).decode("ascii")
    return {"type": "input_image", "image_url": f"data:{mime or 'application/octet-stream'};base64,{encoded}"}


def user_message(text: str, images: list[dict[str, Any]]) -> dict[str, Any]:
    """``conversation.item.create`` of a user message: its images first, as the model sees them, then the text."""
    content = [*images, *([{"type": "input_text", "text": text}] if text else [])]
    return {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": content}}


@dataclass
class Turn:
    """One prompt, from the message sent to the answer's end: server events in, what to print and send out.

    ``storing`` (waiting for the message to be stored) → ``answering`` (``response.create`` sent) → ``done``.
    """

    phase: str = "storing"
    is_message_stored: bool = False
    is_cancel_requested: bool = False
    has_response: bool = False
    out: list[str] = field(default_factory=list)  # text for stdout
    notes: list[str] = field(default_factory=list)  # lines for stderr

    @property
    def is_done(self) -> bool:
        return self.phase == "done"

    def cancel(self) -> list[dict[str, Any]]:
        """Ctrl-C: the events to send (none while the message is still being stored: no response will start)."""
        self.is_cancel_requested = True
        return [{"type": "response.cancel"}] if self.phase == "answering" else []

    def on_event(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one server event; return the events to send."""
        kind = event.get("type")
        if kind == "conversation.item.added" and self.phase == "storing" and event["item"].get("role") == "user":
            self.is_message_stored = True
            if self.is_cancel_requested:
                self.phase = "done"
                return []
            self.phase = "answering"
            return [{"type": "response.create"}]
        if kind == "response.created":
            self.has_response = True
        elif kind == "response.output_text.delta":
            self.out.append(CONTROL_CHARS.sub("\ufffd", event["delta"]))
        elif kind == "response.done":
            self.phase = "done"
            self.out.append("\n")
            self._note_end(event["response"])
        elif kind == "error":
            error = event["error"]
            self.notes.append(f"error: {error.get('message')} ({error.get('code')})")
            if not self.has_response:  # the message or the response.create was refused: nothing is coming
                self.phase = "done"
        return []

    def take_output(self) -> tuple[str, list[str]]:
        out, notes = "".join(self.out), self.notes
        self.out, self.notes = [], []
        return out, notes

    def _note_end(self, response: dict[str, Any]) -> None:
        status = response.get("status")
        if status == "cancelled":
            self.notes.append("[stopped]")
        elif status == "incomplete":
            self.notes.append("[cut short at the token limit]")
        elif status == "failed":
            error = (response.get("status_details") or {}).get("error") or {}
            self.notes.append(f"[failed: {error.get('message', 'no reason given')}]")


def chat(url: str, key: str | None, conversation_id: str | None, image_paths: list[Path],
         stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Run the client until the user quits or the connection ends; the exit status."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    def note(line: str) -> None:
        print(line, file=stderr, flush=True)

    attached = [_attach(path, note) for path in image_paths]
    pending = [part for part in attached if part is not None]
    if len(pending) < len(attached):
        return 2
    is_terminal = sys.stdin.isatty()
    if is_terminal:
        import readline  # noqa: F401  (line editing and history for input())
    try:
        target = realtime_url(url, conversation_id)
        ws = connect(target, additional_headers={"Authorization": f"Bearer {key}"} if key else None,
                     max_size=MAX_SERVER_FRAME_BYTES)
    except InvalidStatus as exc:
        note(f"assistant: the server refused the connection: {_refusal(exc)}")
        return 1
    except (ValueError, InvalidURI) as exc:
        note(f"assistant: {exc}")
        return 2
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        note(f"assistant: cannot connect to {target}: {exc}")
        return 1
    is_stored = False  # the conversation exists on the server: worth printing its id at the end
    try:
        first = json.loads(ws.recv(timeout=30))
        if first.get("type") != "session.created":
            note(f"assistant: {first.get('error', {}).get('message', first)}")
            return 1
        is_stored = conversation_id is not None
        conversation_id = first["session"]["conversation_id"]
        note(f"assistant: connected to {target.split('?')[0]}, conversation {conversation_id}. {HELP}")
        while True:
            try:
                line = input("> " if is_terminal else "")  # piped questions: stdout holds only the answers
            except (EOFError, KeyboardInterrupt):
                if is_terminal:  # the shell's prompt on a line of its own
                    print(file=stdout, flush=True)
                return 0
            command = parse_line(line)
            if command is None:
                continue
            if isinstance(command, Quit):
                return 0
            if isinstance(command, Help):
                note(command.text)
            elif isinstance(command, Attach):
                part = _attach(command.path, note)
                if part is not None:
                    pending.append(part)
            else:
                ws.send(json.dumps(user_message(command.text, pending)))
                pending = []
                turn = Turn()
                _stream(ws, turn, stdout, note)
                is_stored = is_stored or turn.is_message_stored
    except ConnectionClosed as exc:
        note(f"assistant: the connection closed ({exc.rcvd.code if exc.rcvd else 'no close frame'}"
             f"{': ' + exc.rcvd.reason if exc.rcvd and exc.rcvd.reason else ''})")
        return 1
    except TimeoutError:
        note("assistant: the server did not start the session within 30 s")
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while a cancelled answer winds down
        print(file=stdout, flush=True)
        return 130
    finally:
        ws.close()
        if is_stored and conversation_id:
            note(f"assistant: conversation {conversation_id}; continue it with: "
                 f"assistant chat --conversation {conversation_id}")


def _stream(ws: Any, turn: Turn, stdout: TextIO, note: Any) -> None:
    """Print one turn as it arrives. Ctrl-C (SIGINT) only sets a flag here, read between frames: raising inside
    the websockets client's receive could leave it mid-frame."""
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        while not turn.is_done:
            if interrupted.is_set():
                if turn.is_cancel_requested:
                    raise KeyboardInterrupt
                interrupted.clear()
                for event in turn.cancel():
                    ws.send(json.dumps(event))
            try:
                frame = ws.recv(timeout=POLL_S)
            except TimeoutError:
                continue
            for event in turn.on_event(json.loads(frame)):
                ws.send(json.dumps(event))
            out, notes = turn.take_output()
            if out:
                stdout.write(out)
                stdout.flush()
            for line in notes:
                note(line)
    finally:
        signal.signal(signal.SIGINT, previous)


def _attach(path: Path, note: Any) -> dict[str, Any] | None:
    try:
        part = image_part(path)
    except OSError as exc:
        note(f"assistant: cannot read {path}: {exc.strerror or exc}")
        return None
    note(f"assistant: {path.name} ({path.stat().st_size // 1024 or 1} KB) goes with your next message")
    return part


def _refusal(exc: Any) -> str:
    """The OpenAI error body a refused handshake carries (401: no or a wrong key), else its status."""
    try:
        error = json.loads(exc.response.body or b"{}")["error"]
        return f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.response.status_code}"
