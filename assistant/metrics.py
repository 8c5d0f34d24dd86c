"""Prometheus metrics (``GET /metrics``), in a registry of the App's own.

What is measured, and where:

- the generation stream, by :class:`MeteredEngine`, a wrapper around the engine that both the Realtime
  responses and the HTTP API go through: time to first token (from the request to its first token), the
  gaps between tokens, tokens in and out, reused KV-prefix and cached image tokens, and every finished
  response by its final status;
- image encoding, by the engine thread (its ``on_image_encode`` hook);
- open connections, queue depth and running batch size, read when scraped.

Labels never carry a tenant, a conversation or any other client data.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from assistant.engine.request import EngineEvent, Finished, GenerationRequest, TokenDelta, ToolCallDelta

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STATUS_OF_REASON = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled", "error": "failed"}


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.connections = Gauge("assistant_open_connections", "Open Realtime WebSocket connections.",
                                 registry=registry)
        self.queue_depth = Gauge("assistant_queue_depth", "Requests waiting for the engine.", registry=registry)
        self.batch_size = Gauge("assistant_running_batch_size", "Sequences the engine is running.", registry=registry)
        self.responses = Counter("assistant_responses", "Generations (Realtime responses and chat completions) by "
                                 "final status.", ["status"], registry=registry)
        self.time_to_first_token = Histogram("assistant_time_to_first_token_seconds", "From a generation's "
                                             "request to its first token.", buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("assistant_inter_token_latency_seconds", "Gap between consecutive "
                                             "tokens of a generation.", buckets=LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("assistant_tokens", "Prompt (input) and generated (output) tokens.", ["direction"],
                              registry=registry)
        self.cached_tokens = Counter("assistant_kv_cache_hit_tokens", "Prompt tokens not computed again: a reused "
                                     "KV prefix or cached image embeddings.", registry=registry)
        self.image_tokens = Counter("assistant_image_tokens", "Image tokens in prompts, by whether their "
                                    "embeddings came from the image cache (or a reused prefix).", ["cached"],
                                    registry=registry)
        self.image_encode = Histogram("assistant_image_encode_seconds", "Time to encode the images of one prompt "
                                      "(cache misses).", buckets=LATENCY_BUCKETS, registry=registry)

    def watch(self, *, connections: Callable[[], int], queue_depth: Callable[[], int],
              batch_size: Callable[[], int]) -> None:
        """Gauges read when scraped."""
        self.connections.set_function(connections)
        self.queue_depth.set_function(queue_depth)
        self.batch_size.set_function(batch_size)

    def observe_finished(self, finished: Finished) -> None:
        self.responses.labels(STATUS_OF_REASON.get(finished.reason, "failed")).inc()
        self.tokens.labels("input").inc(finished.num_prompt_tokens)
        self.tokens.labels("output").inc(finished.num_output_tokens)
        self.cached_tokens.inc(finished.num_cached_tokens)
        self.image_tokens.labels("true").inc(finished.num_cached_image_tokens)
        self.image_tokens.labels("false").inc(finished.num_image_tokens - finished.num_cached_image_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MeteredEngine:
    """The async engine, measured on the way through; everything but ``generate`` is the engine's own."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:  # inner: AsyncEngine
        self.inner = inner
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        started = last = time.perf_counter()
        is_first = True
        async with contextlib.aclosing(self.inner.generate(request)) as events:  # closing early aborts at once
            async for event in events:
                if isinstance(event, TokenDelta | ToolCallDelta):
                    now = time.perf_counter()
                    if is_first:
                        self.metrics.time_to_first_token.observe(now - started)
                    else:  # a delta holds the tokens since the last text (an unfinished character waits)
                        for _ in range(event.num_tokens):
                            self.metrics.inter_token_latency.observe((now - last) / event.num_tokens)
                    is_first, last = False, now
                elif isinstance(event, Finished):
                    self.metrics.observe_finished(event)
                yield event
