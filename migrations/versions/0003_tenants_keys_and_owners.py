"""Tenants and keys: every conversation belongs to a tenant (``default`` for those made before keys, and by a
server running without keys); ``api_keys`` holds the hashed keys that name a tenant. Responses record which
server process runs them (``owner``) and when it last said it was alive (``heartbeat_at``), so a restarted
server, or another replica, can finish what a dead one left ``in_progress``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("secret_sha256", name="uq_api_keys_secret_sha256"),
    )
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=False, server_default="default"))
        batch.create_index("ix_conversations_tenant_created_at", ["tenant", "created_at"])
    with op.batch_alter_table("responses") as batch:
        batch.add_column(sa.Column("owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_responses_status", ["status"])


def downgrade() -> None:
    with op.batch_alter_table("responses") as batch:
        batch.drop_index("ix_responses_status")
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_index("ix_conversations_tenant_created_at")
        batch.drop_column("tenant")
    op.drop_table("api_keys")
