"""What a training stage trains, loaded from a composition file, and the loss it minimizes.

- ``align``: encoder and decoder frozen (a LoRA adapter the composition already
  has is applied, frozen); only the projector trains.
- ``finetune``: the projector and a LoRA adapter (``peft``) on every Linear of the
  decoder but ``lm_head``: rank ``lora_rank``, alpha twice the rank, dropout 0.05;
  or the adapter alone (``train_projector=False``: the projector stays as it is).
  A composition that already has an adapter continues training that one. With
  ``quantize="nf4"`` the decoder's base weights are bitsandbytes nf4 (QLoRA); if
  one forward and backward pass on the loaded model fails (bitsandbytes has no
  nf4 backward on some devices, and its packed CPU kernel refuses some layer
  widths), that is reported and the unquantized decoder is trained instead.

A composition whose projector directory does not exist yet gets a fresh
``mlp2x_gelu`` projector (from the seed): that is how alignment starts from
nothing. An EfficientNet-Lite0 projector trained on a narrower feature set than the
composition names (``multiscale`` under ``multiscale-colour``) is widened, the new
inputs at zero weight (:func:`~assistant.engine.vision.widen_projector`): training
goes on from what it learnt. Trainable parameters are float32 whatever the decoder's dtype.

The loss (:meth:`TrainableModel.loss_sum`) projects cached encoder features,
writes them into the image slots with serving's own masked assignment
(:func:`~assistant.engine.model.embed_with_images`), runs the decoder body, and
applies ``lm_head`` only at positions whose next token is labelled, so the
vocabulary-wide logits of the prompt are never computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from assistant.config import Config
from assistant.engine import efficientnet
from assistant.engine.composition import EFFICIENTNET, CompositionSpec, encoder_width, load_vision_part
from assistant.engine.loader import attach_adapter, load_decoder, load_tokenizer, parse_dtype
from assistant.engine.model import ChatModel, embed_with_images
from assistant.engine.vision import ProjectedVision, Projector, add_word_shortcut, load_projector, widen_projector
from assistant.models import resolve_model
from assistant.training.examples import IGNORE_INDEX, TRAIN_DETAIL, Batch
from assistant.training.settings import STAGES

LORA_DROPOUT = 0.05


@dataclass
class TrainableModel:
    chat: ChatModel  # renders sequences; chat.hf_model is the decoder, LoRA layers in place when finetuning
    vision: ProjectedVision  # vision.projector is the trainable projector
    peft_model: Any | None  # the peft wrapper whose adapter finetune trains (None for align)
    quantize: str  # what the decoder's base weights are: "nf4" or "none"

    @property
    def projector(self) -> Projector:
        return self.vision.projector

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that trains, by a stable name (the checkpoint's keys)."""
        named = {f"projector.{name}": p for name, p in self.projector.named_parameters() if p.requires_grad}
        named.update({f"decoder.{name}": p for name, p in self.chat.hf_model.named_parameters() if p.requires_grad})
        return named

    def train(self, mode: bool = True) -> None:
        """Dropout on (LoRA's) for training steps, off for held-out losses."""
        self.chat.hf_model.train(mode)
        self.projector.train(mode)

    def loss_sum(self, batch: Batch, features: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the batch's labelled tokens, and how many there are.

        ``features`` ``(B, T_high, in_dim)``: the encoder features of ``batch.image_sha256s``, in order.
        """
        hf_model, device = self.chat.hf_model, self.chat.device
        image_embeds = self.vision.project(features.to(device), TRAIN_DETAIL).flatten(0, 1)  # (B * T_img, C)
        embeds = embed_with_images(hf_model, batch.token_ids.to(device), batch.image_mask.to(device),
                                   image_embeds)  # (B, T, C)
        hidden = hf_model.get_decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask.to(device),
                                        use_cache=False).last_hidden_state  # (B, T, C)
        targets = batch.labels[:, 1:].to(device)  # (B, T - 1): position t predicts token t + 1
        is_labelled = targets != IGNORE_INDEX  # (B, T - 1)
        logits = hf_model.get_output_embeddings()(hidden[:, :-1][is_labelled])  # (K, vocab)
        total = F.cross_entropy(logits.float(), targets[is_labelled], reduction="sum")
        return total, int(is_labelled.sum())


def load_trainable(spec: CompositionSpec, *, stage: str, config: Config, device: str, dtype: str, seed: int,
                   lora_rank: int = 8, quantize: str = "none", train_projector: bool = True,
                   report: Callable[[str], None] = print) -> TrainableModel:
    """The composition's parts set up for ``stage`` (see the module docstring) on ``device``; with
    ``train_projector`` false (finetune only), the projector stays as it is and the adapter alone trains."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    torch.manual_seed(seed)  # a fresh projector and fresh LoRA weights come from the seed
    decoder = resolve_model(spec.decoder, config.data_dir, report)  # the built-in decoder name is pulled
    if spec.projector.is_dir():
        projector = load_projector(spec.projector)
        width = encoder_width(spec)
        if projector.in_dim < width and spec.encoder == EFFICIENTNET:
            report(f"the projector takes {projector.in_dim} features, {spec.features} gives {width}: widening it, "
                   f"the {width - projector.in_dim} new inputs start at zero weight")
            projector = widen_projector(projector, width)
    else:
        report(f"no projector at {spec.projector} yet: starting a fresh one")
        projector = Projector("mlp2x_gelu", encoder_width(spec), _decoder_width(decoder))
    vision = load_vision_part(spec, data_dir=config.data_dir, device=device, projector=projector,
                              progress=report)  # float32: features are cached once, at full precision
    projector.float().requires_grad_(train_projector or stage == "align")
    tokenizer = load_tokenizer(decoder)
    if stage == "finetune" and quantize == "nf4":
        try:
            trainable = _with_decoder(spec, decoder, stage, vision, tokenizer, device=device, dtype=dtype,
                                      quantize="nf4", lora_rank=lora_rank, report=report)
            _try_one_step(trainable)
            return trainable
        except (RuntimeError, NotImplementedError, AssertionError, ValueError) as exc:
            report(f"warning: bitsandbytes nf4 cannot train here ({type(exc).__name__}: {exc}); training the "
                   f"LoRA adapter on the unquantized decoder instead")
            torch.manual_seed(seed)
    return _with_decoder(spec, decoder, stage, vision, tokenizer, device=device, dtype=dtype, quantize="none",
                         lora_rank=lora_rank, report=report)


def needs_colour_words(spec: CompositionSpec, trainable: TrainableModel) -> bool:
    """Whether :func:`add_colour_words` has something to do: colour histograms read by a projector without a
    shortcut (a fresh one, one widened to them, or one trained before shortcuts existed)."""
    return (spec.encoder == EFFICIENTNET and spec.features == "multiscale-colour"
            and not trainable.projector.shortcut_dim)


def add_colour_words(trainable: TrainableModel, features: torch.Tensor, report: Callable[[str], None]) -> None:
    """Give the projector a word shortcut from EfficientNet-Lite0's colour histograms (the last features): each hue
    channel's weights start in the direction of the decoder's embedding of its colour's name
    (efficientnet.HUE_WORDS; a word of several tokens, their mean), so a cell all of one hue adds that word; the
    brightness channels' weights start at zero. Backgrounds and scans are mostly grey: with "black", "grey" and
    "white" on their channels too, every cell of every image got a word, and after 240 steps the default model
    read handwritten digits worse (79 % against 88.5 %) and places far worse (39 % against 65 %).

    The length: the median norm of the projector's output tokens on ``features`` (some training images'). The
    decoder normalizes each token before reading it, so a word at the length of a text embedding (~3) would be
    lost in image tokens that are a hundred times longer; at their length, a cell all of one colour gets its word
    about as strongly as everything else the projector gives it.
    """
    chat = trainable.chat
    embeddings = chat.hf_model.get_input_embeddings().weight.detach().float()
    hues = torch.stack([embeddings[chat.tokenizer.encode(word, add_special_tokens=False)].mean(dim=0)
                        for word in efficientnet.HUE_WORDS])
    projector = trainable.projector
    with torch.no_grad():
        length = float(projector(features.to(next(projector.parameters()))).norm(dim=-1).median())
    report(f"adding a shortcut from the {efficientnet.COLOUR_FEATURES} colour channels to the projector's output, "
           f"the hues' starting at the decoder's embeddings of {', '.join(dict.fromkeys(efficientnet.HUE_WORDS))} "
           f"(length {length:.0f})")
    words = torch.cat([hues / hues.norm(dim=-1, keepdim=True) * length,
                       hues.new_zeros(efficientnet.VALUE_BINS, hues.shape[1])])
    trainable.vision.projector = add_word_shortcut(projector, words, efficientnet.COLOUR_SCALE).requires_grad_(True)


def _with_decoder(spec: CompositionSpec, decoder: str, stage: str, vision: ProjectedVision, tokenizer: Any, *,
                  device: str, dtype: str, quantize: str, lora_rank: int,
                  report: Callable[[str], None]) -> TrainableModel:
    """``decoder``: where the spec's decoder is (:func:`~assistant.models.resolve_model`)."""
    from transformers import AutoModelForCausalLM

    report(f"loading {spec.decoder} ({dtype}{', nf4' if quantize == 'nf4' else ''}) on {device}")
    hf_model = load_decoder(AutoModelForCausalLM, decoder, dtype=parse_dtype(dtype), device=device,
                            quantize=quantize)
    if quantize == "nf4":
        _keep_nf4_differentiable(hf_model)
    peft_model = None
    if stage == "align":
        if spec.adapter is not None:
            hf_model = attach_adapter(hf_model, spec.adapter, merge=quantize == "none")
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        if spec.adapter is not None:
            peft_model = PeftModel.from_pretrained(hf_model, str(spec.adapter), is_trainable=True)
            if peft_model.peft_config["default"].r != lora_rank:
                report(f"continuing the adapter in {spec.adapter} (rank {peft_model.peft_config['default'].r}); "
                       f"--lora-rank {lora_rank} is not used")
        else:
            lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=LORA_DROPOUT,
                              target_modules="all-linear", task_type="CAUSAL_LM")
            peft_model = get_peft_model(hf_model, lora)
        hf_model = peft_model.get_base_model()  # the LoRA layers sit inside it; peft_model saves them
    # No lean decode step: it takes a snapshot of the adapter's weights, which training changes.
    return TrainableModel(ChatModel(hf_model, tokenizer, vision=vision, fast_decode=False), vision, peft_model,
                          quantize)


def _keep_nf4_differentiable(hf_model: nn.Module) -> None:
    """Keep bitsandbytes' nf4 layers off its packed CPU kernel, which has no backward.

    bitsandbytes (0.50) moves an nf4 layer on an AVX512-BF16 CPU to that kernel for
    good at its first eval-mode forward without gradients (a held-out loss); from
    then on gradients through the layer would be silently wrong (torch only warns
    that ``gemv_4bit`` has no autograd kernel).
    """
    import bitsandbytes as bnb

    for module in hf_model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _try_one_step(trainable: TrainableModel) -> None:
    """One forward and backward pass through the decoder, whose gradient must reach the input embeddings finite
    and non-zero (no optimizer step, no dropout, gradients cleared)."""
    hf_model = trainable.chat.hf_model
    hf_model.eval()
    ids = torch.ones((1, 8), dtype=torch.long, device=trainable.chat.device)  # (1, 8)
    embeds = hf_model.get_input_embeddings()(ids).detach().requires_grad_(True)  # (1, 8, C)
    hf_model(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()
    hf_model.zero_grad(set_to_none=True)
    grad = embeds.grad
    if grad is None or not bool(torch.isfinite(grad).all()) or not bool(grad.abs().sum() > 0):
        raise RuntimeError("the gradient does not pass through the quantized layers")


def _decoder_width(decoder: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(decoder).get_text_config().hidden_size)
