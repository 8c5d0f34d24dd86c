"""Storage faults made for real: a full SQLite disk (``PRAGMA max_page_count``, which raises the very SQLITE_FULL
error a full disk gives) and a private PostgreSQL cluster that a test stops and starts under a running server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from assistant.errors import StorageUnavailable
from assistant.items import ContentPart, Item
from assistant.store import Store
from tests.process_fixtures import free_port


@contextlib.contextmanager
def full_disk(store: Store, *, filled: bool = False) -> Iterator[None]:
    """While inside, no write of the store's SQLite file may grow it by a page: every pooled connection, old and
    new, gets the limit (the pool is emptied, and each new connection sets it as it connects). ``filled``: the
    room left in the last pages is used up first, as other data would, so that even a row that grows a little
    (a streaming item's text) no longer fits."""

    def limit(dbapi_connection: Any, _record: Any) -> None:
        num_pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count = {num_pages}")

    filler = store.create_conversation() if filled else None
    event.listen(store.engine, "connect", limit)
    store.engine.dispose()
    try:
        if filler is not None:
            _use_up_room(store, filler)
        yield
    finally:
        event.remove(store.engine, "connect", limit)
        store.engine.dispose()  # connections made under the limit keep it: replace them


def _use_up_room(store: Store, conversation_id: str) -> None:
    for index in range(100_000):
        try:
            store.add_item(conversation_id, Item(f"filler{index}", "user", (ContentPart("input_text", text="x" * 64),)))
        except StorageUnavailable:
            return
    raise AssertionError("the disk never filled up")


def postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@contextlib.contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    """A started PostgreSQL cluster of its own, stopped and deleted afterwards; skips the test when PostgreSQL
    is not installed or cannot run here."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's tmp_path: the postgres user cannot enter root's private directories.
    directory = Path(tempfile.mkdtemp(prefix="assistant-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
        cluster = PrivateCluster(bin_dir, directory)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop(check=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class PrivateCluster:
    """A PostgreSQL cluster on a free port, run as the ``postgres`` user when this is root (initdb refuses root),
    to stop and start at will."""

    def __init__(self, bin_dir: Path, directory: Path) -> None:
        self.bin_dir = bin_dir
        self.directory = directory
        self.data = directory / "pgdata"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        command = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0 and check:
            pytest.skip(f"{tool} failed: {(result.stderr or result.stdout).strip()[-300:]}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.directory / "log"),
                  "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1", "start")

    def stop(self, check: bool = True) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop", check=check)
