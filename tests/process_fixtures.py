"""Real ``python -m assistant serve`` processes for tests: started on this checkout's code, their output
collected as it comes, killed if still running at the end."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT = 120


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it: also a dead upstream)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Served:
    process: asyncio.subprocess.Process
    port: int
    database: Path
    lines: list[str] = field(default_factory=list)  # everything it printed and logged so far

    @property
    def realtime_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    async def wait_for_line(self, text: str) -> str:
        """The first line (printed so far or still to come) that contains ``text``."""
        for line in self.lines:
            if text in line:
                return line
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
            assert raw, f"the server exited before printing {text!r}: {self.lines}"
            self.lines.append(raw.decode().rstrip())
            if text in self.lines[-1]:
                return self.lines[-1]

    async def exit_code(self) -> int:
        """Wait for the process to exit (reading the rest of its output)."""
        assert self.process.stdout is not None
        rest = await asyncio.wait_for(self.process.stdout.read(), TIMEOUT)
        self.lines += rest.decode().splitlines()
        return await self.process.wait()


@asynccontextmanager
async def serve(model_dir: Path, data_dir: Path, *flags: str, port: int | None = None) -> AsyncIterator[Served]:
    """``python -m assistant serve`` on this checkout's code, greedy and without penalties, on ``port`` (a free
    one by default), until it exits."""
    port = port or free_port()
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(repo_root)}
    command = [sys.executable, "-m", "assistant", "serve", "--model", str(model_dir), "--data-dir", str(data_dir),
               "--quantize", "none", "--dtype", "float32", "--device", "cpu", "--port", str(port),
               "--temperature", "0", "--frequency-penalty", "0", *flags]
    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    served = Served(process, port, data_dir / "assistant.db")
    try:
        await served.wait_for_line("listening on")
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
