"""``assistant chat``: its pure parts (URLs, typed lines, image parts, one turn's events), then the real program
under a pseudo-terminal against a real loopback server, typed at as a person would (Enter, Ctrl-C, Ctrl-D)."""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import os
import pty
import re
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from assistant.chat_client import (CONTROL_CHARS, Attach, Help, Quit, Say, Turn, image_part, parse_line, realtime_url,
                                   user_message)
from assistant.engine.model import ChatModel
from tests.conftest import RunningServer, running_server
from tests.vision_fixtures import load_tiny_llava_chat, make_image

TIMEOUT_S = 60
REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- pure parts


def test_realtime_url_takes_what_users_pass() -> None:
    assert realtime_url("http://127.0.0.1:8765") == "ws://127.0.0.1:8765/v1/realtime"
    assert realtime_url("127.0.0.1:8765/") == "ws://127.0.0.1:8765/v1/realtime"
    assert realtime_url("https://chat.example/v1") == "wss://chat.example/v1/realtime"
    assert realtime_url("https://chat.example/assistant/v1/") == "wss://chat.example/assistant/v1/realtime"
    assert realtime_url("ws://h:1/v1/realtime", "conv_1") == "ws://h:1/v1/realtime?conversation=conv_1"
    with pytest.raises(ValueError, match="not a server address"):
        realtime_url("ftp://h:1")


def test_typed_lines_become_commands() -> None:
    assert parse_line("  ") is None
    assert parse_line(" hello there \n") == Say("hello there")
    assert parse_line("//image is a word") == Say("/image is a word")
    assert parse_line("/image ~/cat.png") == Attach(Path("~/cat.png").expanduser())
    assert parse_line("/image") == Help("Usage: /image PATH")
    assert parse_line("/quit") == Quit() and parse_line("/exit") == Quit()
    assert isinstance(parse_line("/help"), Help)
    unknown = parse_line("/imgae x.png")
    assert isinstance(unknown, Help) and unknown.text.startswith("Unknown command /imgae")


def test_image_parts_are_data_urls_typed_from_their_bytes(tmp_path: Path) -> None:
    png, jpeg, text = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.txt"
    make_image(1).save(png)
    make_image(1).save(jpeg, format="JPEG")
    text.write_text("not an image")
    assert image_part(png)["image_url"].startswith("data:image/png;base64,iVBOR")
    assert image_part(jpeg)["image_url"].startswith("data:image/jpeg;base64,")
    assert image_part(text)["image_url"].startswith("data:application/octet-stream;base64,")  # the server refuses it
    with pytest.raises(OSError):
        image_part(tmp_path / "missing.png")
    message = user_message("What is it?", [image_part(png)])
    assert [part["type"] for part in message["item"]["content"]] == ["input_image", "input_text"]


def user_added() -> dict:
    return {"type": "conversation.item.added", "item": {"role": "user"}}


def test_a_turn_asks_for_the_answer_once_the_message_is_stored_and_prints_it() -> None:
    turn = Turn()
    assert turn.on_event({"type": "session.updated"}) == []
    assert turn.on_event(user_added()) == [{"type": "response.create"}]
    assert turn.on_event({"type": "conversation.item.added", "item": {"role": "assistant"}}) == []
    turn.on_event({"type": "response.created"})
    for delta in ("Hel", "lo"):
        turn.on_event({"type": "response.output_text.delta", "delta": delta})
    assert turn.take_output() == ("Hello", [])
    turn.on_event({"type": "response.output_text.delta", "delta": "\x1b[2Jx\ty\n\x07"})  # no terminal commands
    assert turn.take_output() == ("\ufffd[2Jx\ty\n\ufffd", [])
    assert turn.cancel() == [{"type": "response.cancel"}]
    turn.on_event({"type": "response.done", "response": {"status": "cancelled"}})
    assert turn.is_done and turn.is_message_stored and turn.take_output() == ("\n", ["[stopped]"])


def test_a_refused_message_ends_the_turn_without_a_response() -> None:
    turn = Turn()
    turn.on_event({"type": "error", "error": {"message": "The image is too large.", "code": "image_too_large"}})
    assert turn.is_done and not turn.is_message_stored
    assert turn.take_output() == ("", ["error: The image is too large. (image_too_large)"])


def test_ctrl_c_before_the_message_is_stored_starts_no_response() -> None:
    turn = Turn()
    assert turn.cancel() == []
    assert turn.on_event(user_added()) == []
    assert turn.is_done


def test_a_failed_or_cut_answer_says_so() -> None:
    turn = Turn(phase="answering")
    turn.on_event({"type": "response.created"})
    turn.on_event({"type": "response.done", "response": {
        "status": "failed", "status_details": {"error": {"message": "The model failed."}}}})
    assert turn.take_output() == ("\n", ["[failed: The model failed.]"])
    turn = Turn(phase="answering")
    turn.on_event({"type": "response.done", "response": {"status": "incomplete"}})
    assert turn.take_output()[1] == ["[cut short at the token limit]"]


# ---------------------------------------------------------------- the program under a pseudo-terminal


class Terminal:
    """``python -m assistant chat ...`` on a pseudo-terminal: what it prints is read without blocking the event
    loop (the server runs on it), what is typed goes through the terminal's line discipline (so Ctrl-C is a
    SIGINT, Ctrl-D an end of file), as for a person at a keyboard."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm", "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "assistant", "chat", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the program at once
            try:
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.text = ""
        self.position = 0
        self.is_closed = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._arrived = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the program ended and the terminal closed
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.is_closed = True
        self.text += self._decoder.decode(data, final=not data)
        self._arrived.set()

    async def expect(self, pattern: str) -> re.Match[str]:
        """The first match of ``pattern`` in what was printed since the last match."""
        deadline = time.monotonic() + TIMEOUT_S
        while not (match := re.compile(pattern).search(self.text, self.position)):
            if self.is_closed or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {self.text[self.position:][-2000:]!r}")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pass
        self.position = match.end()
        return match

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    async def exit_status(self) -> int:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.close()
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, "the program did not end"
            await asyncio.sleep(0.05)

    def close(self) -> None:
        if not self.is_closed:
            asyncio.get_running_loop().remove_reader(self.fd)
            self.is_closed = True
        os.close(self.fd)


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> ChatModel:
    # The random model runs every answer to --max-output-tokens (1024): long enough to press Ctrl-C while it streams.
    return load_tiny_llava_chat(tmp_path_factory.mktemp("tiny-llava"), max_position_embeddings=2048)


@pytest.fixture
async def vision_server(vision_model: ChatModel, data_dir: Path) -> AsyncIterator[RunningServer]:
    async with running_server(vision_model, data_dir, temperature=0) as running:
        yield running


PROMPT = r"\r\n> "
CUT = r"\[cut short at the token limit\]"


async def test_chat_streams_stops_attaches_and_continues(vision_server: RunningServer, tmp_path: Path) -> None:
    first_image, second_image = tmp_path / "first.png", tmp_path / "second.png"
    make_image(1, (96, 72)).save(first_image)
    make_image(2, (96, 72)).save(second_image)
    url = f"http://127.0.0.1:{vision_server.port}"
    store = vision_server.app.store

    terminal = Terminal("--url", url, "--image", str(first_image))
    try:
        await terminal.expect(r"first\.png \(\d+ KB\) goes with your next message")
        conversation_id = (await terminal.expect(r"conversation (conv_\w+)\.")).group(1)
        await terminal.expect(r"> ")
        # A long answer streams in; Ctrl-C stops it and the prompt comes back.
        terminal.type("Tell me a very long story about it.\r")
        await terminal.expect(r"about it\.\r\n")  # the echo
        await terminal.expect(r"\S")  # the first piece of the answer, long before its end
        terminal.type("\x03")
        await terminal.expect(r"\[stopped\]" + PROMPT)
        items = store.list_items(conversation_id)
        assert [item.role for item in items] == ["user", "assistant"] and len(items[0].image_hashes) == 1
        assert items[1].status == "incomplete"

        # /image attaches to the next message only; the conversation goes on.
        terminal.type(f"/image {second_image}\r")
        await terminal.expect(r"second\.png \(\d+ KB\) goes with your next message" + PROMPT)
        terminal.type("And this one?\r")
        await terminal.expect(CUT + PROMPT)
        terminal.type("No image now.\r")
        await terminal.expect(CUT + PROMPT)
        items = store.list_items(conversation_id)
        assert [item.text for item in items if item.role == "user"] == [
            "Tell me a very long story about it.", "And this one?", "No image now."]
        assert [len(item.image_hashes) for item in items if item.role == "user"] == [1, 1, 0]
        assert items[3].text and items[3].status == "incomplete"

        terminal.type("\x04")  # Ctrl-D quits and says how to continue
        await terminal.expect(rf"continue it with: assistant chat --conversation {conversation_id}")
        assert await terminal.exit_status() == 0
    finally:
        if not terminal.is_closed:
            terminal.close()

    terminal = Terminal("--url", f"{url}/v1", "--conversation", conversation_id)
    try:
        await terminal.expect(rf"conversation {conversation_id}\.")
        await terminal.expect(r"> ")
        terminal.type("Still there?\r")
        await terminal.expect(CUT + PROMPT)
        terminal.type("\x03")  # Ctrl-C at the prompt quits too
        await terminal.expect(rf"continue it with: assistant chat --conversation {conversation_id}")
        assert await terminal.exit_status() == 0
    finally:
        if not terminal.is_closed:
            terminal.close()
    assert len(store.list_items(conversation_id)) == 8


async def test_chat_names_a_refused_key_and_an_unknown_conversation(tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, auth="on") as server:
        url = f"http://127.0.0.1:{server.port}"
        terminal = Terminal("--url", url, "--key", "sk-asst-wrong")
        await terminal.expect(r"the server refused the connection: .*\(invalid_api_key\)")
        assert await terminal.exit_status() == 1

    async with running_server(tiny_model, data_dir) as server:
        terminal = Terminal("--url", f"http://127.0.0.1:{server.port}", "--conversation", "conv_nope")
        await terminal.expect(r"No conversation 'conv_nope' is stored here")
        assert await terminal.exit_status() == 1
        assert "continue it with" not in terminal.text


async def test_piped_questions_give_only_answers_on_stdout(tiny_model: ChatModel, data_dir: Path) -> None:
    async with running_server(tiny_model, data_dir, temperature=0, max_output_tokens=8) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "assistant", "chat", "--url", f"http://127.0.0.1:{server.port}",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        stdout, stderr = await asyncio.wait_for(process.communicate(b"Hello\nHow are you?\n"), TIMEOUT_S)
        assert process.returncode == 0
        conversation_id = re.search(rb"--conversation (conv_\w+)", stderr).group(1).decode()
        answers = [item.text for item in server.app.store.list_items(conversation_id) if item.role == "assistant"]
        printed = "".join(CONTROL_CHARS.sub("\ufffd", answer) + "\n" for answer in answers)
        assert len(answers) == 2 and stdout.decode() == printed
