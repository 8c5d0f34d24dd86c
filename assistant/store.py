"""The conversation store: conversations, items, images and responses in SQL.

``Store`` is a synchronous repository over one SQLAlchemy Engine. The server
calls it from worker threads (``asyncio.to_thread``), so every method opens its
own short session and transaction; nothing is shared between calls but the
Engine. Methods take and return the frozen dataclasses of
:mod:`assistant.items`, never ORM rows (those live in
:mod:`assistant.store_models`).

Contract:
- each method is one transaction: it commits completely or not at all (an
  item, its content parts and its new images are stored together); only
  :meth:`Store.recover_abandoned` takes one per response it finishes;
- an unknown id raises a coded :mod:`assistant.errors` error naming the
  offending ``param``; storage that cannot be written or reached (a full
  disk, an I/O error, a database that is down or dropped the connection)
  raises :class:`~assistant.errors.StorageUnavailable`, translated here and
  nowhere else; any other database failure propagates unchanged;
- items are kept in ``position`` order; inserting before the end shifts the
  later positions by one; deleting leaves a gap, which is harmless;
- an image is stored once per ``sha256``: a second insert of the same hash,
  even by a concurrent transaction, is silently skipped;
- write transactions first touch the conversation row (``updated_at``), which
  serializes writers per conversation on PostgreSQL and takes SQLite's write
  lock up front (``BEGIN IMMEDIATE``), so a reader never has to upgrade its
  lock halfway and fail with "database is locked";
- a response records its ``owner`` (this Store's process id, ``host:pid:random``)
  and a heartbeat; :meth:`Store.recover_abandoned` finishes, as ``incomplete``
  with reason ``server_crash``, the in-progress responses (and their in-progress
  items, with the text saved so far) of owners that are gone, never a live one's.

Supported URLs: ``sqlite:///path/to/file.db`` and ``postgresql+psycopg://...``.
In-memory SQLite is refused: each pooled connection would see its own database.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (URL, Connection, Engine, bindparam, create_engine, delete, event, insert, make_url, or_, select,
                        tuple_, update)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from assistant.errors import ConversationNotFound, ItemAlreadyExists, ItemNotFound, ResponseNotFound, quote
from assistant.items import ContentPart, ConversationInfo, Item, ResponseRecord, StoredImage, Usage
from assistant.owners import is_gone, process_owner
from assistant.storage_faults import storage_faults
from assistant.store_models import DEFAULT_TENANT, ConversationRow, ImageRow, ItemRow, PartRow, ResponseRow, utcnow

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
ROOT = "root"  # previous_item_id that means "insert first"
SQLITE_BUSY_TIMEOUT_MS = 5000
WAL_SWITCH_ATTEMPTS = 5  # each waits up to the busy timeout
READ_ONLY = "assistant_read_only"  # execution option of reads: SQLite may BEGIN DEFERRED, taking no write lock
PG_CONNECT_TIMEOUT_S = 10  # unless the URL sets connect_timeout
MIGRATION_LOCK_KEY = 0x61737369  # pg_advisory_xact_lock key of schema upgrades ("assi")
CRASH_REASON = "server_crash"  # the reason of a response finished for an owner that died


class Store:
    """Conversations and their items, images and responses, behind one Engine."""

    def __init__(self, url: str, owner: str | None = None) -> None:
        self.url = make_url(url)
        self.engine = _create_engine(self.url)
        self.owner = owner or process_owner()  # what this process's responses record as their owner
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        self._read = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Session]:
        """One write transaction; storage faults leave it as StorageUnavailable."""
        with storage_faults(), self._write.begin() as session:
            yield session

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Session]:
        with storage_faults(), self._read.begin() as session:
            yield session

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (a no-op when it is already there). Safe to call from several
        processes at once: on PostgreSQL they take turns on an advisory lock (the first migrates, the others
        then find the schema current); SQLite's write lock does the same."""
        config = _alembic_config()
        with self.engine.connect() as connection:
            # SQLite batch migrations drop and recreate tables; with foreign keys on, dropping a
            # parent table would cascade-delete its children. The pragma only works outside a transaction.
            is_sqlite = connection.dialect.name == "sqlite"
            if is_sqlite:
                _set_sqlite_foreign_keys(connection, False)
            try:
                with connection.begin():
                    if connection.dialect.name == "postgresql":  # released when this transaction ends
                        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
                    config.attributes["connection"] = connection
                    command.upgrade(config, "head")
                    if is_sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                        raise RuntimeError("A migration left rows with dangling foreign keys; rolled back.")
            finally:
                if is_sqlite:
                    _set_sqlite_foreign_keys(connection, True)

    def is_up_to_date(self) -> bool:
        """Whether the schema is at the newest migration (without changing anything)."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        heads = set(ScriptDirectory.from_config(_alembic_config()).get_heads())
        with self.engine.connect() as connection:
            return set(MigrationContext.configure(connection).get_current_heads()) == heads

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")

    # ------------------------------------------------------------ conversations

    def create_conversation(self, metadata: dict[str, str] | None = None, *, tenant: str = DEFAULT_TENANT,
                            conversation_id: str | None = None) -> str:
        """A new conversation of ``tenant`` (with ``conversation_id`` when given: see :func:`new_conversation_id`)."""
        conversation_id = conversation_id or new_conversation_id()
        with self._writing() as session:
            now = utcnow()
            session.connection().execute(_INSERT_CONVERSATION, {"id": conversation_id, "metadata": metadata,
                                                                "tenant": tenant, "created_at": now,
                                                                "updated_at": now})
        return conversation_id

    def conversation_metadata(self, conversation_id: str) -> dict[str, str] | None:
        """The metadata a conversation was created with (None when none was given)."""
        with self._reading() as session:
            row = session.get(ConversationRow, conversation_id)
            if row is None:
                raise ConversationNotFound(f"No conversation {conversation_id!r}.", param="conversation")
            return row.metadata_

    def conversation_exists(self, conversation_id: str, tenant: str) -> bool:
        """Whether ``tenant`` has this conversation (another tenant's is as absent as an unknown one)."""
        with self._reading() as session:
            row = session.get(ConversationRow, conversation_id)
            return row is not None and row.tenant == tenant

    def get_conversation(self, conversation_id: str, tenant: str) -> ConversationInfo:
        with self._reading() as session:
            row = session.get(ConversationRow, conversation_id)
            if row is None or row.tenant != tenant:
                raise _conversation_not_found(conversation_id)
            return _conversation_of(row)

    def list_conversations(self, tenant: str, *, limit: int, after: str | None = None,
                           newest_first: bool = True) -> tuple[list[ConversationInfo], bool]:
        """One page of ``tenant``'s conversations by creation time, starting after the conversation ``after``;
        and whether more follow."""
        order = (ConversationRow.created_at, ConversationRow.id)
        with self._reading() as session:
            query = select(ConversationRow).where(ConversationRow.tenant == tenant)
            if after is not None:
                cursor = session.get(ConversationRow, after)
                if cursor is None or cursor.tenant != tenant:
                    raise _conversation_not_found(after, "after")
                key = tuple_(*order)
                query = query.where(key < (cursor.created_at, cursor.id) if newest_first
                                    else key > (cursor.created_at, cursor.id))
            query = query.order_by(*(column.desc() if newest_first else column for column in order))
            rows = list(session.scalars(query.limit(limit + 1)))
            return [_conversation_of(row) for row in rows[:limit]], len(rows) > limit

    def delete_conversation(self, conversation_id: str, tenant: str) -> None:
        """Delete a conversation with its items and responses (image bytes stay: other items may share them)."""
        with self._writing() as session:
            result = session.execute(delete(ConversationRow).where(
                ConversationRow.id == conversation_id, ConversationRow.tenant == tenant))
            if _rowcount(result) == 0:
                raise _conversation_not_found(conversation_id)

    # ------------------------------------------------------------ items

    def page_items(self, conversation_id: str, *, limit: int, after: str | None = None,
                   newest_first: bool = False) -> tuple[list[Item], bool]:
        """One page of a conversation's items in order (or newest first), starting after the item ``after``;
        and whether more follow."""
        with self._reading() as session:
            query = select(ItemRow).where(ItemRow.conversation_id == conversation_id)
            if after is not None:
                position = _position_of(session, conversation_id, after)
                if position is None:
                    raise _item_not_found(after, "after")
                query = query.where(ItemRow.position < position if newest_first else ItemRow.position > position)
            query = query.order_by(ItemRow.position.desc() if newest_first else ItemRow.position)
            rows = list(session.scalars(query.limit(limit + 1)))
            return [_item_of(row) for row in rows[:limit]], len(rows) > limit

    def list_items(self, conversation_id: str) -> list[Item]:
        """All items of a conversation in order; empty for an unknown conversation."""
        with self._reading() as session:
            rows = session.scalars(
                select(ItemRow).where(ItemRow.conversation_id == conversation_id).order_by(ItemRow.position))
            return [_item_of(row) for row in rows]

    def get_item(self, conversation_id: str, item_id: str) -> Item:
        with self._reading() as session:
            row = session.scalars(
                select(ItemRow).where(ItemRow.conversation_id == conversation_id, ItemRow.item_id == item_id)
            ).one_or_none()
            if row is None:
                raise _item_not_found(item_id, "item_id")
            return _item_of(row)

    def previous_item_id(self, conversation_id: str, item_id: str) -> str | None:
        """The id of the item just before ``item_id``, or None when it is first."""
        with self._reading() as session:
            position = _position_of(session, conversation_id, item_id)
            if position is None:
                raise _item_not_found(item_id, "item_id")
            return _last_item_before(session, conversation_id, position)

    def add_item(
        self,
        conversation_id: str,
        item: Item,
        previous_item_id: str | None = None,
        images: Sequence[StoredImage] = (),
        check_images: Callable[[list[ContentPart]], None] | None = None,
        response_id: str | None = None,
    ) -> str | None:
        """Store ``item`` (and the new ``images`` it refers to); return the id now preceding it.

        ``previous_item_id``: None appends, ``"root"`` inserts first, any other id
        inserts right after that item. ``check_images`` gets the image parts already
        in the conversation, inside the transaction and after the conversation is
        locked, so a budget it enforces holds against concurrent writers; whatever
        it raises aborts the insert. ``response_id``: the (started) response producing
        the item, so that recovery finds it should that response's process die.
        """
        with self._writing() as session:
            _touch(session, conversation_id)
            if check_images is not None:
                check_images(_image_parts(session, conversation_id))
            if _position_of(session, conversation_id, item.id) is not None:
                raise ItemAlreadyExists(f"Item {item.id!r} already exists in this conversation.", param="item.id")
            position, previous = _insertion_point(session, conversation_id, previous_item_id)
            _insert_images(session, images)
            # Statements built once, not ORM objects: a response adds its output item while the engine decodes
            # the others' (the ORM's unit of work took 0.81-1.09 ms of CPU an item, these 0.61-0.63; SQLite on a
            # 2-core AMD EPYC, Zen 5).
            connection = session.connection()
            item_pk = connection.execute(_INSERT_ITEM, {
                "conversation_id": conversation_id, "item_id": item.id, "position": position, "type": item.type,
                "role": item.role, "status": item.status, "call_id": item.call_id, "name": item.name,
                "arguments": item.arguments, "output": item.output, "response_id": response_id,
                "created_at": utcnow()}).scalar_one()
            if item.content:
                connection.execute(_INSERT_PARTS, [{"item_pk": item_pk, **values} for values in _part_values(item)])
        return previous

    def update_item(self, conversation_id: str, item: Item) -> None:
        """Replace the content and status of a stored item (e.g. a finished assistant message, or a streaming
        one's text so far: a response saves that twice a second, so this is statements, not ORM objects; the
        ORM's load, clear and re-insert took half as much CPU again). The statements are built once
        (:data:`_UPDATE_ITEM` and its neighbours) and run on the session's connection: building them on each call
        and running them through the ORM session took 1.55 ms of CPU a save, 0.80 this way (SQLite alone; in a
        server decoding eight streams on the same two cores, 3.2 and 1.5 ms), and eight streams save about
        sixteen times a second."""
        with self._writing() as session:
            _touch(session, conversation_id)
            if not _replace_item(session.connection(), conversation_id, item):
                raise _item_not_found(item.id, "item_id")

    def delete_item(self, conversation_id: str, item_id: str) -> None:
        with self._writing() as session:
            _touch(session, conversation_id)
            result = session.execute(
                delete(ItemRow).where(ItemRow.conversation_id == conversation_id, ItemRow.item_id == item_id))
            if _rowcount(result) == 0:
                raise _item_not_found(item_id, "item_id")

    # ------------------------------------------------------------ images

    def image_parts(self, conversation_id: str) -> list[ContentPart]:
        """The image parts of a conversation's items (which images it refers to)."""
        with self._reading() as session:
            return _image_parts(session, conversation_id)

    def get_image(self, sha256: str) -> StoredImage | None:
        return self.get_images([sha256]).get(sha256)

    def get_images(self, sha256s: Sequence[str]) -> dict[str, StoredImage]:
        """The stored images among ``sha256s``, in one query; absent ones are left out."""
        if not sha256s:
            return {}
        with self._reading() as session:
            rows = session.scalars(select(ImageRow).where(ImageRow.sha256.in_(set(sha256s))))
            return {row.sha256: StoredImage(row.sha256, row.mime_type, row.width, row.height, row.data)
                    for row in rows}

    # ------------------------------------------------------------ responses

    def start_response(self, response_id: str, conversation_id: str) -> None:
        with self._writing() as session:
            _touch(session, conversation_id)
            now = utcnow()
            session.connection().execute(_INSERT_RESPONSE, {
                "id": response_id, "conversation_id": conversation_id, "status": "in_progress", "owner": self.owner,
                "heartbeat_at": now, "created_at": now})

    def finish_response(self, record: ResponseRecord, items: Sequence[Item] = ()) -> None:
        """Write a response's outcome, and ``items`` (its output items as they ended: their content and status, as
        :meth:`update_item` writes them) in the same transaction; mark its output items as produced by it.

        Output items deleted meanwhile are skipped; an unknown response raises.
        """
        with self._writing() as session:
            connection = session.connection()
            conversation_id = connection.execute(_CONVERSATION_OF_RESPONSE, {"response": record.id}).scalar()
            if conversation_id is None:
                raise ResponseNotFound(f"No response {record.id!r}.", param="response_id")
            _touch(session, conversation_id)
            for item in items:
                _replace_item(connection, conversation_id, item)  # False: deleted meanwhile, nothing to write
            usage = record.usage
            outcome = (record.status, record.reason, usage.input_tokens, usage.output_tokens, usage.cached_tokens,
                       usage.image_tokens, usage.cached_image_tokens, record.time_to_first_token_ms,
                       record.duration_ms, utcnow())
            connection.execute(_FINISH_RESPONSE, {"response": record.id, **{
                f"new_{column}": value for column, value in zip(_OUTCOME, outcome, strict=True)}})
            if record.output_item_ids:
                connection.execute(
                    update(_ITEMS)
                    .where(_ITEMS.c.conversation_id == conversation_id, _ITEMS.c.item_id.in_(record.output_item_ids))
                    .values(response_id=record.id))

    def get_response(self, response_id: str) -> ResponseRecord | None:
        with self._reading() as session:
            row = session.get(ResponseRow, response_id)
            if row is None:
                return None
            output_ids = session.scalars(
                select(ItemRow.item_id).where(ItemRow.response_id == response_id).order_by(ItemRow.position))
            return _record_of(row, tuple(output_ids))

    # ------------------------------------------------------------ liveness and recovery

    def running_elsewhere(self, conversation_id: str) -> str | None:
        """The id of a response of this conversation that another server (replica) is running, if any."""
        with self._reading() as session:
            return session.scalar(select(ResponseRow.id).where(
                ResponseRow.conversation_id == conversation_id, ResponseRow.status == "in_progress",
                or_(ResponseRow.owner.is_(None), ResponseRow.owner != self.owner)).limit(1))

    def heartbeat(self) -> int:
        """Say this process still runs its in-progress responses; returns how many it runs."""
        with self._writing() as session:
            return _rowcount(session.execute(
                update(ResponseRow).where(ResponseRow.owner == self.owner, ResponseRow.status == "in_progress")
                .values(heartbeat_at=utcnow())))

    def recover_abandoned(self, stale_after_s: float) -> list[str]:
        """Finish the responses other processes left in progress and can no longer finish; return their ids.

        An owner is gone when its heartbeat (or, without one, the response's start) is older than
        ``stale_after_s``, or when it ran on this host and its process no longer does. Each response is
        finished in its own transaction and only if it is still in progress, so replicas recovering at the
        same time, or a slow owner finishing after all, each win or lose cleanly.
        """
        now = utcnow()
        cutoff = now - timedelta(seconds=stale_after_s)
        with self._reading() as session:
            candidates = session.execute(
                select(ResponseRow.id, ResponseRow.owner, ResponseRow.heartbeat_at, ResponseRow.created_at)
                .where(ResponseRow.status == "in_progress",
                       or_(ResponseRow.owner.is_(None), ResponseRow.owner != self.owner))).all()
        recovered = []
        for row in candidates:
            if not is_gone(row.owner, _as_utc(row.heartbeat_at or row.created_at), cutoff):
                continue
            with self._writing() as session:
                finished = session.execute(
                    update(ResponseRow).where(ResponseRow.id == row.id, ResponseRow.status == "in_progress")
                    .values(status="incomplete", reason=CRASH_REASON, finished_at=now))
                if _rowcount(finished) == 0:
                    continue  # finished meanwhile, by its owner or another replica
                session.execute(
                    update(ItemRow).where(ItemRow.response_id == row.id, ItemRow.status == "in_progress")
                    .values(status="incomplete").execution_options(synchronize_session=False))
            recovered.append(row.id)
        return recovered


def new_conversation_id() -> str:
    """An id for a conversation not stored yet (a connection names its conversation before its first write)."""
    return "conv_" + secrets.token_hex(12)


# ---------------------------------------------------------------- engine


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "postgresql":
        # A database host that drops packets would hold a worker thread for minutes of TCP retries per connect.
        timeout = {} if "connect_timeout" in url.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
        return create_engine(url, pool_pre_ping=True, connect_args=timeout)
    if url.get_backend_name() != "sqlite":
        raise ValueError(f"Unsupported database {url.get_backend_name()!r}: use sqlite or postgresql.")
    if url.database in (None, "", ":memory:") or url.query.get("mode") == "memory":
        raise ValueError("In-memory SQLite is not supported; give the store a file path.")
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module; _on_sqlite_begin emits BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    for attempt in range(WAL_SWITCH_ATTEMPTS):
        # Switching a new database to WAL needs it to itself: processes opening a new file together (replicas
        # started at once, each about to migrate) can be refused "database is locked" while another holds it.
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_SWITCH_ATTEMPTS - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _set_sqlite_foreign_keys(connection: Connection, enabled: bool) -> None:
    # Straight to the driver: going through SQLAlchemy would BEGIN first, where the pragma is a no-op.
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys = {'ON' if enabled else 'OFF'}")


def _on_sqlite_begin(connection: Connection) -> None:
    # Writers take the write lock at BEGIN, where busy_timeout can wait for it; readers never block.
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


# ---------------------------------------------------------------- queries


_CONVERSATIONS, _ITEMS, _PARTS = ConversationRow.__table__, ItemRow.__table__, PartRow.__table__
_RESPONSES = ResponseRow.__table__
# Statements of the most frequent writes, built once (bind parameters named apart from the columns they set)
_TOUCH = update(_CONVERSATIONS).where(_CONVERSATIONS.c.id == bindparam("conversation")).values(
    updated_at=bindparam("now"))
_UPDATE_ITEM = (update(_ITEMS).where(_ITEMS.c.conversation_id == bindparam("conversation"),
                                     _ITEMS.c.item_id == bindparam("item"))
                .values(status=bindparam("new_status"), arguments=bindparam("new_arguments"),
                        output=bindparam("new_output")).returning(_ITEMS.c.pk))
_DELETE_PARTS = delete(_PARTS).where(_PARTS.c.item_pk == bindparam("item"))
_INSERT_PARTS = insert(_PARTS)
_INSERT_ITEM = insert(_ITEMS).returning(_ITEMS.c.pk)
_INSERT_CONVERSATION = insert(_CONVERSATIONS)
_INSERT_RESPONSE = insert(_RESPONSES)
_CONVERSATION_OF_RESPONSE = select(_RESPONSES.c.conversation_id).where(_RESPONSES.c.id == bindparam("response"))
_OUTCOME = ("status", "reason", "input_tokens", "output_tokens", "cached_tokens", "image_tokens",
            "cached_image_tokens", "time_to_first_token_ms", "duration_ms", "finished_at")  # set by finish_response
_FINISH_RESPONSE = update(_RESPONSES).where(_RESPONSES.c.id == bindparam("response")).values(
    {column: bindparam(f"new_{column}") for column in _OUTCOME})


def _replace_item(connection: Connection, conversation_id: str, item: Item) -> bool:
    """Write ``item``'s status, content and call fields over the stored item of its id; False when there is none."""
    item_pk = connection.execute(_UPDATE_ITEM, {
        "conversation": conversation_id, "item": item.id, "new_status": item.status,
        "new_arguments": item.arguments, "new_output": item.output}).scalar()
    if item_pk is None:
        return False
    connection.execute(_DELETE_PARTS, {"item": item_pk})
    if item.content:
        connection.execute(_INSERT_PARTS, [{"item_pk": item_pk, **values} for values in _part_values(item)])
    return True


def _touch(session: Session, conversation_id: str) -> None:
    """Bump ``updated_at``; locks the conversation for this transaction and checks that it exists."""
    result = session.connection().execute(_TOUCH, {"conversation": conversation_id, "now": utcnow()})
    if _rowcount(result) == 0:
        raise ConversationNotFound(f"No conversation {conversation_id!r}.", param="conversation")


def _position_of(session: Session, conversation_id: str, item_id: str) -> int | None:
    return session.scalar(
        select(ItemRow.position).where(ItemRow.conversation_id == conversation_id, ItemRow.item_id == item_id))


def _last_item_before(session: Session, conversation_id: str, position: int) -> str | None:
    return session.scalar(
        select(ItemRow.item_id).where(ItemRow.conversation_id == conversation_id, ItemRow.position < position)
        .order_by(ItemRow.position.desc()).limit(1))


def _insertion_point(session: Session, conversation_id: str, previous_item_id: str | None) -> tuple[int, str | None]:
    """Where a new item goes: its position and the id before it; makes room if needed."""
    if previous_item_id is None:
        last = session.execute(
            select(ItemRow.position, ItemRow.item_id).where(ItemRow.conversation_id == conversation_id)
            .order_by(ItemRow.position.desc()).limit(1)).first()
        return (0, None) if last is None else (last.position + 1, last.item_id)
    if previous_item_id == ROOT:
        _shift_from(session, conversation_id, 0)
        return 0, None
    position = _position_of(session, conversation_id, previous_item_id)
    if position is None:
        raise _item_not_found(previous_item_id, "previous_item_id")
    _shift_from(session, conversation_id, position + 1)
    return position + 1, previous_item_id


def _shift_from(session: Session, conversation_id: str, position: int) -> None:
    session.execute(
        update(ItemRow)
        .where(ItemRow.conversation_id == conversation_id, ItemRow.position >= position)
        .values(position=ItemRow.position + 1)
        .execution_options(synchronize_session=False))


def _insert_images(session: Session, images: Sequence[StoredImage]) -> None:
    """Insert images whose hash is not stored yet; a concurrent insert of the same hash is no error."""
    unique = {image.sha256: image for image in images}
    if not unique:
        return
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    now = utcnow()
    rows = [dict(sha256=i.sha256, mime_type=i.mime_type, width=i.width, height=i.height,
                 num_bytes=i.num_bytes, data=i.data, created_at=now) for i in unique.values()]
    session.execute(insert(ImageRow).on_conflict_do_nothing(index_elements=["sha256"]), rows)


def _rowcount(result: Any) -> int:
    return cast(int, result.rowcount)


def _conversation_not_found(conversation_id: str, param: str = "conversation_id") -> ConversationNotFound:
    return ConversationNotFound(f"No conversation '{quote(conversation_id)}'.", param=param)


def _conversation_of(row: ConversationRow) -> ConversationInfo:
    created_at = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)  # SQLite: naive UTC
    return ConversationInfo(row.id, created_at, row.metadata_)


def _item_not_found(item_id: str, param: str) -> ItemNotFound:
    return ItemNotFound(f"No item {item_id!r} in this conversation.", param=param)


# ---------------------------------------------------------------- rows <-> items


def _image_parts(session: Session, conversation_id: str) -> list[ContentPart]:
    rows = session.scalars(
        select(PartRow).join(ItemRow, PartRow.item_pk == ItemRow.pk)
        .where(ItemRow.conversation_id == conversation_id, PartRow.image_sha256.is_not(None)))
    return [ContentPart("input_image", image_sha256=row.image_sha256, detail=cast(Any, row.detail)) for row in rows]


def _part_values(item: Item) -> list[dict[str, Any]]:
    """The item's content parts as PartRow column values, in order (the item's key not included)."""
    return [{"index": i, "type": p.type, "text": p.text, "image_sha256": p.image_sha256, "detail": p.detail}
            for i, p in enumerate(item.content)]


def _item_of(row: ItemRow) -> Item:
    parts = tuple(ContentPart(cast(Any, p.type), p.text, p.image_sha256, cast(Any, p.detail)) for p in row.parts)
    return Item(row.item_id, cast(Any, row.role), parts, cast(Any, row.status), cast(Any, row.type),
                row.call_id, row.name, row.arguments, row.output)


def _record_of(row: ResponseRow, output_item_ids: tuple[str, ...]) -> ResponseRecord:
    usage = Usage(row.input_tokens, row.output_tokens, row.cached_tokens, row.image_tokens, row.cached_image_tokens)
    return ResponseRecord(row.id, row.conversation_id, cast(Any, row.status), row.reason, output_item_ids, usage,
                          row.time_to_first_token_ms, row.duration_ms)


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite keeps naive UTC
