"""Tests of assistant.store: schema, ordering, errors, images, responses, concurrency.

Every test runs on a SQLite file and on PostgreSQL (``-m "not postgres"`` skips
the latter). Each PostgreSQL test gets its own schema, dropped afterwards.
Without a reachable server the PostgreSQL cases are skipped, except in CI
(``CI`` set), where that is a failure.
"""

from __future__ import annotations

import os
from dataclasses import replace
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, make_url, pool, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from assistant.errors import ConversationNotFound, ItemAlreadyExists, ItemNotFound, ResponseNotFound
from assistant.items import ContentPart, Item, ResponseRecord, StoredImage, Usage
from assistant.store import Store
from assistant.store_models import Base, ImageRow

POSTGRES_URL = os.environ.get("ASSISTANT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = {"api_keys", "conversations", "items", "content_parts", "images", "responses"}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL of an empty database (its parent directory may not exist yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/data/assistant.db"
    else:
        yield from _postgres_schema_url()


def _postgres_schema_url() -> Iterator[str]:
    admin = create_engine(POSTGRES_URL, poolclass=pool.NullPool, connect_args={"connect_timeout": 3})
    schema = f"t_{uuid.uuid4().hex}"
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unreachable in CI: {exc}")
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable")
    try:
        scoped = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    store = Store(url)
    store.upgrade()
    yield store
    store.close()


@pytest.fixture
def conversation(store: Store) -> str:
    return store.create_conversation()


def text_item(item_id: str, text: str = "hello", role: str = "user") -> Item:
    return Item(item_id, role, (ContentPart("input_text", text=text),))  # type: ignore[arg-type]


def image(seed: str) -> StoredImage:
    return StoredImage(seed * 64, "image/png", 4, 3, b"\x89PNG" + seed.encode())


def image_item(item_id: str, *images: StoredImage) -> Item:
    parts = tuple(ContentPart("input_image", image_sha256=i.sha256, detail="low") for i in images)
    return Item(item_id, "user", (ContentPart("input_text", text="look"), *parts))


def ids(store: Store, conversation_id: str) -> list[str]:
    return [item.id for item in store.list_items(conversation_id)]


def num_images(store: Store) -> int:
    with store.engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(ImageRow)) or 0


# ---------------------------------------------------------------- schema


def test_upgrade_creates_schema_and_is_idempotent(url: str) -> None:
    store = Store(url)
    try:
        store.upgrade()
        store.upgrade()
        with store.engine.connect() as connection:
            assert TABLES | {"alembic_version"} <= set(inspect(connection).get_table_names())
            assert MigrationContext.configure(connection).get_current_revision() == "0003"
            if connection.dialect.name == "sqlite":  # switched off while migrating, back on afterwards
                assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.close()


def test_models_match_migration(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_data_survives_reopening(url: str) -> None:
    first = Store(url)
    first.upgrade()
    conversation_id = first.create_conversation()
    first.add_item(conversation_id, image_item("a", image("1")), images=[image("1")])
    first.close()

    second = Store(url)
    try:
        second.upgrade()
        assert second.conversation_exists(conversation_id, "default")
        assert second.list_items(conversation_id) == [image_item("a", image("1"))]
        assert second.get_image(image("1").sha256) == image("1")
    finally:
        second.close()


# ---------------------------------------------------------------- items


def test_conversation_keeps_its_metadata(store: Store) -> None:
    kept = store.create_conversation(metadata={"customer": "c-17", "channel": "web"})
    assert store.conversation_metadata(kept) == {"customer": "c-17", "channel": "web"}
    assert store.conversation_metadata(store.create_conversation()) is None
    with pytest.raises(ConversationNotFound):
        store.conversation_metadata("conv_missing")


def test_tool_call_items_round_trip(store: Store, conversation: str) -> None:
    call = Item("item_call", "assistant", status="in_progress", type="function_call", call_id="call_1",
                name="get_weather", arguments='{"city": "Par')
    store.add_item(conversation, call)
    store.update_item(conversation, replace(call, status="completed", arguments='{"city": "Paris"}'))
    store.add_item(conversation, Item("item_out", "user", type="function_call_output", call_id="call_1",
                                      output='{"temp_c": 21}'))
    stored = store.list_items(conversation)
    assert stored == [replace(call, status="completed", arguments='{"city": "Paris"}'),
                      Item("item_out", "user", type="function_call_output", call_id="call_1", output='{"temp_c": 21}')]


def test_conversations_are_created_with_fresh_ids(store: Store) -> None:
    first, second = store.create_conversation(), store.create_conversation()
    assert first != second
    assert first.startswith("conv_") and len(first) == len("conv_") + 24
    assert store.conversation_exists(first, "default")
    assert not store.conversation_exists("conv_missing", "default")
    assert store.list_items("conv_missing") == []


def test_a_conversation_belongs_to_its_tenant(store: Store) -> None:
    theirs = store.create_conversation(tenant="acme")
    assert store.conversation_exists(theirs, "acme")
    assert not store.conversation_exists(theirs, "default")  # as absent as an unknown id
    chosen = store.create_conversation(tenant="acme", conversation_id="conv_" + "0" * 24)
    assert chosen == "conv_" + "0" * 24 and store.conversation_exists(chosen, "acme")


def test_append_root_and_insert_after_keep_order(store: Store, conversation: str) -> None:
    assert store.add_item(conversation, text_item("a")) is None
    assert store.add_item(conversation, text_item("c")) == "a"
    assert store.add_item(conversation, text_item("b"), previous_item_id="a") == "a"
    assert store.add_item(conversation, text_item("first"), previous_item_id="root") is None
    assert store.add_item(conversation, text_item("last"), previous_item_id="c") == "c"

    assert ids(store, conversation) == ["first", "a", "b", "c", "last"]
    assert store.previous_item_id(conversation, "first") is None
    assert store.previous_item_id(conversation, "c") == "b"
    assert store.get_item(conversation, "b") == text_item("b")


def test_unknown_previous_item_changes_nothing(store: Store, conversation: str) -> None:
    store.add_item(conversation, text_item("a"))
    with pytest.raises(ItemNotFound) as caught:
        store.add_item(conversation, image_item("b", image("1")), previous_item_id="nope", images=[image("1")])
    assert (caught.value.code, caught.value.param) == ("item_not_found", "previous_item_id")
    assert ids(store, conversation) == ["a"]
    assert num_images(store) == 0


def test_duplicate_item_id_changes_nothing(store: Store, conversation: str) -> None:
    store.add_item(conversation, text_item("a", "original"))
    store.add_item(conversation, text_item("b"))
    with pytest.raises(ItemAlreadyExists) as caught:
        store.add_item(conversation, image_item("a", image("1")), previous_item_id="root", images=[image("1")])
    assert (caught.value.code, caught.value.param) == ("item_already_exists", "item.id")
    assert store.list_items(conversation) == [text_item("a", "original"), text_item("b")]
    assert num_images(store) == 0


def test_same_item_id_in_another_conversation_is_fine(store: Store, conversation: str) -> None:
    other = store.create_conversation()
    store.add_item(conversation, text_item("a", "one"))
    store.add_item(other, text_item("a", "two"))
    assert store.get_item(other, "a") == text_item("a", "two")


def test_unknown_conversation_is_refused(store: Store) -> None:
    with pytest.raises(ConversationNotFound) as caught:
        store.add_item("conv_missing", text_item("a"))
    assert caught.value.code == "conversation_not_found"
    with pytest.raises(ConversationNotFound):
        store.start_response("resp_1", "conv_missing")


def test_delete_item(store: Store, conversation: str) -> None:
    for item_id in "abc":
        store.add_item(conversation, text_item(item_id))
    store.delete_item(conversation, "b")

    assert ids(store, conversation) == ["a", "c"]
    assert store.previous_item_id(conversation, "c") == "a"
    for call in (store.get_item, store.delete_item, store.previous_item_id):
        with pytest.raises(ItemNotFound) as caught:
            call(conversation, "b")
        assert caught.value.param == "item_id"
    store.add_item(conversation, text_item("b"), previous_item_id="a")
    assert ids(store, conversation) == ["a", "b", "c"]


def test_update_item_replaces_content_and_status(store: Store, conversation: str) -> None:
    store.add_item(conversation, text_item("q"))
    store.add_item(conversation, Item("r", "assistant", (ContentPart("output_text", text=""),), "in_progress"))
    done = Item("r", "assistant", (ContentPart("output_text", text="Hi"), ContentPart("output_text", text="!")))
    store.update_item(conversation, done)

    assert store.list_items(conversation) == [text_item("q"), done]
    with pytest.raises(ItemNotFound):
        store.update_item(conversation, text_item("missing"))


# ---------------------------------------------------------------- images


def test_image_is_stored_once_per_hash(store: Store, conversation: str) -> None:
    picture = image("1")
    store.add_item(conversation, image_item("a", picture, picture), images=[picture, picture])
    store.add_item(conversation, image_item("b", picture), images=[picture])

    assert num_images(store) == 1
    assert store.get_image(picture.sha256) == picture
    assert store.get_image("0" * 64) is None
    assert store.get_item(conversation, "a").image_hashes == (picture.sha256, picture.sha256)


def test_images_are_read_in_one_query_and_absent_ones_left_out(store: Store, conversation: str) -> None:
    first, second = image("1"), image("2")
    store.add_item(conversation, image_item("a", first, second), images=[first, second])
    statements: list[str] = []
    sqlalchemy.event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    found = store.get_images([first.sha256, "0" * 64, second.sha256, first.sha256])
    assert found == {first.sha256: first, second.sha256: second}
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1
    assert store.get_images([]) == {}


def test_failed_item_insert_leaves_no_orphan_image(store: Store, conversation: str) -> None:
    # The second part refers to an image nobody stored: the foreign key fails the whole transaction.
    with pytest.raises(IntegrityError):
        store.add_item(conversation, image_item("a", image("1"), image("2")), images=[image("1")])
    assert num_images(store) == 0
    assert store.list_items(conversation) == []


# ---------------------------------------------------------------- responses


def test_response_round_trip(store: Store, conversation: str) -> None:
    store.start_response("resp_1", conversation)
    assert store.get_response("resp_1") == ResponseRecord("resp_1", conversation, "in_progress")

    store.add_item(conversation, text_item("q"))
    store.add_item(conversation, text_item("r", "answer", role="assistant"))
    record = ResponseRecord("resp_1", conversation, "incomplete", "max_output_tokens", ("r", "deleted_meanwhile"),
                            Usage(input_tokens=120, output_tokens=16, cached_tokens=64, image_tokens=81,
                                  cached_image_tokens=81),
                            time_to_first_token_ms=12.5, duration_ms=340.25)
    store.finish_response(record)

    assert store.get_response("resp_1") == ResponseRecord(
        "resp_1", conversation, "incomplete", "max_output_tokens", ("r",), record.usage, 12.5, 340.25)
    assert store.get_response("resp_missing") is None
    with pytest.raises(ResponseNotFound):
        store.finish_response(ResponseRecord("resp_missing", conversation, "completed"))


def test_finish_response_writes_its_items_last_state_in_the_same_transaction(store: Store, conversation: str) -> None:
    store.add_item(conversation, text_item("q"))
    store.start_response("resp_1", conversation)
    store.add_item(conversation, Item("r", "assistant", (), "in_progress"), response_id="resp_1")
    store.add_item(conversation, Item("gone", "assistant", (), "in_progress"), response_id="resp_1")
    store.delete_item(conversation, "gone")  # deleted while the response ran: skipped, not an error
    ended = Item("r", "assistant", (ContentPart("output_text", text="Hello"),), "incomplete")
    commits: list[object] = []
    sqlalchemy.event.listen(store.engine, "commit", commits.append)
    record = ResponseRecord("resp_1", conversation, "incomplete", "max_output_tokens", ("r", "gone"),
                            Usage(input_tokens=9, output_tokens=2))
    store.finish_response(record, [ended, Item("gone", "assistant", (), "incomplete")])

    assert len(commits) == 1
    assert store.list_items(conversation) == [text_item("q"), ended]
    assert store.get_response("resp_1") == replace(record, output_item_ids=("r",))


# ---------------------------------------------------------------- concurrency


def test_concurrent_add_item_from_threads(store: Store, conversation: str) -> None:
    num_threads, num_items = 8, 15
    others = [store.create_conversation() for _ in range(num_threads)]
    shared = image("7")
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(num_items):
                previous = "root" if n % 5 == 0 else None
                store.add_item(conversation, text_item(f"w{worker}_{n}"), previous_item_id=previous)
            # Same new image in different conversations at once: stored once, no conflict error.
            store.add_item(others[worker], image_item("pic", shared), images=[shared])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    stored = ids(store, conversation)
    assert sorted(stored) == sorted(f"w{w}_{n}" for w in range(num_threads) for n in range(num_items))
    for worker in range(num_threads):  # each thread's appends keep their relative order
        appended = [i for i in stored if i.startswith(f"w{worker}_") and int(i.split("_")[1]) % 5]
        assert appended == sorted(appended, key=lambda i: int(i.split("_")[1]))
    assert num_images(store) == 1


def test_is_up_to_date_only_after_upgrade(url: str) -> None:
    store = Store(url)
    try:
        assert not store.is_up_to_date()
        store.upgrade()
        assert store.is_up_to_date()
    finally:
        store.close()


def test_check_images_sees_stored_image_parts_and_can_refuse(store: Store, conversation: str) -> None:
    from assistant.errors import BudgetExceeded

    store.add_item(conversation, image_item("a", image("a"), image("b")), images=[image("a"), image("b")])
    store.add_item(conversation, text_item("t"))
    seen: list[list[ContentPart]] = []
    store.add_item(conversation, image_item("c", image("c")), images=[image("c")], check_images=seen.append)
    assert [sorted(p.image_sha256 or "" for p in parts) for parts in seen] == [[image("a").sha256,
                                                                                image("b").sha256]]

    def refuse(existing: list[ContentPart]) -> None:
        raise BudgetExceeded(f"{len(existing)} images already", param="item.content")

    with pytest.raises(BudgetExceeded, match="3 images already"):
        store.add_item(conversation, image_item("d", image("d")), images=[image("d")], check_images=refuse)
    assert ids(store, conversation) == ["a", "t", "c"] and num_images(store) == 3


def test_conversations_and_items_page_per_tenant(store: Store) -> None:
    ids = [store.create_conversation(tenant="acme") for _ in range(5)]
    store.create_conversation(tenant="globex")
    page, has_more = store.list_conversations("acme", limit=2)
    assert [c.id for c in page] == ids[:2:-1][:2] and has_more
    page, has_more = store.list_conversations("acme", limit=2, after=page[-1].id)
    assert [c.id for c in page] == [ids[2], ids[1]] and has_more
    page, has_more = store.list_conversations("acme", limit=5, after=page[-1].id)
    assert [c.id for c in page] == [ids[0]] and not has_more
    assert [c.id for c in store.list_conversations("acme", limit=9, newest_first=False)[0]] == ids
    with pytest.raises(ConversationNotFound):
        store.list_conversations("globex", limit=2, after=ids[0])  # a cursor from another tenant
    for name in "abcde":
        store.add_item(ids[0], text_item(name))
    items, has_more = store.page_items(ids[0], limit=2, after="b")
    assert [i.id for i in items] == ["c", "d"] and has_more
    items, has_more = store.page_items(ids[0], limit=9, after="c", newest_first=True)
    assert [i.id for i in items] == ["b", "a"] and not has_more
    with pytest.raises(ConversationNotFound):
        store.delete_conversation(ids[0], "globex")
    store.delete_conversation(ids[0], "acme")
    assert store.list_items(ids[0]) == [] and not store.conversation_exists(ids[0], "acme")
    with pytest.raises(ConversationNotFound):
        store.get_conversation(ids[0], "acme")


def test_replicas_starting_together_migrate_once(url: str) -> None:
    """Several processes upgrading one empty database at once (replicas started together): on PostgreSQL each
    would create the same tables but for the advisory lock; all succeed and the schema is current."""
    from concurrent.futures import ThreadPoolExecutor

    stores = [Store(url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def upgrade(store: Store) -> None:
        barrier.wait()
        store.upgrade()

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            list(pool.map(upgrade, stores, timeout=120))  # re-raises any failure; without the lock they deadlock
        assert all(store.is_up_to_date() for store in stores)
        conversation = stores[0].create_conversation()
        assert stores[3].conversation_exists(conversation, "default")
    finally:
        for store in stores:
            store.close()
