"""Which server process runs a response, and whether that process is gone.

A response row records its owner, ``host:pid:random``, and a heartbeat the owner
refreshes (:mod:`assistant.upkeep`). An owner is gone when its heartbeat is
stale, or, without waiting for that, when it ran on this host and its process no
longer runs: so a server restarted right after a kill -9 finishes what its
previous life left at once, while another host's replica is judged by its
heartbeat alone. A pid that was reused by an unrelated process only delays the
verdict until the heartbeat is stale.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime
from pathlib import Path


def process_owner() -> str:
    """This process as a response owner. The random part tells a restarted server apart from its previous
    life when both have the same pid, as the first process of a container has."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def is_gone(owner: str | None, last_seen: datetime, cutoff: datetime) -> bool:
    """Whether ``owner`` (not this process's own owner id), last seen alive at ``last_seen``, is gone."""
    if last_seen < cutoff:
        return True
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's process: only its heartbeat can tell
    return int(pid) == os.getpid() or not _process_runs(int(pid))  # our pid, another owner id: a past life


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    try:  # a killed process that its parent has not reaped yet is a zombie: it runs no more
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill said it runs
