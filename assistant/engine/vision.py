"""The vision side: images in, decoder-width image embeddings out.

A :class:`VisionPart` is an image encoder plus the projector that maps its
features to the decoder's embedding width. It is always unquantized, in eval
mode and run without gradients (training, :mod:`assistant.training`, makes the
projector of a :class:`ProjectedVision` trainable). The model renders one image slot of
``num_tokens(detail)`` placeholder tokens per image and assigns the rows of
``encode(...)`` into those slots in one masked assignment (as nanoVLM does).

Implementations:

- :class:`EfficientNetVision`: EfficientNet-Lite0 features (1280 × 7 × 7 at
  224 px, flattened to 49 tokens; or 1442 wide with earlier stages and position
  channels, ``features = "multiscale"``; 1459 with colour histograms too,
  ``"multiscale-colour"``; ``summary_token = true`` puts one more token
  first, each feature's maximum over the grid) → a projector (``mlp2x_gelu`` as LLaVA's);
- :class:`HFVisionTower`: a CLIP or SigLIP vision model from ``transformers``
  (``hidden_states[feature_layer]``, CLIP's CLS dropped by ``select="default"``)
  → a projector;
- :class:`LlavaVision`: the vision tower and ``multi_modal_projector`` of a loaded
  ``LlavaForConditionalGeneration``, through its own ``get_image_features``.

Detail → tokens per image (``g`` = tower ``image_size // patch_size``):

================================  ==========================  ============  ==========
encoder                           input                       high / auto   low
================================  ==========================  ============  ==========
EfficientNet-Lite0                224 px, padded to square    7×7 = 49      4×4 = 16
  with ``summary_token = true``   the same                    1 + 49 = 50   1 + 16 = 17
CLIP ViT-L/14-336 (LLaVA-1.5)     336 px                      24×24 = 576   12×12 = 144
CLIP ViT-L/14                     224 px                      16×16 = 256   8×8 = 64
SigLIP so400m/14-384              384 px                      27×27 = 729   14×14 = 196
any CLIP / SigLIP tower           its own ``image_size``      g²            ⌈g/2⌉²
================================  ==========================  ============  ==========

``auto`` is ``high``. ``low`` average-pools the projected patch grid to
⌈g/2⌉ × ⌈g/2⌉ (adaptive, so odd grids work); a kept CLS token (``select="full"``
on CLIP) or EfficientNet-Lite0's summary token adds one token to both rows and is
never pooled. A LLaVA checkpoint whose token count is not a square grid (a SigLIP
tower with ``vision_feature_select_strategy="default"`` drops one patch: g² − 1)
has ``low == high``.

The composition format and its loader live in :mod:`assistant.engine.composition`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from assistant.engine import efficientnet
from assistant.items import DETAILS

PROJECTOR_KINDS: tuple[str, ...] = ("mlp2x_gelu", "linear")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class VisionPart(Protocol):
    identity: str  # names the weights and preprocessing; part of every cache key
    hidden_size: int  # decoder embedding width the projector maps to

    def num_tokens(self, detail: str) -> int: ...

    def preprocess_key(self, detail: str) -> str: ...

    def encode(self, images: list[Image.Image], detail: str) -> torch.Tensor:
        """(num_images, num_tokens(detail), hidden_size) float32 on the vision part's device."""
        ...


class GridVision:
    """What all implementations share: detail → token layout, low-detail pooling, no-grad encode.

    A subclass sets ``identity``, ``hidden_size``, ``image_size``, ``num_prefix``
    (leading tokens never pooled), ``grid`` (side of the square patch grid, None if
    the tokens form none) and implements ``_encode_high``.
    """

    identity: str
    hidden_size: int
    image_size: int
    num_prefix: int = 0
    grid: int | None = None
    num_high_tokens: int

    def num_tokens(self, detail: str) -> int:
        if _check_detail(detail) == "low" and self.grid is not None:
            return self.num_prefix + math.ceil(self.grid / 2) ** 2
        return self.num_high_tokens

    def preprocess_key(self, detail: str) -> str:
        return f"{self.image_size}px/{self.num_tokens(detail)}t"

    @torch.no_grad()  # not inference_mode: callers may edit the result in place outside it
    def encode(self, images: list[Image.Image], detail: str) -> torch.Tensor:
        _check_detail(detail)
        return self.pool(self._encode_high(images), detail).float()  # (N, num_tokens(detail), h)

    def pool(self, x: torch.Tensor, detail: str) -> torch.Tensor:
        """(N, T_high, h) high-detail embeddings → (N, num_tokens(detail), h)."""
        assert x.shape[1] == self.num_high_tokens, (x.shape, self.num_high_tokens)
        if detail == "low" and self.grid is not None:
            return pool_grid(x, self.num_prefix, self.grid)  # (N, P + ⌈g/2⌉², h)
        return x

    def _encode_high(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError


class ProjectedVision(GridVision):
    """An encoder whose features a separate :class:`Projector` maps to the decoder: what training aligns.

    A subclass sets ``encoder_identity`` (the encoder's weights and preprocessing,
    without the projector: the key of :mod:`assistant.training.features`) and
    ``projector``, and implements :meth:`features`. ``encode`` is
    ``pool(projector(features))``; training calls :meth:`features` once per image
    and :meth:`project` at every step, with gradients, on a projector it made trainable.
    """

    encoder_identity: str
    projector: Projector

    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, T_high, in_dim): the encoder's output before the projector, without gradients."""
        raise NotImplementedError

    def project(self, features: torch.Tensor, detail: str) -> torch.Tensor:
        """(N, T_high, in_dim) features → (N, num_tokens(detail), h) embeddings, differentiable in the projector."""
        return self.pool(self.projector(features.to(module_device_dtype(self.projector)[1])), detail)

    def _encode_high(self, images: list[Image.Image]) -> torch.Tensor:
        return self.projector(self.features(images).to(module_device_dtype(self.projector)[1]))  # (N, T_high, h)


def _check_detail(detail: str) -> str:
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    return detail


def pool_grid(x: torch.Tensor, num_prefix: int, grid: int) -> torch.Tensor:
    """(N, P + g², h) → (N, P + ⌈g/2⌉², h): 2×2 average pooling of the patch grid, prefix kept."""
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    n, _, h = patches.shape
    side = math.ceil(grid / 2)
    patches = patches.transpose(1, 2).reshape(n, h, grid, grid)  # (N, h, g, g)
    pooled = F.adaptive_avg_pool2d(patches.float(), side).to(x.dtype)  # (N, h, ⌈g/2⌉, ⌈g/2⌉)
    return torch.cat([prefix, pooled.flatten(2).transpose(1, 2)], dim=1)


def fingerprint(*modules: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer: 16 hex digits."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:16]


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


# --- projector ------------------------------------------------------------------------------------

class Projector(nn.Sequential):
    """Encoder features → decoder embeddings; parameter names follow LLaVA's ``mm_projector`` (0.*, 2.*).

    ``shortcut_dim`` > 0 adds a linear map (``shortcut.weight``, no bias) from the last ``shortcut_dim`` features
    straight to the output, beside the MLP: for a few features whose meaning the decoder already has words for,
    so that their weights can start at those words' embeddings (:func:`add_word_shortcut`).
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, shortcut_dim: int = 0):
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"projector kind must be one of {', '.join(PROJECTOR_KINDS)}, got {kind!r}")
        if not 0 <= shortcut_dim <= in_dim:
            raise ValueError(f"a projector's shortcut reads 0 to in_dim ({in_dim}) features, got {shortcut_dim}")
        layers = [nn.Linear(in_dim, out_dim)]
        if kind == "mlp2x_gelu":
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        super().__init__(*layers)
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim
        self.shortcut_dim = shortcut_dim
        if shortcut_dim:
            self.add_module("shortcut", nn.Linear(shortcut_dim, out_dim, bias=False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = features
        for index in range(len(self) - (1 if self.shortcut_dim else 0)):
            out = self[index](out)
        if self.shortcut_dim:
            out = out + self.shortcut(features[..., -self.shortcut_dim:])
        return out


def add_word_shortcut(module: Projector, word_embeddings: torch.Tensor, scale: float) -> Projector:
    """A copy of ``module`` with a shortcut from its last ``len(word_embeddings)`` features to the output, its
    weights starting at ``word_embeddings / scale`` (one row per feature: the decoder's embedding of the word
    that names it), so a feature at ``scale`` adds its word's embedding to the image token. The MLP is unchanged.

    For features that the decoder is slow to learn to read through the MLP: with EfficientNet-Lite0's colour
    histograms behind the MLP alone, the default model named the colour of shapes it was trained on 47 times in
    60 (forced choice among 8 colour words), although a linear probe on the same features gets 98 in 100.
    """
    if module.shortcut_dim:
        raise ValueError("the projector has a shortcut already")
    count = word_embeddings.shape[0]
    if word_embeddings.shape[1] != module.out_dim or not 0 < count <= module.in_dim:
        raise ValueError(f"word embeddings of shape {tuple(word_embeddings.shape)} do not fit a projector from "
                         f"{module.in_dim} to {module.out_dim}")
    first = next(module.parameters())
    state = {key: value.clone() for key, value in module.state_dict().items()}
    state["shortcut.weight"] = (word_embeddings.detach().to(first.device, first.dtype) / scale).T.contiguous()
    return _rebuilt(module, Projector(module.kind, module.in_dim, module.out_dim, shortcut_dim=count), state)


def widen_projector(module: Projector, in_dim: int) -> Projector:
    """A copy of ``module`` that takes ``in_dim`` features: the first ``module.in_dim`` as before, the rest at zero
    weight, so its output is unchanged until training moves them. For a projector trained on a feature set that
    the new one extends (EfficientNet-Lite0's sets each start with the one before)."""
    if in_dim < module.in_dim:
        raise ValueError(f"cannot narrow a projector from {module.in_dim} to {in_dim} features")
    if module.shortcut_dim:
        raise ValueError("cannot widen a projector with a shortcut: it reads the last features, which would move")
    state = {key: value.clone() for key, value in module.state_dict().items()}
    first = state["0.weight"]  # (out_dim, old in_dim)
    state["0.weight"] = torch.cat([first, first.new_zeros(first.shape[0], in_dim - module.in_dim)], dim=1)
    return _rebuilt(module, Projector(module.kind, in_dim, module.out_dim), state)


def _rebuilt(module: Projector, new: Projector, state: dict[str, torch.Tensor]) -> Projector:
    """``new`` holding ``state``, on ``module``'s device and dtype, in its mode, trainable if it was."""
    first = next(module.parameters())
    new.load_state_dict(state, strict=True)
    return new.to(first.device, first.dtype).train(module.training).requires_grad_(first.requires_grad)


def save_projector(module: Projector, path: Path) -> None:
    """Write ``path/model.safetensors`` and ``path/config.json`` (kind, in_dim, out_dim, shortcut_dim if any)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, path / "model.safetensors")
    config = {"kind": module.kind, "in_dim": module.in_dim, "out_dim": module.out_dim}
    if module.shortcut_dim:
        config["shortcut_dim"] = module.shortcut_dim
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_projector(path: Path) -> Projector:
    """Read what :func:`save_projector` wrote; float32, eval, on CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        module = Projector(config["kind"], int(config["in_dim"]), int(config["out_dim"]),
                           shortcut_dim=int(config.get("shortcut_dim", 0)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a projector directory (config.json with kind, in_dim, out_dim): "
                         f"{exc}") from exc
    module.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    return module.eval().requires_grad_(False)


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------

class EfficientNetVision(ProjectedVision):
    """EfficientNet-Lite0 + a projector; ``feature_set`` "head" (its last layer, 1280 wide), "multiscale"
    (that plus earlier stages and position channels: :meth:`EfficientNetLite0.forward_multiscale`) or
    "multiscale-colour" (that plus each cell's colour histogram: :func:`efficientnet.colour_histograms`).

    ``summary_token`` puts one token before the 7×7 grid: each feature's maximum over the grid. A small shape
    covers a few cells among many of background, and the decoder has to find its colour among them; the
    maximum brings it in one token. (A fresh projector trained on colour questions alone, decoder frozen: the
    held-out loss per answer token after 150 steps of 8 was 0.19 with it and 0.34 without.)

    ``summary_centroid`` (features "multiscale-colour" and the summary token only): the summary token's position
    channels, which a maximum makes the same for every image, hold :func:`efficientnet.salient_centroid`
    instead, where the cells whose colours stand out are; so "where is it?" too has its answer in one token.
    """

    image_size = efficientnet.IMAGE_SIZE

    def __init__(self, backbone: efficientnet.EfficientNetLite0, projector: Projector, feature_set: str = "head",
                 summary_token: bool = False, summary_centroid: bool = False):
        if feature_set not in efficientnet.FEATURE_SETS:
            raise ValueError(f"EfficientNet-Lite0 features must be one of {', '.join(efficientnet.FEATURE_SETS)}, "
                             f"got {feature_set!r}")
        width = efficientnet.FEATURE_SETS[feature_set]
        if projector.in_dim != width:
            raise ValueError(f"the projector takes {projector.in_dim} features, EfficientNet-Lite0's {feature_set} "
                             f"features are {width} wide")
        if summary_centroid and not (summary_token and feature_set == "multiscale-colour"):
            raise ValueError("summary_centroid needs the summary token and the multiscale-colour features")
        self.backbone = backbone.eval().requires_grad_(False)
        self.projector = projector.eval().requires_grad_(False)
        self.feature_set, self.summary_token, self.summary_centroid = feature_set, summary_token, summary_centroid
        self.hidden_size = projector.out_dim
        self.grid = self.image_size // 32  # 7
        self.num_prefix = int(summary_token)
        self.num_high_tokens = self.num_prefix + self.grid**2  # 49, or 50 with the summary token
        suffix = "" if feature_set == "head" else f":{feature_set}"  # "head" keeps the identity it always had
        suffix += ":summary-max" if summary_token else ""
        suffix += "-centroid" if summary_centroid else ""
        self.encoder_identity = f"efficientnet-lite0:{fingerprint(backbone)}{suffix}"
        self.identity = f"{self.encoder_identity}+proj:{fingerprint(projector)}"

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        device, dtype = module_device_dtype(self.backbone)
        pixels = efficientnet.preprocess(images, self.image_size).to(device, dtype)  # (N, 3, 224, 224)
        features = self.backbone.forward_feature_set(pixels, self.feature_set)  # (N, in_dim, 7, 7)
        grid = features.flatten(2).transpose(1, 2)  # (N, 49, in_dim)
        if not self.summary_token:
            return grid
        summary = grid.amax(dim=1, keepdim=True)  # (N, 1, in_dim)
        if self.summary_centroid:
            summary[:, 0, efficientnet.POSITION_CHANNELS] = efficientnet.salient_centroid(grid)
        return torch.cat([summary, grid], dim=1)  # (N, 1 + 49, in_dim)


# --- CLIP / SigLIP towers --------------------------------------------------------------------------

class HFVisionTower(ProjectedVision):
    """A ``CLIPVisionModel`` or ``SiglipVisionModel`` plus a projector."""

    def __init__(self, vision_model: nn.Module, projector: Projector, feature_layer: int = -2,
                 select: Literal["default", "full"] = "default", image_processor: Any = None):
        config = vision_model.config
        if select not in ("default", "full"):
            raise ValueError(f"select must be 'default' or 'full', got {select!r}")
        if projector.in_dim != config.hidden_size:
            raise ValueError(f"the projector takes {projector.in_dim} features, the tower gives {config.hidden_size}")
        self.vision_model = vision_model.eval().requires_grad_(False)
        self.projector = projector.eval().requires_grad_(False)
        self.feature_layer, self.select = feature_layer, select
        self.image_processor = image_processor
        self.is_clip = config.model_type.startswith("clip")  # CLIP prepends a CLS token; SigLIP has none
        self.hidden_size = projector.out_dim
        self.image_size = config.image_size
        self.grid = config.image_size // config.patch_size
        self.num_prefix = int(self.is_clip and select == "full")
        self.num_high_tokens = self.num_prefix + self.grid**2
        self.encoder_identity = (f"{config.model_type}:{fingerprint(vision_model)}:layer{feature_layer}:{select}"
                                 f"+pre:{processor_fingerprint(image_processor)}")
        self.identity = f"{self.encoder_identity}+proj:{fingerprint(projector)}"

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        device, dtype = module_device_dtype(self.vision_model)
        pixels = tower_pixels(images, self.image_processor, self.image_size, self.is_clip)  # (N, 3, S, S)
        out = self.vision_model(pixels.to(device, dtype), output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]  # (N, [1 +] g², d)
        if self.is_clip and self.select == "default":
            features = features[:, 1:]  # (N, g², d)
        return features  # (N, T_high, d)


def tower_pixels(images: list[Image.Image], image_processor: Any, size: int, is_clip: bool) -> torch.Tensor:
    """(N, 3, size, size): the checkpoint's own image processor, else its family's defaults."""
    if image_processor is not None:
        rgb = [image.convert("RGB") for image in images]
        return image_processor(images=rgb, return_tensors="pt")["pixel_values"]
    return resize_normalize(images, size, is_clip)


def resize_normalize(images: list[Image.Image], size: int, is_clip: bool) -> torch.Tensor:
    """CLIPImageProcessor / SiglipImageProcessor defaults from constants, pixel for pixel.

    CLIP resizes the short side to ``size`` (bicubic) and center-crops; SigLIP
    resizes to ``size`` × ``size``. Both rescale to 0..1 and normalize.
    """
    mean, std = (CLIP_MEAN, CLIP_STD) if is_clip else (SIGLIP_MEAN, SIGLIP_STD)
    batch = []
    for image in images:
        image = image.convert("RGB")
        if is_clip:
            short, long = sorted(image.size)
            new_long = int(size * long / short)  # floor, as transformers does
            image = image.resize((size, new_long) if image.width <= image.height else (new_long, size),
                                 Image.Resampling.BICUBIC)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        batch.append(efficientnet.pixels_of(image) / 255.0)  # (3, size, size)
    x = torch.stack(batch)  # (N, 3, size, size)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def processor_fingerprint(image_processor: Any) -> str:
    if image_processor is None:
        return "config"
    settings = json.dumps(image_processor.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:8]


def load_image_processor(source: str) -> Any:
    """The checkpoint's own image processor, or None when it ships none (then config constants are used)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None


def load_hf_vision_tower(source: str, projector: Projector, *, feature_layer: int = -2,
                         select: Literal["default", "full"] = "default", device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> HFVisionTower:
    """A CLIP or SigLIP checkpoint (vision-only or full two-tower; local path or hub id) plus a projector."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type.startswith("clip"):
        tower_class = CLIPVisionModel
    elif model_type.startswith("siglip"):
        tower_class = SiglipVisionModel
    else:
        raise ValueError(f"{source} is a {model_type!r} model; the vision encoder must be CLIP or SigLIP")
    tower = tower_class.from_pretrained(source, dtype=dtype).to(device)
    return HFVisionTower(tower, projector.to(device, dtype), feature_layer, select, load_image_processor(source))


# --- LLaVA checkpoints ----------------------------------------------------------------------------

class LlavaVision(GridVision):
    """The vision half of a loaded ``LlavaForConditionalGeneration`` (shared, not copied)."""

    def __init__(self, model: nn.Module, image_processor: Any = None):
        config = model.config
        vision_config = config.vision_config
        self.model = model
        self.vision_tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector
        self.image_processor = image_processor
        self.feature_layer = config.vision_feature_layer
        self.select = config.vision_feature_select_strategy
        self.is_clip = vision_config.model_type.startswith("clip")
        self.hidden_size = config.text_config.hidden_size
        self.image_size = vision_config.image_size
        grid = vision_config.image_size // vision_config.patch_size
        # get_image_features drops the first token for "default" whatever the tower: CLS for CLIP, a patch for SigLIP.
        self.num_high_tokens = grid**2 + int(self.is_clip) - int(self.select == "default")
        self.num_prefix = self.num_high_tokens - grid**2
        self.grid = grid if self.num_prefix in (0, 1) else None
        self.identity = (f"llava-{vision_config.model_type}:{fingerprint(self.vision_tower)}"
                         f":layer{self.feature_layer}:{self.select}+proj:{fingerprint(self.projector)}"
                         f"+pre:{processor_fingerprint(image_processor)}")

    def _encode_high(self, images: list[Image.Image]) -> torch.Tensor:
        device, dtype = module_device_dtype(self.vision_tower)
        pixels = tower_pixels(images, self.image_processor, self.image_size, self.is_clip)  # (N, 3, S, S)
        out = self.model.model.get_image_features(
            pixel_values=pixels.to(device, dtype), vision_feature_layer=self.feature_layer,
            vision_feature_select_strategy=self.select)
        return torch.stack(list(out.pooler_output))  # (N, T, h)
