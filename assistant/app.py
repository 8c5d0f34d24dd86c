"""Wire the parts together from a Config: store, model, engine thread, server App.

This is the one place that knows every part; each part's constructor takes only
what it uses. Model loading is slow and blocking: ``assistant serve`` opens the App
first (probes answer, everything else is 503 ``model_loading``), then loads the
engine on a thread of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from assistant.access import requires_keys
from assistant.config import Config, origins_of
from assistant.drain import Drain
from assistant.engine.sampling import SamplingParams
from assistant.images import ImageLimits
from assistant.keys import Keys
from assistant.limits import TenantLimits
from assistant.metrics import MeteredEngine
from assistant.peers import Peers
from assistant.prompts import load_system_prompt
from assistant.replay import LiveConversations, ReplayLimits
from assistant.server import App, tls_context
from assistant.session import ImageBudget, Settings
from assistant.store import Store
from assistant.upkeep import recover_at_start

if TYPE_CHECKING:
    from assistant.engine.model import ChatModel


def build_app(config: Config, progress: Callable[[str], None] = print, model: ChatModel | None = None) -> App:
    """The App, ready to serve: :func:`open_app`, then :func:`load_engine` (the model unless given)."""
    app = open_app(config, progress)
    try:
        load_engine(app, config, progress, model)
    except BaseException:
        close_app(app)
        raise
    return app


def open_app(config: Config, progress: Callable[[str], None] = print) -> App:
    """Everything but the model: open (and for SQLite, upgrade) the store, finish what a killed server left in
    progress, decide on keys. The App answers probes while :func:`load_engine` runs; the rest waits for it."""
    ssl_context = tls_context(config.tls_certfile, config.tls_keyfile) if config.tls_certfile else None
    store = Store(config.database_url)
    url = make_url(config.database_url)
    try:
        store.upgrade()  # the schema follows the code; replicas starting together migrate once (store.upgrade)
    except BaseException:
        store.close()
        raise
    recovered = recover_at_start(store)  # before serving: what a killed server left in progress
    if recovered:
        progress(f"finished {recovered} responses a stopped server left in progress (incomplete, server_crash)")
    progress(f"database {url.render_as_string(hide_password=True)} is ready")
    keys = Keys(store.engine)
    has_keys = keys.any_active()
    keys_required = requires_keys(config.auth, config.host, has_keys)
    if not keys_required:
        progress(f"no API key required: only this machine can connect ({config.host}); create a key with "
                 "`assistant keys create --tenant NAME` to require keys")
    elif not has_keys:
        progress("API keys are required but none exists yet: create one with `assistant keys create --tenant NAME`")
    else:
        progress("API keys are required")
    live = LiveConversations(ReplayLimits(max_events=config.replay_max_events, max_bytes=config.replay_max_bytes,
                                          max_total_bytes=config.replay_total_bytes, grace_s=config.resume_grace))
    # Replicas share PostgreSQL: they reach each other's running responses through it (assistant.peers).
    peers = Peers(config.database_url, store.owner, live) if url.get_backend_name() == "postgresql" else None
    return App(
        store=store,
        model_name=config.model,
        defaults=default_settings(config),
        max_message_bytes=config.max_message_bytes,
        max_connections=config.max_connections,
        send_timeout_s=config.send_timeout,
        drain=Drain(config.drain_timeout),
        ssl_context=ssl_context,
        tenant_of=keys.tenant_of if keys_required else None,
        allowed_origins=origins_of(config.allowed_origins),
        limits=tenant_limits(config, keys_required),
        peers=peers,
        live=live,
    )


def load_engine(app: App, config: Config, progress: Callable[[str], None] = print,
                model: ChatModel | None = None) -> None:
    """Load the model (unless given) and start the engine thread; the App is ready once this returns. Blocking.
    With ``--engine openai`` there is no model here: the remote engine stands in for it."""
    if config.engine == "openai" and model is None:
        load_remote_engine(app, config, progress)
        return
    from assistant.engine.async_engine import AsyncEngine
    from assistant.engine.engine import Engine
    from assistant.engine.loader import load_model

    given = model

    def load() -> ChatModel:
        return given if given is not None else load_model(config, progress=progress)

    # Loaded on the engine's own thread: decoding there runs twice as fast as after loading on this one.
    metrics = app.metrics
    engine = Engine.start_loaded(load, max_num_running=config.max_running_requests,
                                 max_num_waiting=config.max_waiting_requests, kv_cache_bytes=config.kv_cache_bytes,
                                 prefill_chunk_tokens=config.prefill_chunk_tokens, max_kv_bytes=config.max_kv_bytes,
                                 on_image_encode=metrics.image_encode.observe)
    loaded = engine.model
    app.image_budget = image_budget(config, loaded.num_image_tokens if loaded.accepts_images else None)
    app.renders_tools = loaded.renders_tools
    scheduler = engine.scheduler  # sizes read when scraped (len() of the engine thread's queues)
    metrics.watch(connections=lambda: app.num_connections, queue_depth=lambda: scheduler.num_waiting,
                  batch_size=lambda: scheduler.num_running)
    async_engine = AsyncEngine(engine, stream_interval_s=config.stream_interval)
    app.engine = MeteredEngine(async_engine, metrics)  # last: from here on the App is ready


def load_remote_engine(app: App, config: Config, progress: Callable[[str], None] = print) -> None:
    """Generation on the model server at ``engine_url``: images go as data URLs (their budgets count an
    estimate of the tokens each costs), tools as OpenAI ``tools``."""
    from assistant.engine.remote import RemoteEngine, upstream_model
    from assistant.engine.remote_wire import IMAGE_TOKENS

    model = config.engine_model or upstream_model(config.engine_url, config.engine_key)
    engine = RemoteEngine(config.engine_url, model, api_key=config.engine_key, timeout=config.engine_timeout,
                          max_num_requests=config.max_running_requests + config.max_waiting_requests)
    app.model_name = model
    app.image_budget = image_budget(config, IMAGE_TOKENS.__getitem__)
    app.renders_tools = True
    app.metrics.watch(connections=lambda: app.num_connections, queue_depth=lambda: 0,
                      batch_size=lambda: engine.num_running)
    progress(f"generating with {model} at {config.engine_url}")
    app.engine = MeteredEngine(engine, app.metrics)  # last: from here on the App is ready


def close_app(app: App) -> None:
    if app.engine is not None:
        app.engine.shutdown()
    app.pending.close()  # the final writes storage refused get a last chance
    app.store.close()


def tenant_limits(config: Config, keys_required: bool) -> TenantLimits:
    """The per-tenant bounds; without keys there is one tenant, which may use the whole server (the totals bound
    it: --max-connections, and the engine's queue, which answers server_overloaded)."""
    if keys_required:
        return TenantLimits(config.max_connections_per_tenant, config.max_responses_per_tenant)
    return TenantLimits(config.max_connections, None)


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
