"""The command line: `assistant db upgrade` on any URL, and config errors that exit cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from assistant.cli import main
from assistant.store import Store
from tests.test_store import url  # noqa: F401  (the SQLite + PostgreSQL database fixture)


def test_db_upgrade_on_any_url(url: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert main(["db", "upgrade", "--database-url", url]) == 0
    assert "up to date" in capsys.readouterr().out
    store = Store(url)
    try:
        assert store.is_up_to_date()
        conversation_id = store.create_conversation()
        assert store.conversation_exists(conversation_id)
    finally:
        store.close()
    assert main(["db", "upgrade", "--database-url", url]) == 0  # idempotent


def test_configuration_error_exits_with_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "not-a-port", "--data-dir", str(tmp_path)]) == 2
    assert "port expects int" in capsys.readouterr().err


def test_serve_refuses_a_database_that_was_never_upgraded(tmp_path: Path, url: str) -> None:  # noqa: F811
    if url.startswith("sqlite"):
        pytest.skip("SQLite is upgraded by serve itself")
    from assistant.app import build_app
    from assistant.config import load_config

    config = load_config({"database_url": url, "data_dir": str(tmp_path), "model": str(tmp_path / "unused")}, env={})
    with pytest.raises(RuntimeError, match="assistant db upgrade"):
        build_app(config, progress=lambda _: None)
