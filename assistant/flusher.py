"""Saving a response's output while it streams, so that a crash loses at most the last second of it.

A :class:`Flusher` calls its ``save`` coroutine every ``interval_s`` on a task of
its own. So generation never waits for the database; at most one save is in
flight; and when the tokens stall, what came before the stall is still saved on
time. :meth:`Flusher.stop` waits for the save in flight, so a write made after
it (the item's final state) is never overtaken by an older snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
FLUSH_INTERVAL_S = 0.5  # a kill -9 loses at most this plus one write's time


class Flusher:
    def __init__(self, save: Callable[[], Awaitable[None]], interval_s: float = FLUSH_INTERVAL_S) -> None:
        self._save = save
        self.interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """No more saves; returns when the one in flight, if any, has ended."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                return
            try:
                await self._save()
            except Exception:  # the save reports what it can act on; anything else must not end the flushing
                log.exception("saving a streaming response failed")
