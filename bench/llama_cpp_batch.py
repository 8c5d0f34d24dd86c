"""llama.cpp decoding several conversations in one ``llama_batch``: what ``bench.llama_cpp`` compares the
assistant's concurrent conversations with. Run by ``bench.llama_cpp`` with the Python of llama-cpp-python's
server environment (``bin/setup-llama-cpp``); it imports nothing of the assistant.

    PYTHON -P bench/llama_cpp_batch.py GGUF THREADS TOKENS QUESTION...

(``-P``: this directory must not come first on the path, where ``llama_cpp.py`` is the benchmark, not the package.)

Each question becomes one sequence (SmolLM2's chat format, as the GGUF's template renders it with its default
system message); all prompts are prefilled in one batch, then every step decodes one token for every sequence
still running, greedy, until it ends or has ``TOKENS`` tokens. Prints one JSON line: tokens generated and the
seconds from the first prefill to the last token.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_prompt(question: str) -> bytes:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n").encode()


def tokenize(vocab: llama_cpp.llama_vocab_p, text: bytes) -> list[int]:
    buffer = (llama_cpp.llama_token * (len(text) + 8))()
    count = llama_cpp.llama_tokenize(vocab, text, len(text), buffer, len(buffer), True, True)
    if count < 0:
        raise SystemExit("tokenizing failed")
    return list(buffer[:count])


def main() -> None:
    gguf, threads, max_tokens, questions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    prompts = [tokenize(vocab, chat_prompt(q)) for q in questions]
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = sum(len(p) for p in prompts) + len(prompts) * (max_tokens + 8)
    params.n_batch = params.n_ubatch = max(512, sum(len(p) for p in prompts))
    params.n_seq_max = len(prompts)
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, len(prompts))

    def run(entries: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        batch.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def pick(index: int) -> int:
        logits = ctypes.cast(llama_cpp.llama_get_logits_ith(ctx, index), ctypes.POINTER(ctypes.c_float))
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    started = time.perf_counter()
    entries, last_rows = [], []
    for sequence, prompt in enumerate(prompts):
        for position, token in enumerate(prompt):
            entries.append((token, position, sequence, position == len(prompt) - 1))
        last_rows.append(len(entries) - 1)
    run(entries)
    running = {sequence: (pick(row), len(prompts[sequence]), 1) for sequence, row in enumerate(last_rows)}
    generated = len(running)
    while running:
        running = {s: state for s, state in running.items()
                   if not llama_cpp.llama_vocab_is_eog(vocab, state[0]) and state[2] < max_tokens}
        if not running:
            break
        order = sorted(running)
        run([(running[s][0], running[s][1], s, True) for s in order])
        running = {s: (pick(i), running[s][1] + 1, running[s][2] + 1) for i, s in enumerate(order)}
        generated += len(order)
    print(json.dumps({"tokens": generated, "seconds": time.perf_counter() - started}))
    llama_cpp.llama_batch_free(batch)


if __name__ == "__main__":
    main()
