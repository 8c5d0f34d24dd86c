"""Wire the parts together from a Config: store, model, engine thread, server App.

This is the one place that knows every part; each part's constructor takes only
what it uses. Model loading is slow and blocking, so it happens here, before the
event loop starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from assistant.config import Config
from assistant.engine.sampling import SamplingParams
from assistant.images import ImageLimits
from assistant.prompts import load_system_prompt
from assistant.server import App, tls_context
from assistant.session import ImageBudget, Settings
from assistant.store import Store

if TYPE_CHECKING:
    from assistant.engine.model import ChatModel


def build_app(config: Config, progress: Callable[[str], None] = print, model: ChatModel | None = None) -> App:
    """Open (and for SQLite, upgrade) the store, load the model (unless given), start the engine thread."""
    ssl_context = tls_context(config.tls_certfile, config.tls_keyfile) if config.tls_certfile else None
    from assistant.engine.async_engine import AsyncEngine
    from assistant.engine.engine import Engine
    from assistant.engine.loader import load_model

    store = Store(config.database_url)
    url = make_url(config.database_url)
    if url.get_backend_name() == "sqlite":
        store.upgrade()  # the embedded database follows the code; others via `assistant db upgrade`
    elif not store.is_up_to_date():
        store.close()
        raise RuntimeError("the database schema is not at the newest migration; run "
                           "`assistant db upgrade --database-url URL` first")
    progress(f"database {url.render_as_string(hide_password=True)} is ready")
    given = model

    def load() -> ChatModel:
        return given if given is not None else load_model(config, progress=progress)

    # Loaded on the engine's own thread: decoding there runs twice as fast as after loading on this one.
    engine = Engine.start_loaded(load, max_num_running=config.max_running_requests,
                                 max_num_waiting=config.max_waiting_requests, kv_cache_bytes=config.kv_cache_bytes,
                                 prefill_chunk_tokens=config.prefill_chunk_tokens, max_kv_bytes=config.max_kv_bytes)
    model = engine.model
    return App(
        store=store,
        engine=AsyncEngine(engine),
        model_name=config.model,
        defaults=default_settings(config),
        image_budget=image_budget(config, model.num_image_tokens if model.accepts_images else None),
        max_message_bytes=config.max_message_bytes,
        max_connections=config.max_connections,
        send_timeout_s=config.send_timeout,
        ssl_context=ssl_context,
        renders_tools=model.renders_tools,
    )


def close_app(app: App) -> None:
    app.engine.shutdown()
    app.store.close()


def default_settings(config: Config) -> Settings:
    return Settings(
        instructions=load_system_prompt(config.system_prompt_file or None),
        sampling=SamplingParams(temperature=config.temperature, top_p=config.top_p,
                                max_output_tokens=config.max_output_tokens or None,
                                frequency_penalty=config.frequency_penalty, presence_penalty=config.presence_penalty,
                                repetition_penalty=config.repetition_penalty),
    )


def image_budget(config: Config, tokens_per_image: Callable[[str], int] | None) -> ImageBudget:
    limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels,
                         max_images_per_message=config.max_images_per_message)
    return ImageBudget(limits=limits, max_images_per_conversation=config.max_images_per_conversation,
                       max_tokens_per_message=config.max_image_tokens_per_message,
                       max_tokens_per_conversation=config.max_image_tokens_per_conversation,
                       tokens_per_image=tokens_per_image)
