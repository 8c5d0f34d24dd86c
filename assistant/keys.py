"""API keys: each names a tenant, and every conversation belongs to one tenant.

A key is ``sk-asst-`` followed by 43 random URL-safe characters (256 bits). It is
shown once, when created; the database keeps only its SHA-256 (a slow password
hash adds nothing to a 256-bit random secret) and a short prefix, so a person can
tell keys apart in ``assistant keys list`` without the list revealing any key.
A revoked key stays listed (with when it was revoked) and never authenticates again.

:class:`Keys` is a small repository over the store's database engine, used by the
``assistant keys`` commands and, from a worker thread, by the server's
:mod:`assistant.access` gate.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, exists, or_, select, update
from sqlalchemy.orm import sessionmaker

from assistant.storage_faults import storage_faults
from assistant.store import READ_ONLY
from assistant.store_models import MAX_ID_LENGTH, ApiKeyRow, utcnow

KEY_PREFIX = "sk-asst-"
SHOWN_PREFIX_CHARS = 12  # "sk-asst-" and 4 random characters: enough to tell keys apart, useless to guess with
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class KeyInfo:
    """What is stored about a key (never the key itself)."""

    id: str
    tenant: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_tenant(tenant: str) -> str:
    """A tenant name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(f"tenant names are 1-{MAX_ID_LENGTH} letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit); got {tenant!r}")
    return tenant


class Keys:
    """Create, list, revoke and look up keys in the store's database."""

    def __init__(self, engine: Engine) -> None:
        self._write = sessionmaker(engine, expire_on_commit=False)
        self._read = sessionmaker(engine.execution_options(**{READ_ONLY: True}))

    def create(self, tenant: str) -> tuple[KeyInfo, str]:
        """A new key for ``tenant``: what is stored, and the key itself (the only time anyone sees it)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(id="key_" + secrets.token_hex(8), tenant=check_tenant(tenant), secret_sha256=key_sha256(key),
                        prefix=key[:SHOWN_PREFIX_CHARS], created_at=utcnow())
        with self._write.begin() as session:
            session.add(row)
        return _info_of(row), key

    def list(self) -> list[KeyInfo]:
        with self._read.begin() as session:
            return [_info_of(row) for row in session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke the key with this id (or whose shown prefix is this, when only one has it); raises
        KeyError naming what was not found. Revoking a revoked key changes nothing."""
        with self._write.begin() as session:
            rows = list(session.scalars(select(ApiKeyRow).where(
                or_(ApiKeyRow.id == key_id, ApiKeyRow.prefix == key_id))))
            if len(rows) != 1:
                raise KeyError(f"no key {key_id!r}" if not rows else f"{len(rows)} keys start with {key_id!r}; "
                               "give the key id")
            row = rows[0]
            if row.revoked_at is None:
                session.execute(update(ApiKeyRow).where(ApiKeyRow.id == row.id).values(revoked_at=utcnow()))
                session.refresh(row)
            return _info_of(row)

    def tenant_of(self, key: str) -> str | None:
        """The tenant of a valid (known, not revoked) key; None otherwise. Raises StorageUnavailable when the
        database cannot answer."""
        if not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None  # not one of ours: no query
        with storage_faults(), self._read.begin() as session:
            return session.scalar(select(ApiKeyRow.tenant).where(
                ApiKeyRow.secret_sha256 == key_sha256(key), ApiKeyRow.revoked_at.is_(None)))

    def any_active(self) -> bool:
        """Whether at least one key can authenticate (``--auth auto`` then requires keys)."""
        with self._read.begin() as session:
            return bool(session.scalar(select(exists().where(ApiKeyRow.revoked_at.is_(None)))))


def _info_of(row: ApiKeyRow) -> KeyInfo:
    return KeyInfo(row.id, row.tenant, row.prefix, row.created_at, row.revoked_at)
