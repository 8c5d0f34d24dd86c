"""Load on a real server: many Realtime connections, a few of them generating. Prints figures; never asserts.

    python -m bench.load [--seconds 30] [--connections 200] [--generating 20] [--model default|tiny]
                         [--max-output-tokens 64] [--url ws://HOST:PORT/v1/realtime [--pid PID]]

Without ``--url`` it starts ``python -m assistant serve`` as a subprocess on a free port and a throw-away
SQLite store: ``--model default`` serves what ``assistant serve`` loads with no flags (its weights already in
the default data dir), ``--model tiny`` a tiny random Llama (the tests' one; no weights needed). It opens
``--connections`` WebSocket connections; ``--generating`` of them run turns in a loop for ``--seconds`` (a user
message, then ``response.create`` up to ``--max-output-tokens`` tokens; a turn begun before the end runs to its
``response.done``, so the run lasts a little longer), the others stay open and idle.

Reported: connections opened and refused, responses by status, errors by code (error events, failed
responses, connections closed under the client), time to first token (``response.create`` sent → first text
delta) p50/p99, output tokens per second over the run, and the server's peak RSS (VmHWM from
``/proc/PID/status``; with ``--url``, only when ``--pid`` names the server's process).

Machines are shared and noisy: compare runs on one machine, not absolutes. One run of the defaults (the default
model, int8-cpu, on a shared 2-core AMD EPYC with OMP_NUM_THREADS=1): 200 of 200 connections opened, no errors,
44 responses, first token p50 11.9 s / p99 19.9 s, 49 output tokens/s over all streams, peak RSS 1,184 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.serving import free_port

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Tell me about the sea.", "How do birds fly?", "Describe a busy market.", "Why is the sky blue?"]


@dataclass
class Tally:
    """What every connection saw, counted together."""

    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    first_token_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    opened: int = 0


async def _recv(ws: ClientConnection) -> dict:
    return json.loads(await ws.recv())


async def _open(url: str, tally: Tally) -> ClientConnection | None:
    try:
        ws = await connect(url, max_size=None, open_timeout=60)
        event = await asyncio.wait_for(_recv(ws), 60)
    except (OSError, asyncio.TimeoutError, ConnectionClosed) as exc:
        code = getattr(getattr(exc, "rcvd", None), "code", None)
        tally.errors[f"connect: {code or type(exc).__name__}"] += 1
        return None
    if event["type"] != "session.created":
        tally.errors[f"connect: {event.get('error', {}).get('code', event['type'])}"] += 1
        await ws.close()
        return None
    tally.opened += 1
    return ws


async def _generate(ws: ClientConnection, index: int, deadline: float, max_output_tokens: int, tally: Tally) -> None:
    """Turns until the deadline: a user message, a response; its first delta's delay and its tokens counted."""
    turn = 0
    try:
        while time.monotonic() < deadline:
            question = QUESTIONS[(index + turn) % len(QUESTIONS)]
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}))
            await ws.send(json.dumps({"type": "response.create",
                                      "response": {"max_output_tokens": max_output_tokens}}))
            sent, first = time.monotonic(), None
            while True:
                event = await _recv(ws)
                if event["type"] == "error":
                    tally.errors[event["error"]["code"]] += 1
                    if event["error"]["code"] != "audio_not_supported":
                        break
                elif event["type"] == "response.output_text.delta" and first is None:
                    first = time.monotonic() - sent
                elif event["type"] == "response.done":
                    response = event["response"]
                    tally.statuses[response["status"]] += 1
                    tally.output_tokens += (response.get("usage") or {}).get("output_tokens", 0)
                    if response["status"] == "failed":
                        tally.errors[response["status_details"]["error"]["code"]] += 1
                    if first is not None:
                        tally.first_token_s.append(first)
                    break
            turn += 1
    except ConnectionClosed as exc:
        tally.errors[f"closed: {exc.rcvd.code if exc.rcvd else 'no close frame'}"] += 1


async def _idle(ws: ClientConnection, deadline: float, tally: Tally) -> None:
    """Open and quiet; reads whatever comes (nothing should)."""
    try:
        while (left := deadline - time.monotonic()) > 0:
            event = await asyncio.wait_for(_recv(ws), left)
            if event["type"] == "error":
                tally.errors[event["error"]["code"]] += 1
    except asyncio.TimeoutError:
        pass
    except ConnectionClosed as exc:
        tally.errors[f"closed: {exc.rcvd.code if exc.rcvd else 'no close frame'}"] += 1


def _peak_rss_mib(pid: int | None) -> str:
    if pid is None:
        return "unknown (give --pid with --url)"
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 1024:.0f} MiB"
    except OSError as exc:
        return f"unknown ({exc})"
    return "unknown"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _start_server(model: str, tmp: Path) -> tuple[subprocess.Popen[str], str]:
    """``assistant serve`` on a free port and a throw-away store; (the process, its Realtime URL)."""
    port = free_port()
    args = [sys.executable, "-m", "assistant", "serve", "--port", str(port), "--log-level", "warning",
            "--database-url", f"sqlite:///{tmp / 'load.db'}", "--max-connections", "1024"]
    if model == "tiny":
        sys.path.insert(0, str(REPO))
        from tests.engine_fixtures import save_tiny_chat_model

        args += ["--model", str(save_tiny_chat_model(tmp / "tiny", max_position_embeddings=4096)),
                 "--dtype", "float32", "--quantize", "none"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "listening on" in line:
            return process, f"ws://127.0.0.1:{port}/v1/realtime"
    raise RuntimeError(f"the server exited ({process.wait()}) before listening")


async def run(url: str, pid: int | None, args: argparse.Namespace) -> None:
    tally = Tally()
    started = time.monotonic()
    opening = asyncio.Semaphore(50)

    async def open_one() -> ClientConnection | None:
        async with opening:
            return await _open(url, tally)

    sockets = [ws for ws in await asyncio.gather(*(open_one() for _ in range(args.connections))) if ws]
    print(f"opened {tally.opened} of {args.connections} connections in {time.monotonic() - started:.1f} s", flush=True)
    began = time.monotonic()
    deadline = began + args.seconds
    generating = sockets[:args.generating]
    await asyncio.gather(
        *(_generate(ws, index, deadline, args.max_output_tokens, tally) for index, ws in enumerate(generating)),
        *(_idle(ws, deadline, tally) for ws in sockets[args.generating:]))
    elapsed = time.monotonic() - began
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)

    print(f"{len(generating)} generating, {len(sockets) - len(generating)} idle, for {elapsed:.1f} s")
    print(f"responses:    {dict(tally.statuses) or 'none'}")
    print(f"errors:       {dict(tally.errors) or 'none'}")
    if tally.first_token_s:
        print(f"first token:  p50 {statistics.median(tally.first_token_s) * 1000:.0f} ms, "
              f"p99 {_percentile(tally.first_token_s, 0.99) * 1000:.0f} ms ({len(tally.first_token_s)} responses)")
    print(f"tokens/s:     {tally.output_tokens / elapsed:.1f} output tokens/s over all streams "
          f"({tally.output_tokens} tokens)")
    print(f"server peak RSS: {_peak_rss_mib(pid)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="How long the generating connections run.")
    parser.add_argument("--connections", type=int, default=200, help="Connections opened in all.")
    parser.add_argument("--generating", type=int, default=20, help="Connections that run responses in a loop.")
    parser.add_argument("--model", choices=("default", "tiny"), default="default",
                        help="The served model when the bench starts the server.")
    parser.add_argument("--max-output-tokens", type=int, default=64, help="Tokens per response at most.")
    parser.add_argument("--url", help="A running server's Realtime URL (ws://HOST:PORT/v1/realtime) instead.")
    parser.add_argument("--pid", type=int, help="With --url: the server's process id, for its peak RSS.")
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.pid, args))
        return
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        process, url = _start_server(args.model, Path(tmp))
        print(f"server ({args.model} model) listening after {time.monotonic() - started:.1f} s", flush=True)
        try:
            asyncio.run(run(url, process.pid, args))
        finally:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    main()
