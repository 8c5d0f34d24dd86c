"""The store's side of crash recovery and storage faults: owners and heartbeats, finishing what a gone server
left in progress, and faults coded as ``storage_unavailable`` (a real full SQLite disk, a refused PostgreSQL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from assistant.errors import StorageUnavailable
from assistant.items import ContentPart, Item, ResponseRecord
from assistant.store import Store
from assistant.store_models import ResponseRow, utcnow
from tests.storage_fixtures import full_disk
from tests.test_store import conversation, store, text_item, url  # noqa: F401  (fixtures)

STALE_S = 60.0


def reply(item_id: str, text: str, status: str = "in_progress") -> Item:
    return Item(item_id, "assistant", (ContentPart("output_text", text=text),), status=status)  # type: ignore[arg-type]


def age_heartbeat(target: Store, response_id: str, seconds: float) -> None:
    with target.engine.begin() as connection:
        connection.execute(update(ResponseRow).where(ResponseRow.id == response_id)
                           .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_response_records_its_owner_and_its_items(store: Store, conversation: str) -> None:  # noqa: F811
    store.start_response("resp_1", conversation)
    store.add_item(conversation, reply("a1", "so far"), response_id="resp_1")
    record = store.get_response("resp_1")
    assert record is not None and record.status == "in_progress" and record.output_item_ids == ("a1",)
    assert store.heartbeat() == 1
    store.finish_response(ResponseRecord("resp_1", conversation, "completed", output_item_ids=("a1",)))
    assert store.heartbeat() == 0


def test_a_gone_servers_responses_end_incomplete_with_their_saved_text(url: str) -> None:  # noqa: F811
    live = Store(url)
    live.upgrade()
    gone = Store(url, owner="elsewhere:1:dead")
    try:
        conversation = live.create_conversation()
        live.add_item(conversation, text_item("u1"))
        gone.start_response("resp_gone", conversation)
        gone.add_item(conversation, Item("c1", "assistant", status="completed", type="function_call", call_id="call",
                                         name="f", arguments="{}"), response_id="resp_gone")
        gone.add_item(conversation, reply("a1", "half a sent"), response_id="resp_gone")
        live.start_response("resp_live", conversation)
        live.add_item(conversation, reply("a2", "mine"), response_id="resp_live")

        assert live.recover_abandoned(STALE_S) == []  # another host with a fresh heartbeat: alive
        age_heartbeat(live, "resp_gone", STALE_S + 1)
        age_heartbeat(live, "resp_live", STALE_S + 1)  # our own: never taken, however late
        assert live.recover_abandoned(STALE_S) == ["resp_gone"]
        assert live.recover_abandoned(STALE_S) == []

        record = live.get_response("resp_gone")
        assert record is not None and (record.status, record.reason) == ("incomplete", "server_crash")
        assert record.output_item_ids == ("c1", "a1")
        assert live.get_item(conversation, "a1") == reply("a1", "half a sent", "incomplete")
        assert live.get_item(conversation, "c1").status == "completed"  # it had ended before the crash
        assert live.get_item(conversation, "a2").status == "in_progress"
        mine = live.get_response("resp_live")
        assert mine is not None and mine.status == "in_progress"
    finally:
        gone.close()
        live.close()


def test_a_dead_process_of_this_host_is_recovered_at_once(url: str) -> None:  # noqa: F811
    host = socket.gethostname()
    live = Store(url)
    live.upgrade()
    dead = Store(url, owner=f"{host}:{dead_pid()}:x")
    running = Store(url, owner=f"{host}:{os.getppid()}:x")
    try:
        conversation = live.create_conversation()
        dead.start_response("resp_dead", conversation)
        running.start_response("resp_running", conversation)
        assert live.recover_abandoned(STALE_S) == ["resp_dead"]  # no waiting for its heartbeat to go stale
        record = live.get_response("resp_running")
        assert record is not None and record.status == "in_progress"
    finally:
        dead.close()
        running.close()
        live.close()


def test_the_owner_finishing_after_a_recovery_has_the_last_word(store: Store, conversation: str) -> None:  # noqa: F811
    gone = Store(store.url.render_as_string(hide_password=False), owner="elsewhere:1:slow")
    try:
        gone.start_response("resp_1", conversation)
        gone.add_item(conversation, reply("a1", "so"), response_id="resp_1")
        age_heartbeat(store, "resp_1", STALE_S + 1)
        assert store.recover_abandoned(STALE_S) == ["resp_1"]
        gone.update_item(conversation, reply("a1", "so far", "incomplete"))  # what its client was told
        gone.finish_response(ResponseRecord("resp_1", conversation, "failed", output_item_ids=("a1",)))
        record = store.get_response("resp_1")
        assert record is not None and record.status == "failed"
        assert store.get_item(conversation, "a1").text == "so far"
    finally:
        gone.close()


def test_a_full_disk_is_storage_unavailable_and_reads_go_on(tmp_path: Path) -> None:
    db = Store(f"sqlite:///{tmp_path}/assistant.db")
    db.upgrade()
    conv = db.create_conversation()
    db.add_item(conv, text_item("kept"))
    try:
        with full_disk(db):
            with pytest.raises(StorageUnavailable) as info:
                db.add_item(conv, text_item("big", "x" * 100_000))
            assert (info.value.code, info.value.type) == ("storage_unavailable", "server_error")
            assert [item.id for item in db.list_items(conv)] == ["kept"]  # nothing half-written
        db.add_item(conv, text_item("big", "x" * 100_000))  # space is back: no restart needed
        assert [item.id for item in db.list_items(conv)] == ["kept", "big"]
    finally:
        db.close()


def test_an_unreachable_postgresql_is_storage_unavailable() -> None:
    db = Store("postgresql+psycopg://postgres@127.0.0.1:1/none")
    try:
        with pytest.raises(StorageUnavailable):
            db.create_conversation()
        with pytest.raises(StorageUnavailable):
            db.list_items("conv_x")
    finally:
        db.close()


def test_a_bug_is_not_a_storage_fault(tmp_path: Path) -> None:
    db = Store(f"sqlite:///{tmp_path}/assistant.db")  # never upgraded: no tables
    try:
        with pytest.raises(OperationalError, match="no such table"):
            db.create_conversation()
    finally:
        db.close()
