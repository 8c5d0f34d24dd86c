"""Conversations keep the metadata they were created with (Chat Completions' ``store: true`` + ``metadata``);
items can be tool calls and their results (``function_call``: call_id, name, arguments;
``function_call_output``: call_id, output).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


ITEM_COLUMNS = (("call_id", sa.String(64)), ("name", sa.String(64)), ("arguments", sa.Text()),
                ("output", sa.Text()))


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("metadata", sa.JSON(), nullable=True))
    with op.batch_alter_table("items") as batch:
        batch.alter_column("type", type_=sa.String(32), existing_type=sa.String(16), existing_nullable=False)
        for name, kind in ITEM_COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        for name, _ in reversed(ITEM_COLUMNS):
            batch.drop_column(name)
        batch.alter_column("type", type_=sa.String(16), existing_type=sa.String(32), existing_nullable=False)
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("metadata")
