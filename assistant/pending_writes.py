"""Store writes that must land eventually: a response's final state, when storage failed as it ended.

The client has already been told the outcome (the response failed with
``storage_unavailable``, its items ``incomplete`` with the text it received);
these writes make the database say the same once storage is back. One thread
retries them in the order they came, each until it lands before the next
(backing off up to :data:`MAX_BACKOFF_S` between tries). At most
:data:`MAX_PENDING` wait, a bound a database that stays down cannot push memory
past (a write beyond it is dropped and logged as an error); a write refused for
another reason than storage (its item was deleted meanwhile) is dropped too.
Writes still waiting when the server stops are lost; start-up recovery then
finishes their responses as ``incomplete`` (``server_crash``) with the text saved
while they streamed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from assistant.errors import AssistantError, StorageUnavailable

log = logging.getLogger(__name__)
MAX_PENDING = 4096
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0


class PendingWrites:
    def __init__(self, max_pending: int = MAX_PENDING, max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self.max_pending = max_pending
        self.max_backoff_s = max_backoff_s
        self._queue: collections.deque[tuple[str, Callable[[], object]]] = collections.deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._is_closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, what: str, write: Callable[[], object]) -> None:
        """Retry ``write`` (a store call, described by ``what`` in the log) after the writes added before it."""
        with self._changed:
            if len(self._queue) >= self.max_pending:
                log.error("dropped a store write (%s): %d writes already wait for storage", what, len(self._queue))
                return
            self._queue.append((what, write))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pending-writes", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def wait_until_empty(self, timeout_s: float) -> bool:
        """Whether every write landed (or was dropped) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._queue and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            return not self._queue

    def close(self, timeout_s: float = 5.0) -> None:
        """Give the waiting writes ``timeout_s`` to land, then stop."""
        self.wait_until_empty(timeout_s)
        with self._changed:
            self._is_closed = True
            if self._queue:
                log.error("%d store writes never landed: storage stayed unavailable", len(self._queue))
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        backoff_s = FIRST_BACKOFF_S
        while True:
            with self._changed:
                while not self._queue and not self._is_closed:
                    self._changed.wait()
                if self._is_closed:
                    return
                what, write = self._queue[0]
            try:
                write()
            except StorageUnavailable:
                with self._changed:
                    self._changed.wait(backoff_s)  # woken early only by close
                backoff_s = min(2 * backoff_s, self.max_backoff_s)
                continue
            except AssistantError as exc:
                log.info("dropped a store write (%s): %s", what, exc.message)
            except Exception:
                log.exception("dropped a store write (%s)", what)
            else:
                log.info("stored %s once storage came back", what)
            backoff_s = FIRST_BACKOFF_S
            with self._changed:
                self._queue.popleft()
                self._changed.notify_all()
