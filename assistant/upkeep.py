"""Liveness of this server's responses, and recovery of those a dead server left in progress.

Every response row names its owner (:mod:`assistant.owners`) and carries a
heartbeat. At start-up, before serving, :func:`recover_at_start` finishes every
in-progress response of a gone owner as ``incomplete`` (reason ``server_crash``),
with its in-progress items ``incomplete`` and holding the text saved while they
streamed. While serving, :func:`run_upkeep` refreshes this server's heartbeat
and repeats the recovery, so that with replicas sharing one PostgreSQL a live
one finishes what a dead one left. A store fault only skips a round.
"""

from __future__ import annotations

import asyncio
import logging

from assistant.errors import StorageUnavailable
from assistant.store import Store

log = logging.getLogger(__name__)
HEARTBEAT_INTERVAL_S = 10.0
STALE_AFTER_S = 60.0  # six missed heartbeats: a live server is this late only when it cannot reach the database
RECOVERY_INTERVAL_S = 30.0


def recover_at_start(store: Store) -> int:
    """Finish what gone servers left in progress; returns how many responses that was."""
    return len(store.recover_abandoned(STALE_AFTER_S))


async def run_upkeep(store: Store, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                     recovery_interval_s: float = RECOVERY_INTERVAL_S, stale_after_s: float = STALE_AFTER_S) -> None:
    """Heartbeat and recover until cancelled."""
    loop = asyncio.get_running_loop()
    next_recovery = loop.time() + recovery_interval_s
    while True:
        await asyncio.sleep(min(heartbeat_interval_s, max(0.0, next_recovery - loop.time())))
        try:
            await asyncio.to_thread(store.heartbeat)
            if loop.time() >= next_recovery:
                next_recovery = loop.time() + recovery_interval_s
                recovered = await asyncio.to_thread(store.recover_abandoned, stale_after_s)
                if recovered:
                    log.warning("finished %d responses a gone server left in progress (incomplete, server_crash)",
                                len(recovered))
        except StorageUnavailable:
            pass  # logged by the store; the next round tries again
        except Exception:
            log.exception("heartbeat or recovery failed")
