"""A remote engine: generation on any server that speaks OpenAI's Chat Completions API (vLLM, TGI, SGLang,
llama.cpp's server, Ollama), behind the same contract as :class:`~assistant.engine.async_engine.AsyncEngine`.

``generate`` turns a :class:`GenerationRequest` into one streamed ``POST {url}/chat/completions``
(:mod:`assistant.engine.remote_wire` writes the body and reads the answer): the conversation, the sampling
parameters, the tools as OpenAI ``tools`` (the upstream renders and parses them: its ``tool_calls`` deltas
come out as :class:`ToolCallDelta`, its text as :class:`TokenDelta`), and a ``response_format``. The stream
ends, as every engine's does, in exactly one :class:`Finished`, with the upstream's usage.

Invariants:

- each request is a task of its own with a connection of its own, so a slow or dead upstream stalls only
  the responses waiting on it; ``abort`` (a cancel, a client that left) cancels the task, which closes the
  connection, and every one of those servers stops generating when its client goes;
- nothing the upstream does raises into the caller: refused, unreachable, timed out (no byte for
  ``timeout`` seconds) or cut off, the request ends in a ``Finished`` with a code of
  :mod:`assistant.errors` (``upstream_unavailable``, ``server_overloaded``, ``context_length_exceeded``,
  ``invalid_prompt``);
- ``grammar`` is not sent (no common API takes one): the upstream holds calls to the tools' schemas,
  and answers to a ``response_format``, itself (vLLM, SGLang, llama.cpp and Ollama do; each needs its own
  tool-call parser switched on). The local engine's image cache and KV reuse do not apply; ``score`` is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

import httpx2 as httpx

from assistant.engine.remote_wire import (IMAGE_TOKENS, ChunkReader, UpstreamError, chat_body, data_url,
                                          error_of_status, image_sha256s)
from assistant.engine.request import (EngineEvent, Finished, GenerationRequest, ImageChunk, ScoreRequest,
                                      TextChunk)
from assistant.engine.scheduler import EngineOverloaded
from assistant.errors import MODEL_ERROR, NOT_SUPPORTED_BY_ENGINE, UPSTREAM_UNAVAILABLE

log = logging.getLogger(__name__)


class RemoteEngine:
    """The engine contract (``generate``, ``score``, ``abort``, ``shutdown``, ``is_running``) over HTTP.

    ``max_num_requests`` bounds the requests in flight; one more is refused with ``server_overloaded``.
    """

    def __init__(self, url: str, model: str, *, api_key: str = "", timeout: float = 60.0,
                 max_num_requests: int = 72) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.max_num_requests = max_num_requests
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._is_stopped = False

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def is_running(self) -> bool:
        return not self._is_stopped

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Stream the request's events, ending with its Finished; closing early aborts it.

        Raises EngineOverloaded (before any event) when ``max_num_requests`` are in flight.
        """
        if self._is_stopped or len(self._running) >= self.max_num_requests:
            raise EngineOverloaded(f"The server is busy ({len(self._running)} responses running); retry later.")
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        task = asyncio.create_task(self._stream(request, queue.put_nowait))
        # Aborted before it started, the task never runs the code that says so: say it for it.
        task.add_done_callback(lambda _: queue.put_nowait(Finished(reason="cancelled")) if task.cancelled() else None)
        self._running[request.request_id] = task
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            task.cancel()  # a no-op once it ended; else the consumer left: the upstream request ends too
            self._running.pop(request.request_id, None)

    async def _stream(self, request: GenerationRequest, emit: Callable[[EngineEvent], None]) -> None:
        """The upstream request; every way it ends is emitted as the one Finished."""
        reader: ChunkReader | None = None
        try:
            content, reader = await asyncio.to_thread(self._prepare, request)
            timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
            async with httpx.AsyncClient(timeout=timeout) as client:
                async with client.stream("POST", f"{self.url}/chat/completions", content=content,
                                         headers={**self._headers, "Content-Type": "application/json"}) as response:
                    if response.status_code != 200:
                        error = error_of_status(response.status_code, await response.aread())
                        log.warning("the model server answered HTTP %d: %s", response.status_code, error.message)
                        emit(error.finished(reader))
                        return
                    async for line in response.aiter_lines():
                        for event in reader.feed(line):
                            emit(event)
                        if reader.is_done:
                            break
            emit(reader.finish())
        except asyncio.CancelledError:
            emit(reader.finished("cancelled") if reader is not None else Finished(reason="cancelled"))
        except UpstreamError as error:
            emit(error.finished(reader))
        except httpx.TimeoutException:
            log.warning("the model server at %s did not answer within %g s", self.url, self.timeout)
            emit(UpstreamError(UPSTREAM_UNAVAILABLE, f"The model server did not answer within {self.timeout:g} "
                               "s; retry later.").finished(reader))
        except httpx.HTTPError as exc:
            log.warning("the model server at %s cannot be reached: %s", self.url, exc)
            emit(UpstreamError(UPSTREAM_UNAVAILABLE, "The model server cannot be reached; retry later.")
                 .finished(reader))
        except Exception:
            log.exception("request %s to the model server failed", request.request_id)
            emit(Finished(reason="error", error="remote engine failure", code=MODEL_ERROR))

    def _prepare(self, request: GenerationRequest) -> tuple[bytes, ChunkReader]:
        """Worker thread: fetch and encode the images (megabytes of base64), serialize the body."""
        sha256s = image_sha256s(request)
        found = request.image_source(sha256s) if sha256s else {}
        missing = [sha256 for sha256 in sha256s if sha256 not in found]
        if missing:
            raise UpstreamError("image_not_found", "An image of the conversation was deleted while the response "
                                "waited; send the request again.")
        body = chat_body(request, self.model, {sha256: data_url(data) for sha256, data in found.items()})
        num_image_tokens = sum(IMAGE_TOKENS[part.detail] for message in request.messages for part in message.parts
                               if isinstance(part, ImageChunk))
        num_chars = sum(len(part.text) for message in request.messages for part in message.parts
                        if isinstance(part, TextChunk))
        return json.dumps(body).encode(), ChunkReader(num_prompt_chars=num_chars, num_image_tokens=num_image_tokens)

    async def score(self, request: ScoreRequest) -> Finished:
        return Finished(reason="error", code=NOT_SUPPORTED_BY_ENGINE,
                        error="image.match scores texts with the in-process model; this server generates with a "
                              "remote engine (--engine openai), which cannot.")

    def abort(self, request_id: str) -> None:
        task = self._running.get(request_id)
        if task is not None:
            task.cancel()

    def shutdown(self) -> None:
        """Refuse new requests; the running ones end as their consumers leave (their tasks are cancelled)."""
        self._is_stopped = True
        for task in list(self._running.values()):
            task.cancel()


def upstream_model(url: str, api_key: str = "", timeout: float = 10.0) -> str:
    """The first model the upstream lists (``GET {url}/models``), for a server started without
    ``--engine-model``. Blocking; raises RuntimeError saying what to do when there is none."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/models", headers=headers, timeout=timeout)
        response.raise_for_status()
        models = response.json().get("data") or []
        return str(models[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise RuntimeError(f"cannot ask the model server at {url} which model it serves ({exc}); "
                           "pass --engine-model NAME") from None
