"""Whether a response's owner is gone: a stale heartbeat, or a process of this host that no longer runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from assistant.owners import is_gone, process_owner

NOW = datetime.now(UTC)
CUTOFF = NOW - timedelta(seconds=60)
HOST = socket.gethostname()


def test_owner_ids_name_host_and_pid_and_differ_per_process() -> None:
    owner = process_owner()
    assert owner.startswith(f"{HOST}:{os.getpid()}:") and owner != process_owner()


def test_a_stale_heartbeat_is_gone_wherever_it_ran() -> None:
    assert is_gone("elsewhere:1:ab", CUTOFF - timedelta(seconds=1), CUTOFF)
    assert is_gone(None, CUTOFF - timedelta(seconds=1), CUTOFF)
    assert not is_gone("elsewhere:1:ab", NOW, CUTOFF)  # another host: only its heartbeat can tell
    assert not is_gone(None, NOW, CUTOFF)


def test_a_process_of_this_host_is_gone_as_soon_as_it_stops_running() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not is_gone(f"{HOST}:{child.pid}:ab", NOW, CUTOFF)
        child.kill()
        child.wait()
        assert is_gone(f"{HOST}:{child.pid}:ab", NOW, CUTOFF)
    finally:
        child.kill()
        child.wait()
    assert is_gone(f"{HOST}:{os.getpid()}:ab", NOW, CUTOFF)  # our pid, not our owner id: a previous life


def test_a_killed_process_not_yet_reaped_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, still a zombie until wait()
        assert is_gone(f"{HOST}:{child.pid}:ab", NOW, CUTOFF)
    finally:
        child.wait()
