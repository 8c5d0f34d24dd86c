"""bitsandbytes quantization of the decoder; the vision tower and projector stay as they are.

``llm_int8_skip_modules`` entries must be FULL module paths. transformers
(5.24, ``should_convert_module``) skips a Linear when an entry matches its name
from the start up to a dot boundary, as a regex, or as a suffix of the name. A
bare ``"vision_tower"`` is a suffix only of the container module
``model.vision_tower``, never of the Linear layers inside it
(``model.vision_tower.encoder.layers.0.self_attn.q_proj``), so it silently
quantizes the whole tower. The paths in ``LlavaForConditionalGeneration``
(transformers 5.x), from ``named_modules()``::

    model.vision_tower            CLIPVisionModel / SiglipVisionModel   (skip)
    model.multi_modal_projector   LlavaMultiModalProjector              (skip)
    model.language_model          LlamaModel ...                        (quantized)
    lm_head                       Linear                                (skip)

Passing ``skip_modules`` replaces transformers' own default list (tied and
output embeddings), so ``lm_head`` must be named explicitly.

On a CPU with AVX512-BF16, bitsandbytes (0.50, ``Linear4bit.forward``) runs nf4
layers through a packed kernel that asserts, on the first forward, that each
layer's output width is a multiple of 32 and its input width even
(``_convert_weight_packed_for_cpu``). :func:`check_packed_cpu_widths` refuses
such a model when it is loaded, naming the layers, instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

QUANTIZE_KINDS: tuple[str, ...] = ("nf4", "int8", "int8-cpu", "int4-cpu", "none")
LLAVA_SKIP_MODULES: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
CAUSAL_LM_SKIP_MODULES: tuple[str, ...] = ("lm_head",)
PACKED_CPU_BLOCK_N = 32  # output rows per block of bitsandbytes' packed CPU nf4 kernel


def skip_modules_for(config: Any) -> list[str]:
    """The full paths to keep unquantized for a model config: LLaVA's vision half and lm_head, else lm_head."""
    if getattr(config, "vision_config", None) is not None:
        return list(LLAVA_SKIP_MODULES)
    return list(CAUSAL_LM_SKIP_MODULES)


def quantization_config(kind: str, *, skip_modules: list[str],
                        compute_dtype: torch.dtype = torch.bfloat16) -> BitsAndBytesConfig | None:
    """The ``quantization_config`` to pass to ``from_pretrained``; None for "none", "int8-cpu" and "int4-cpu"
    (not bitsandbytes: :mod:`assistant.engine.int8_cpu` / :mod:`~assistant.engine.int4_cpu` convert the loaded
    model)."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_KINDS)}, got {kind!r}")
    if kind in ("none", "int8-cpu", "int4-cpu"):
        return None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))


def quantized_modules(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Names of bitsandbytes layers at or under any of ``prefixes`` (full paths); empty when the skip worked."""
    import bitsandbytes as bnb

    quantized_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, module in model.named_modules()
            if isinstance(module, quantized_types)
            and any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)]


def cpu_packs_nf4() -> bool:
    """Whether bitsandbytes runs nf4 layers on this CPU through its packed kernel (the CPU has AVX512-BF16)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def check_packed_cpu_widths(model: nn.Module, *, is_packed: bool) -> None:
    """Raise a RuntimeError naming the nf4 layers the packed CPU kernel cannot run, when ``is_packed``."""
    if not is_packed:
        return
    import bitsandbytes as bnb

    misfits = [f"{name} (in {module.in_features}, out {module.out_features})"
               for name, module in model.named_modules()
               if isinstance(module, bnb.nn.Linear4bit)
               and (module.out_features % PACKED_CPU_BLOCK_N or module.in_features % 2)]
    if misfits:
        raise RuntimeError(f"bitsandbytes' nf4 kernel for this CPU (AVX512-BF16) needs every quantized layer's "
                           f"output width to be a multiple of {PACKED_CPU_BLOCK_N} and its input width even; "
                           f"{len(misfits)} layers are not, e.g. {', '.join(misfits[:3])}. Use --quantize none, "
                           f"or a model whose layer widths are multiples of {PACKED_CPU_BLOCK_N}")
