"""Graceful drain: the responses running in this process, and whether new ones may start.

On SIGTERM or SIGINT the server stops listening and runs :meth:`Drain.run`: from then on
:meth:`Drain.admit` refuses new responses with ``server_shutting_down`` (retryable), the
running ones get up to ``timeout_s`` seconds to finish, and those still running then are
cut: each ends ``incomplete`` with reason ``server_shutdown``, stored and reported to its
client like any other end. A second signal (:meth:`Drain.hurry`) stops the waiting.

Both front ends register their responses here (the Realtime session and the HTTP API's
run); the drain knows nothing of either: a response is a task and the call that cuts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from assistant.errors import ServerShuttingDown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainReport:
    num_finished: int  # ended by themselves (or by their client) while the drain waited
    num_cut: int  # still running when the waiting ended: ended as server_shutdown


class Drain:
    """Register every response with :meth:`track`; check :meth:`admit` before starting one."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s  # 0: cut at once
        self.is_draining = False
        self._running: dict[asyncio.Task[Any], Callable[[], None]] = {}  # each response's task → its cut
        self._is_cutting = False
        self._num_done = 0  # responses ended since the drain began
        self._num_cut = 0
        self._hurried = asyncio.Event()

    def admit(self) -> None:
        """Raise ``server_shutting_down`` once the drain has begun."""
        if self.is_draining:
            raise ServerShuttingDown("The server is shutting down and starts no new responses; reconnect and "
                                     "send it again (the server answers once it is back).")

    def track(self, task: asyncio.Task[Any], cut: Callable[[], None]) -> None:
        """Count ``task`` as a running response until it ends; ``cut`` ends it as ``server_shutdown``."""
        self._running[task] = cut
        task.add_done_callback(self._on_done)
        if self._is_cutting:  # admitted just before the drain began, started as it cut the others
            self._cut(cut)

    def hurry(self) -> None:
        """Stop waiting: cut the running responses now (a second SIGTERM/SIGINT)."""
        self._hurried.set()

    async def run(self) -> DrainReport:
        """Refuse new responses, wait up to ``timeout_s`` for the running ones, cut the rest, and return once
        every response has ended (sent its end to its client, if still there)."""
        self.is_draining = True
        log.info("draining: %d responses running; waiting up to %g s for them (a second signal stops waiting)",
                 len(self._running), self.timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        hurried = asyncio.ensure_future(self._hurried.wait())
        try:
            while self._running and not hurried.done() and (remaining := deadline - loop.time()) > 0:
                await asyncio.wait({*self._running, hurried}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        self._is_cutting = True
        for cut in list(self._running.values()):
            self._cut(cut)
        while self._running:  # a cut response ends at the engine's next step
            await asyncio.wait(set(self._running))
        report = DrainReport(self._num_done - self._num_cut, self._num_cut)
        log.info("drained: %d responses finished, %d cut (ended incomplete, server_shutdown)",
                 report.num_finished, report.num_cut)
        return report

    def _cut(self, cut: Callable[[], None]) -> None:
        self._num_cut += 1
        cut()

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._running.pop(task, None)
        if self.is_draining:
            self._num_done += 1
