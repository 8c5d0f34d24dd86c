"""While serving, the heartbeat keeps this server's responses alive and recovery finishes a gone server's."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from assistant.store import Store
from assistant.store_models import ResponseRow, utcnow
from assistant.upkeep import run_upkeep


async def test_upkeep_heartbeats_ours_and_recovers_a_gone_servers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/assistant.db"
    store, gone = Store(url), Store(url, owner="elsewhere:1:gone")
    store.upgrade()
    try:
        conversation = store.create_conversation()
        store.start_response("resp_ours", conversation)
        gone.start_response("resp_gone", conversation)
        long_ago = utcnow() - timedelta(seconds=120)
        with store.engine.begin() as connection:
            connection.execute(update(ResponseRow).values(heartbeat_at=long_ago))
        task = asyncio.create_task(run_upkeep(store, heartbeat_interval_s=0.05, recovery_interval_s=0.05,
                                              stale_after_s=60))
        for _ in range(100):
            await asyncio.sleep(0.05)
            gone_record = store.get_response("resp_gone")
            if gone_record is not None and gone_record.status != "in_progress":
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert gone_record is not None and (gone_record.status, gone_record.reason) == ("incomplete", "server_crash")
        with store.engine.connect() as connection:
            status, heartbeat = connection.execute(select(ResponseRow.status, ResponseRow.heartbeat_at)
                                                   .where(ResponseRow.id == "resp_ours")).one()
        assert status == "in_progress" and heartbeat.replace(tzinfo=long_ago.tzinfo) > long_ago + timedelta(seconds=60)
    finally:
        gone.close()
        store.close()
