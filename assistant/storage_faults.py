"""Storage faults: the database could not do the work, as opposed to refusing it.

:func:`storage_faults` wraps every :class:`~assistant.store.Store` transaction and
turns a fault into :class:`~assistant.errors.StorageUnavailable` (retryable, code
``storage_unavailable``); everything else (a constraint, a bad query: bugs)
propagates unchanged. Faults are:

- a connection SQLAlchemy invalidated (the database went away mid-call);
- any psycopg ``OperationalError`` (refused or lost connections, shutdowns,
  cancelled statements);
- SQLite's full disk, I/O errors, unopenable or read-only files, and a lock not
  granted within the busy timeout;
- no pooled connection coming free in time (each held by a call that hangs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from assistant.errors import StorageUnavailable

log = logging.getLogger(__name__)
SQLITE_FAULTS = ("database or disk is full", "disk i/o error", "unable to open database file",
                 "attempt to write a readonly database", "database is locked")


@contextlib.contextmanager
def storage_faults() -> Iterator[None]:
    try:
        yield
    except PoolTimeout as exc:
        log.warning("storage unavailable: %s", exc)
        raise StorageUnavailable() from exc
    except DBAPIError as exc:
        if not is_storage_fault(exc):
            raise
        log.warning("storage unavailable: %s", _first_line(exc))
        raise StorageUnavailable() from exc


def is_storage_fault(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    if type(exc.orig).__module__.startswith("psycopg"):
        return True
    return any(fault in str(exc.orig).lower() for fault in SQLITE_FAULTS)


def _first_line(exc: DBAPIError) -> str:
    lines = str(exc.orig or exc).strip().splitlines()
    return lines[0] if lines else type(exc.orig or exc).__name__
