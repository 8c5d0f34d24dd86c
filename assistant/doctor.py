"""``assistant doctor``: what a bug report needs, in one paste.

Versions, the machine (CPU features that pick the quantized path, memory, GPU), the bitsandbytes
backend, the configured model's files and sizes, the database (URL without its password; migration
state; keys) and the access settings. Every probe is guarded: a broken part is reported, not raised,
since the report is most wanted when something is broken.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy.engine import make_url

from assistant.config import Config, is_loopback

PACKAGES = ("assistant", "torch", "transformers", "bitsandbytes", "peft", "llguidance", "starlette", "uvicorn",
            "websockets", "SQLAlchemy", "alembic", "psycopg", "prometheus_client", "pillow")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "fma", "f16c")


def report(config: Config) -> list[str]:
    """The report's lines."""
    lines: list[str] = []
    for title, section in (("versions", _versions), ("machine", _machine), ("model", lambda: _model(config)),
                           ("database", lambda: _database(config)), ("access", lambda: _access(config))):
        lines.append(f"{title}:")
        lines.extend(f"  {line}" for line in _guarded(section))
    return lines


def _guarded(section: Callable[[], Iterator[str]]) -> Iterator[str]:
    try:
        yield from section()
    except Exception as exc:  # noqa: BLE001  a doctor reports what is broken instead of breaking
        first_line = (str(exc).splitlines() or [""])[0]
        yield f"could not tell: {type(exc).__name__}: {first_line}"


def _versions() -> Iterator[str]:
    yield f"python {platform.python_version()} ({sys.executable})"
    for name in PACKAGES:
        try:
            yield f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            yield f"{name} not installed"


def _machine() -> Iterator[str]:
    yield f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} cores"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo.splitlines() if line.startswith("flags")),
                 set())
    yield f"cpu {model}: " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total = next(line.split()[1] for line in meminfo.read_text().splitlines() if line.startswith("MemTotal"))
        yield f"memory {int(total) / 2**20:.1f} GiB"
    import torch

    cuda = f"available: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "not available"
    yield f"torch threads {torch.get_num_threads()}, cuda {cuda}"
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its note about an optional kernel is noise here
    from bitsandbytes import cextension

    yield f"bitsandbytes backend {cextension.BNB_BACKEND}"


def _model(config: Config) -> Iterator[str]:
    if config.engine == "openai":  # the model lives on the model server: is it there?
        from assistant.engine.remote import upstream_model

        try:
            served = upstream_model(config.engine_url, config.engine_key)
        except RuntimeError as exc:
            yield f"--engine openai at {config.engine_url}: NOT reachable: {exc}"
        else:
            yield f"--engine openai at {config.engine_url}: reachable, serves {served}" + \
                (f"; --engine-model {config.engine_model}" if config.engine_model else "")
        return
    from assistant.engine.loader import pick_device, pick_quantize

    device = pick_device(config.device)
    quantize = pick_quantize(config.quantize, device)
    yield f"--model {config.model}, --quantize {config.quantize} (here: {quantize}), " \
          f"--dtype {config.dtype}, --device {config.device} (here: {device})"
    if quantize == "int4-cpu":
        from assistant.engine import int4_kernel

        yield f"int4-cpu multiplies with {int4_kernel.describe()}"
    yield f"data dir {config.data_dir}"
    models = config.data_dir / "models"
    if not models.is_dir():
        yield "no models pulled yet (`assistant models pull`)"
        return
    for directory in sorted(path for path in models.iterdir() if path.is_dir() and not path.name.startswith(".")):
        files = [path for path in directory.rglob("*") if path.is_file()]
        size = sum(path.stat().st_size for path in files)
        yield f"{directory.name}: {len(files)} files, {size / 2**20:.1f} MiB"


def _database(config: Config) -> Iterator[str]:
    from assistant.keys import Keys
    from assistant.store import Store

    yield f"url {make_url(config.database_url).render_as_string(hide_password=True)}"
    store = Store(config.database_url)
    try:
        if not store.is_up_to_date():
            yield "schema NOT at the newest migration (`assistant db upgrade`; `serve` upgrades SQLite itself)"
            return
        yield "schema at the newest migration"
        keys = Keys(store.engine).list()
        yield f"keys: {sum(not key.is_revoked for key in keys)} active, {sum(key.is_revoked for key in keys)} revoked"
    finally:
        store.close()


def _access(config: Config) -> Iterator[str]:
    where = "loopback only" if is_loopback(config.host) else "reachable from other machines"
    yield f"listens on {config.host}:{config.port} ({where}), --auth {config.auth}, TLS " \
          f"{'on' if config.tls_certfile else 'off'}, allowed origins: {config.allowed_origins or 'own only'}"
