"""Initial schema: conversations, items, content parts, images, responses.

Revision ID: 0001
Revises:
Create Date: 2025-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(64)
SHA256 = sa.String(64)
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", ID, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
    )
    op.create_table(
        "images",
        sa.Column("sha256", SHA256, nullable=False),
        sa.Column("mime_type", sa.String(64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("num_bytes", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_images"),
    )
    op.create_table(
        "responses",
        sa.Column("id", ID, nullable=False),
        sa.Column("conversation_id", ID, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("image_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_image_tokens", sa.Integer(), nullable=False),
        sa.Column("time_to_first_token_ms", sa.Float(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"],
                                name="fk_responses_conversation_id_conversations", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_responses"),
    )
    op.create_table(
        "items",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("conversation_id", ID, nullable=False),
        sa.Column("item_id", ID, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("response_id", ID, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"],
                                name="fk_items_conversation_id_conversations", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["response_id"], ["responses.id"],
                                name="fk_items_response_id_responses", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("pk", name="pk_items"),
        sa.UniqueConstraint("conversation_id", "item_id", name="uq_items_conversation_id_item_id"),
    )
    op.create_index("ix_items_conversation_id_position", "items", ["conversation_id", "position"])
    op.create_table(
        "content_parts",
        sa.Column("item_pk", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("image_sha256", SHA256, nullable=True),
        sa.Column("detail", sa.String(16), nullable=False),
        sa.ForeignKeyConstraint(["item_pk"], ["items.pk"],
                                name="fk_content_parts_item_pk_items", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_sha256"], ["images.sha256"],
                                name="fk_content_parts_image_sha256_images"),
        sa.PrimaryKeyConstraint("item_pk", "index", name="pk_content_parts"),
    )


def downgrade() -> None:
    op.drop_table("content_parts")
    op.drop_index("ix_items_conversation_id_position", table_name="items")
    op.drop_table("items")
    op.drop_table("responses")
    op.drop_table("images")
    op.drop_table("conversations")
