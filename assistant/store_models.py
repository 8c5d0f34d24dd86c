"""The conversation store's tables as SQLAlchemy 2 ORM models.

The Alembic migrations in ``migrations/versions`` create these tables; the
models must match them exactly (``tests/test_store.py`` compares the two with
Alembic's autogenerate). Change a table here and in a new migration together.

Only :mod:`assistant.store` uses these classes; everything outside the store
sees the frozen dataclasses of :mod:`assistant.items` instead.

Invariants:
- timestamps are UTC (timezone-aware columns on PostgreSQL; SQLite stores the
  UTC wall time without an offset);
- ``items.position`` orders a conversation's items; the store keeps positions
  distinct within a conversation (no constraint, so inserts can shift them),
  and deletions leave gaps;
- an image's bytes are stored once per ``sha256``; content parts refer to them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    JSON,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

MAX_ID_LENGTH = 64
DEFAULT_TENANT = "default"  # conversations made without keys, and before keys existed

# Deterministic constraint names, so the migration can name them and autogenerate can compare them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # "metadata" is reserved on declarative classes; the column keeps the API's name.
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    # Whose it is: the tenant of the key that made it ("default" without keys). Another tenant never sees it.
    tenant: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), server_default=DEFAULT_TENANT)

    __table_args__ = (Index("ix_conversations_tenant_created_at", "tenant", "created_at"),)


class ItemRow(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("conversation_id", "item_id"),
        Index("ix_items_conversation_id_position", "conversation_id", "position"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        String(MAX_ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"))
    item_id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH))
    position: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))  # "function_call_output" is 20
    role: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    response_id: Mapped[str | None] = mapped_column(
        String(MAX_ID_LENGTH), ForeignKey("responses.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # function_call and function_call_output items (see assistant.items.Item); NULL for messages.
    call_id: Mapped[str | None] = mapped_column(String(MAX_ID_LENGTH))
    name: Mapped[str | None] = mapped_column(String(MAX_ID_LENGTH))
    arguments: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)

    parts: Mapped[list[PartRow]] = relationship(
        order_by="PartRow.index", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin")


class PartRow(Base):
    __tablename__ = "content_parts"

    item_pk: Mapped[int] = mapped_column(ForeignKey("items.pk", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64), ForeignKey("images.sha256"))
    detail: Mapped[str] = mapped_column(String(16))


class ImageRow(Base):
    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    mime_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    num_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ResponseRow(Base):
    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(
        String(MAX_ID_LENGTH), ForeignKey("conversations.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(255))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    image_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_image_tokens: Mapped[int] = mapped_column(Integer, default=0)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The server process running it and when that process last said so: an in_progress response whose
    # owner is gone is finished as incomplete (server_crash) by whichever server notices first.
    owner: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_responses_status", "status"),)


class ApiKeyRow(Base):
    """A key that names a tenant. Only the key's SHA-256 is kept (keys are 256-bit random: a slow hash adds
    nothing); ``prefix`` lets a person tell keys apart in ``assistant keys list``."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(MAX_ID_LENGTH))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
