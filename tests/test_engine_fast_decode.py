"""The lean decode step computes what transformers' forward computes, on the engine's batches and caches."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from assistant.engine.batch import DecodeBatch
from assistant.engine.engine import Engine
from assistant.engine.fast_decode import FastDecoder
from assistant.engine.loader import load_chat_model
from assistant.engine.model import ChatModel
from assistant.engine.request import Finished
from tests.engine_fixtures import save_tiny_chat_model, user
from tests import test_engine_batch as batch_tests
from tests.test_engine_batch import PROMPTS, rounds_inputs


@pytest.fixture(scope="module", params=["none", "int8-cpu", "int4-cpu"])
def model(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ChatModel:
    """The tiny model in float32 at a width where q/k/v and gate/up fuse in every kind (heads of 32)."""
    source = save_tiny_chat_model(tmp_path_factory.mktemp("tiny"), hidden_size=128)
    return load_chat_model(str(source), dtype="float32", quantize=request.param)


def prompt_of(model: ChatModel, text: str) -> object:
    return model.render((user(text),), model.max_context_tokens)


def test_it_applies_to_the_tiny_llama_in_every_cpu_kind(model: ChatModel) -> None:
    assert model.fast_decoder is not None
    layer = model.fast_decoder.layers[0]
    assert layer.qkv.kind is not None and layer.gate_up.kind is not None  # fused into one product each


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor, *, bfloat16_inputs: bool) -> None:
    """The same up to float32 rounding; or, where every product's input is rounded to bfloat16 (int4-cpu), up
    to a step of an input here and there: a float32 difference in the last bit (the lean step attends and adds
    the adapter in another order) can round an input to the neighbouring bfloat16 value, or on the project's
    int4 kernel to the neighbouring int8 step of its group, and the tiny model's logits then differ by up to
    0.15 in a row (measured; 0.03 on CPUs with AMX on PyTorch's kernel), the change carried on in the cache.
    One such step in the output head's input moves every logit of the row a little: by 0.054 on average
    (measured on an Intel CPU with AMX, the caches still equal). A mistake in what is computed moves them all,
    far: unrelated rows differ by about 2 on average."""
    if not bfloat16_inputs:
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
        return
    torch.testing.assert_close(got, expected, atol=0.3, rtol=0.05)
    assert float((got - expected).abs().mean()) < 0.15


def decode_prompts(model: ChatModel, steps: int,
                   feed: list[list[int]] | None = None) -> tuple[DecodeBatch, list[torch.Tensor], list[list[int]]]:
    """PROMPTS prefilled into one batch (different lengths: rows are left-padded), then ``steps`` decode steps fed
    ``feed[step]`` where given, else each step's greedy tokens: (the batch, each step's logits, the tokens fed).
    Feeding one run's tokens to another keeps a near tie from sending them apart."""
    batch = DecodeBatch(model, has_images=False)
    tokens = []
    for text in PROMPTS:
        logits, cache = model.prefill(prompt_of(model, text))
        batch.add(object(), cache)
        tokens.append(int(logits.argmax()))
    per_step, fed = [], []
    for step in range(steps):
        if feed is not None:
            tokens = feed[step]
        fed.append(tokens)
        logits = batch.step(tokens)
        per_step.append(logits)
        tokens = logits.argmax(-1).tolist()
    return batch, per_step, fed


def test_a_batch_step_gives_transformers_logits_for_every_row_padded_or_not(model: ChatModel) -> None:
    with mock.patch.object(model, "fast_decoder", None):
        slow_batch, slow_steps, fed = decode_prompts(model, 6)
    fast_batch, fast_steps, _ = decode_prompts(model, 6, feed=fed)
    assert_same_run((fast_batch, fast_steps), (slow_batch, slow_steps), bfloat16_inputs=rounds_inputs(model))


def assert_same_run(mine: tuple[DecodeBatch, list[torch.Tensor]], theirs: tuple[DecodeBatch, list[torch.Tensor]],
                    *, bfloat16_inputs: bool) -> None:
    """Two :func:`decode_prompts` runs: the same logits at every step and the same caches at the end."""
    for got, expected in zip(mine[1], theirs[1], strict=True):
        assert got.shape == expected.shape
        assert_same_logits(got, expected, bfloat16_inputs=bfloat16_inputs)
    for got_layer, expected_layer in zip(mine[0].cache.layers, theirs[0].cache.layers, strict=True):
        assert_same_cache(got_layer, expected_layer, bfloat16_inputs=bfloat16_inputs)


def assert_same_cache(mine: object, theirs: object, *, bfloat16_inputs: bool) -> None:
    """Keys and values the same up to float32 rounding, or (int4-cpu) up to the rounding of an input to its
    neighbouring step here and there, as in :func:`assert_same_logits`: one value in 16k off by up to 0.13
    (measured on an Intel CPU with AMX, on the project's kernel), the mean difference far below 3e-3."""
    for name in ("keys", "values"):
        got, expected = getattr(mine, name).float(), getattr(theirs, name).float()
        if not bfloat16_inputs:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            continue
        torch.testing.assert_close(got, expected, atol=0.2, rtol=0.05)
        assert float((got - expected).abs().mean()) < 3e-3


def test_decoding_one_sequence_gives_transformers_logits_and_an_exact_length_cache(model: ChatModel) -> None:
    prompt = prompt_of(model, PROMPTS[0])
    logits, fast_cache = model.prefill(prompt)
    _, slow_cache = model.prefill(prompt)
    token = int(logits.argmax())
    for _ in range(4):
        got = model.decode(token, fast_cache, has_images=False)
        with mock.patch.object(model, "fast_decoder", None):
            expected = model.decode(token, slow_cache, has_images=False)
        assert_same_logits(got, expected, bfloat16_inputs=rounds_inputs(model))
        token = int(expected.argmax())
    keys = fast_cache.layers[0].keys
    assert keys.is_contiguous() and keys.shape[-2] == fast_cache.get_seq_length()  # no spare room kept


def test_a_decoding_batch_appends_in_place_into_room_it_reserved(model: ChatModel) -> None:
    batch = DecodeBatch(model, has_images=False)
    logits, cache = model.prefill(prompt_of(model, PROMPTS[1]))
    batch.add(object(), cache)
    token = int(logits.argmax())
    token = int(batch.step([token])[0].argmax())
    first = batch.cache.layers[0].keys.data_ptr()
    for _ in range(5):
        token = int(batch.step([token])[0].argmax())
    assert batch.cache.layers[0].keys.data_ptr() == first  # the same buffer: no copy of the whole cache per step
    assert batch.cache.get_seq_length() == batch.lengths[0]


def answers(model: ChatModel) -> dict[str, str]:
    """Four greedy requests of different lengths through one engine, joining together and leaving apart."""
    requests = [batch_tests.request(f"r{i}", (user(prompt),), tokens)
                for i, (prompt, tokens) in enumerate(zip(PROMPTS, [12, 3, 20, 7], strict=True))]
    events = batch_tests.staggered(Engine(model, max_num_running=4), requests, arrivals=[0, 0, 0, 0])
    assert all(isinstance(evs[-1], Finished) for evs in events.values())
    return {request_id: batch_tests.text(evs) for request_id, evs in events.items()}


def test_the_engine_answers_as_with_transformers_forward(model: ChatModel) -> None:
    fast_answers = answers(model)
    with mock.patch.object(model, "fast_decoder", None):
        slow_answers = answers(model)
    assert fast_answers == slow_answers


def test_it_does_not_apply_where_it_would_compute_something_else() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu")
    assert FastDecoder.for_model(LlamaForCausalLM(config)) is None
    wrapped = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2))
    wrapped.model.layers[0].mlp.down_proj = torch.nn.Sequential(wrapped.model.layers[0].mlp.down_proj)
    assert FastDecoder.for_model(wrapped) is None


@pytest.mark.parametrize("kind", ["none", "int8-cpu", "int4-cpu"])
def test_a_lora_adapter_runs_in_the_lean_step_switched_on_and_off(tmp_path_factory: pytest.TempPathFactory,
                                                                  kind: str) -> None:
    """As the image adapter of a vision model: on for sequences with images, off for the others."""
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache

    from assistant.engine.loader import attach_adapter, convert_on_cpu
    from assistant.engine.model import lora_layers

    directory = tmp_path_factory.mktemp("lora")
    source = save_tiny_chat_model(directory / "tiny", hidden_size=128)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(load_chat_model(str(source), dtype="float32").hf_model,
                                LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing would prove nothing
                parameter.normal_(0.0, 0.2)
    peft_model.save_pretrained(directory / "adapter")
    hf_model = attach_adapter(load_chat_model(str(source), dtype="float32").hf_model, directory / "adapter",
                              merge=False)
    convert_on_cpu(hf_model, kind, torch.float32)
    fast = FastDecoder.for_model(hf_model)
    assert fast is not None and fast.runs_adapter
    from assistant.engine import int4_kernel

    if kind == "int4-cpu" and int4_kernel.available():
        assert fast._native is not None  # the native layer loop, adapter included
    torch.manual_seed(0)
    prompt = torch.randint(0, hf_model.config.vocab_size, (2, 9))
    token = torch.randint(0, hf_model.config.vocab_size, (2, 1))
    positions = torch.full((2, 1), 9)
    differences = []
    for on in (True, False):
        for layer in lora_layers(hf_model):
            layer.enable_adapters(on)
        caches = [DynamicCache(config=hf_model.config) for _ in range(2)]
        with torch.inference_mode():
            for cache in caches:
                hf_model(input_ids=prompt, cache=cache, use_cache=True)
            expected = hf_model(input_ids=token, position_ids=positions, cache=caches[0],
                                use_cache=True).logits[:, -1].float()
        got = fast.step(token, positions, None, caches[1], adapter=on)
        assert_same_logits(got, expected, bfloat16_inputs=kind == "int4-cpu")
        differences.append(got)
    assert not torch.allclose(differences[0], differences[1], atol=1e-2)  # the adapter does change the answer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_native_layer_loop_computes_what_the_python_loop_computes(
        tmp_path_factory: pytest.TempPathFactory, dtype: str) -> None:
    """int4-cpu on the project's kernel runs the layers in one call (int4_kernel.cpp, decode_layers): the same
    operations in the same order but for attention (float32 throughout, summed in another order), so the same
    logits and caches up to float32 rounding, padded rows included; with a bfloat16 model, up to a bfloat16
    step of an input here and there, as in the test above."""
    from assistant.engine import int4_kernel

    if not int4_kernel.available():
        pytest.skip("the int4 kernel needs AVX512-VNNI and a compiler")
    source = save_tiny_chat_model(tmp_path_factory.mktemp("tiny"), hidden_size=128)
    model = load_chat_model(str(source), dtype=dtype, quantize="int4-cpu")
    fast = model.fast_decoder
    assert fast is not None and fast._native is not None
    with mock.patch.object(fast, "_native", None):
        python_batch, python_steps, fed = decode_prompts(model, 5)
    native_batch, native_steps, _ = decode_prompts(model, 5, feed=fed)
    assert_same_run((native_batch, native_steps), (python_batch, python_steps), bfloat16_inputs=True)


def native_int4_model(tmp_path_factory: pytest.TempPathFactory, dtype: str) -> ChatModel:
    """The tiny model (heads of 32) on int4-cpu with the project's kernel, whose layers run in decode_layers."""
    from assistant.engine import int4_kernel

    if not int4_kernel.available():
        pytest.skip("the int4 kernel needs AVX512-VNNI and a compiler")
    source = save_tiny_chat_model(tmp_path_factory.mktemp("tiny"), hidden_size=128)
    model = load_chat_model(str(source), dtype=dtype, quantize="int4-cpu")
    assert model.fast_decoder is not None and model.fast_decoder._native is not None
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_native_layers_give_a_padded_row_exactly_its_logits_alone(tmp_path_factory: pytest.TempPathFactory,
                                                                      dtype: str) -> None:
    """A row's step does not depend on the other rows: its products are the same instructions whatever the batch,
    and attention skips its left padding (summing its own positions in the same order and blocks as alone), so a
    row padded in a batch of three gets, bit for bit, the logits it gets alone, step after step: a near tie cannot
    part a batched answer from the unbatched one."""
    model = native_int4_model(tmp_path_factory, dtype)
    _, batched, fed = decode_prompts(model, 5)
    for row, text in enumerate(PROMPTS):
        alone = DecodeBatch(model, has_images=False)
        alone.add(object(), model.prefill(prompt_of(model, text))[1])
        for step in range(5):
            assert torch.equal(alone.step([fed[step][row]])[0], batched[step][row]), (row, step)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_layers_in_one_parallel_region_compute_what_the_loop_of_layers_computes(
        tmp_path_factory: pytest.TempPathFactory, dtype: str) -> None:
    """decode_layers runs the layers in one parallel region, its phases shared by the threads, where it applies, and
    as a loop of kernel and ATen calls where it does not (an adapter on: here one of no layer at all, so both compute
    the same thing): the same logits and caches, bit for bit (the SiLU and sums written out round as ATen's do)."""
    model = native_int4_model(tmp_path_factory, dtype)
    fast = model.fast_decoder
    assert fast is not None and fast.runs_adapter  # no adapter: every (no) LoRA layer is taken in
    step = fast.step
    with mock.patch.object(fast, "step", lambda *args, **kwargs: step(*args, **{**kwargs, "adapter": True})):
        loop_batch, loop_steps, fed = decode_prompts(model, 5)
    together_batch, together_steps, _ = decode_prompts(model, 5, feed=fed)
    for together, loop in zip(together_steps, loop_steps, strict=True):
        assert torch.equal(together, loop)
    for together_layer, loop_layer in zip(together_batch.cache.layers, loop_batch.cache.layers, strict=True):
        assert torch.equal(together_layer.keys, loop_layer.keys)
        assert torch.equal(together_layer.values, loop_layer.values)
