"""Config precedence (flag > env > file > default) and loud failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from assistant.cli import build_parser
from assistant.config import DEFAULT_PORT, ConfigError, config_fields, load_config


def test_defaults(tmp_path: Path) -> None:
    config = load_config({}, env={"ASSISTANT_DATA_DIR": str(tmp_path)})
    assert config.port == DEFAULT_PORT and config.host == "127.0.0.1"
    assert config.data_dir == tmp_path
    assert config.database_url == f"sqlite:///{tmp_path / 'assistant.db'}"
    assert config.model == "smollm2-135m-vision" and config.quantize == "auto"  # the vision model, quantized


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "assistant.toml"
    file.write_text('port = 1111\nhost = "0.0.0.0"\ntemperature = 0.5\nquantize = "nf4"\n')
    env = {"ASSISTANT_PORT": "2222", "ASSISTANT_TEMPERATURE": "0.25"}
    config = load_config({"port": "3333"}, env=env, config_file=file)
    assert config.port == 3333  # flag
    assert config.temperature == 0.25  # env over file
    assert config.host == "0.0.0.0" and config.quantize == "nf4"  # file over default
    assert load_config({}, env={**env, "ASSISTANT_CONFIG": str(file)}).port == 2222


@pytest.mark.parametrize("flags, env, message", [
    ({"port": "eighty"}, {}, "--port: port expects int"),
    ({}, {"ASSISTANT_MAX_CONNECTIONS": "1.5"}, "ASSISTANT_MAX_CONNECTIONS"),
    ({"quantize": "fp4"}, {}, "quantize must be one of"),
    ({"temperature": "9"}, {}, "temperature"),
    ({"port": "0"}, {}, "port"),
    ({"engine": "openai"}, {}, "engine openai needs --engine-url"),
    ({"engine": "openai", "engine_url": "localhost:8000/v1"}, {}, "http:// or https://"),
    ({"engine": "vllm"}, {}, "engine must be one of local, openai"),
    ({"engine": "openai", "engine_url": "http://h/v1", "engine_timeout": "0"}, {}, "engine_timeout"),
])
def test_bad_values_fail_loudly(flags: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env=env)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, env={}, config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown keys prot"):
        load_config({}, env={}, config_file=bad)
    typed = tmp_path / "typed.toml"
    typed.write_text("port = 1.5\n")
    with pytest.raises(ConfigError, match="port expects int"):
        load_config({}, env={}, config_file=typed)


def test_serve_help_documents_every_option() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for f in config_fields():
        assert "--" + f.name.replace("_", "-") in text
        assert "ASSISTANT_" + f.name.upper() in text


def test_readme_documents_every_option() -> None:
    from assistant.config import config_table_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert config_table_markdown() in readme, "regenerate the README table: python -m assistant.config"
