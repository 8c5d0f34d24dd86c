"""Alembic environment for the conversation store.

Two ways in:
- programmatic, from ``Store.upgrade()``: the caller passes its own open
  connection in ``config.attributes["connection"]`` and owns its transaction;
- command line: the URL comes from ``-x url=...``, else from ``sqlalchemy.url``
  in ``alembic.ini``; a missing URL fails loudly.

SQLite cannot ALTER most things, so migrations run in batch mode there
(``render_as_batch``), which Alembic turns into copy-and-move on SQLite and
plain ALTERs elsewhere.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from assistant.store_models import Base

config = context.config
target_metadata = Base.metadata
if config.config_file_name is not None:  # the CLI; Store.upgrade() leaves the server's logging alone
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("No database URL: pass -x url=... or set sqlalchemy.url in alembic.ini.")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``) without connecting."""
    url = _url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
