"""Writes storage refused are retried in order until they land; bounded; other refusals are dropped."""

from __future__ import annotations

from collections.abc import Callable

from assistant.errors import ItemNotFound, StorageUnavailable
from assistant.pending_writes import PendingWrites


def test_writes_land_in_order_once_storage_is_back() -> None:
    landed: list[str] = []
    failures = {"storage": 3}

    def write(name: str) -> Callable[[], None]:
        def attempt() -> None:
            if failures["storage"] > 0:
                failures["storage"] -= 1
                raise StorageUnavailable()
            landed.append(name)
        return attempt

    def gone() -> None:
        raise ItemNotFound("deleted meanwhile")

    pending = PendingWrites(max_backoff_s=0.05)
    for name in ("item", "response"):
        pending.add(name, write(name))
    pending.add("deleted item", gone)
    pending.add("last", write("last"))
    assert pending.wait_until_empty(10)
    assert landed == ["item", "response", "last"] and len(pending) == 0
    pending.close()


def test_at_most_max_pending_wait() -> None:
    def never() -> None:
        raise StorageUnavailable()

    pending = PendingWrites(max_pending=2, max_backoff_s=0.05)
    for index in range(5):
        pending.add(f"write {index}", never)
    assert len(pending) == 2
    pending.close(timeout_s=0.1)
