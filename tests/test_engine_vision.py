"""Vision parts on tiny random checkpoints: shapes per detail, identities, projector files, LLaVA parity."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from assistant.engine import efficientnet
from assistant.engine.efficientnet import EfficientNetLite0
from assistant.engine.vision import (EfficientNetVision, HFVisionTower, LlavaVision, Projector, add_word_shortcut,
                                     fingerprint, load_hf_vision_tower, load_image_processor, load_projector,
                                     pool_grid, save_projector, widen_projector)
from tests.vision_fixtures import (GRID, IMAGE_TOKEN_ID, TEXT_HIDDEN, VISION_HIDDEN, make_image, save_tiny_llava,
                                   save_tiny_tower)

IMAGES = [make_image(1), make_image(2, size=(40, 70))]


def random_projector(in_dim: int, out_dim: int = TEXT_HIDDEN, kind: str = "mlp2x_gelu", seed: int = 0) -> Projector:
    torch.manual_seed(seed)
    return Projector(kind, in_dim, out_dim).eval()


def load_llava(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


# --- LLaVA checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize(("tower", "select", "num_high", "num_low"), [
    ("clip", "default", GRID**2, 4),  # CLS dropped: the 4 × 4 grid, pooled to 2 × 2
    ("clip", "full", 1 + GRID**2, 1 + 4),  # CLS kept and never pooled
    ("siglip", "full", GRID**2, 4),
    ("siglip", "default", GRID**2 - 1, GRID**2 - 1),  # "default" drops a patch: no grid left to pool
])
def test_llava_vision_tokens_match_the_config(tmp_path, tower, select, num_high, num_low):
    vision = LlavaVision(load_llava(save_tiny_llava(tmp_path, tower, select)), load_image_processor(str(tmp_path)))

    assert (vision.num_tokens("high"), vision.num_tokens("auto"), vision.num_tokens("low")) == (
        num_high, num_high, num_low)
    assert vision.hidden_size == TEXT_HIDDEN
    high = vision.encode(IMAGES, "high")
    low = vision.encode(IMAGES, "low")
    assert high.shape == (2, num_high, TEXT_HIDDEN) and high.dtype == torch.float32
    assert low.shape == (2, num_low, TEXT_HIDDEN)
    assert torch.equal(vision.encode(IMAGES, "auto"), high)
    assert vision.preprocess_key("high") == vision.preprocess_key("auto") == f"32px/{num_high}t"


def test_llava_embeddings_assigned_into_slots_reproduce_the_models_own_forward(tmp_path):
    """The contract with the model: render num_tokens image slots, assign encode() rows into them."""
    model = load_llava(save_tiny_llava(tmp_path, "clip"))
    processor = load_image_processor(str(tmp_path))
    vision = LlavaVision(model, processor)
    num_tokens = vision.num_tokens("high")
    input_ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * num_tokens + [7, 8]])  # (1, L)
    pixel_values = processor(images=IMAGES[:1], return_tensors="pt")["pixel_values"]

    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values).logits
        embeds = model.get_input_embeddings()(input_ids)  # (1, L, h)
        slots = input_ids == IMAGE_TOKEN_ID  # (1, L)
        embeds[slots] = vision.encode(IMAGES[:1], "high").reshape(-1, TEXT_HIDDEN)
        actual = model(inputs_embeds=embeds).logits

    torch.testing.assert_close(actual, expected)


def test_llava_identity_names_the_vision_weights(tmp_path):
    first = LlavaVision(load_llava(save_tiny_llava(tmp_path / "a", "clip", seed=0)))
    again = LlavaVision(load_llava(tmp_path / "a"))
    other = LlavaVision(load_llava(save_tiny_llava(tmp_path / "b", "clip", seed=1)))

    assert first.identity == again.identity
    assert first.identity != other.identity
    assert first.identity.startswith("llava-clip_vision_model:")


# --- CLIP / SigLIP towers with a separate projector -------------------------------------------------

@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("with_processor", [True, False])
def test_hf_vision_tower_shapes(tmp_path, tower, with_processor):
    path = save_tiny_tower(tmp_path, tower, with_processor=with_processor)
    vision = load_hf_vision_tower(str(path), random_projector(VISION_HIDDEN))

    assert isinstance(vision, HFVisionTower)
    assert (vision.image_processor is not None) == with_processor
    assert vision.encode(IMAGES, "high").shape == (2, GRID**2, TEXT_HIDDEN)
    assert vision.encode(IMAGES, "low").shape == (2, 4, TEXT_HIDDEN)


def test_hf_vision_tower_select_full_keeps_clip_cls(tmp_path):
    path = save_tiny_tower(tmp_path, "clip")
    vision = load_hf_vision_tower(str(path), random_projector(VISION_HIDDEN), select="full", feature_layer=-1)

    assert vision.encode(IMAGES, "high").shape == (2, 1 + GRID**2, TEXT_HIDDEN)
    assert vision.encode(IMAGES, "low").shape == (2, 1 + 4, TEXT_HIDDEN)


def test_hf_vision_tower_uses_the_requested_feature_layer(tmp_path):
    from transformers import CLIPVisionModel

    path = save_tiny_tower(tmp_path, "clip")
    projector = random_projector(VISION_HIDDEN)
    vision = load_hf_vision_tower(str(path), projector, feature_layer=-2)
    tower = CLIPVisionModel.from_pretrained(path).eval()
    pixels = vision.image_processor(images=IMAGES, return_tensors="pt")["pixel_values"]

    with torch.no_grad():
        expected = projector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    torch.testing.assert_close(vision.encode(IMAGES, "high"), expected)


def test_hf_vision_tower_identity_changes_with_weights_layer_and_projector(tmp_path):
    path = save_tiny_tower(tmp_path, "siglip")
    base = load_hf_vision_tower(str(path), random_projector(VISION_HIDDEN, seed=0))

    assert base.identity == load_hf_vision_tower(str(path), random_projector(VISION_HIDDEN, seed=0)).identity
    assert base.identity != load_hf_vision_tower(str(path), random_projector(VISION_HIDDEN, seed=1)).identity
    assert base.identity != load_hf_vision_tower(str(path), random_projector(VISION_HIDDEN),
                                                 feature_layer=-1).identity


def test_hf_vision_tower_rejects_a_projector_of_the_wrong_width(tmp_path):
    path = save_tiny_tower(tmp_path, "clip")
    with pytest.raises(ValueError, match="projector takes 16 features"):
        load_hf_vision_tower(str(path), random_projector(16))


def test_a_non_vision_checkpoint_is_refused(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.vision_fixtures import tiny_llama_config

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must be CLIP or SigLIP"):
        load_hf_vision_tower(str(tmp_path), random_projector(VISION_HIDDEN))


# --- EfficientNet-Lite0 ------------------------------------------------------------------------------

def test_efficientnet_vision_tokens_per_detail():
    torch.manual_seed(0)
    vision = EfficientNetVision(EfficientNetLite0(), random_projector(1280))

    assert (vision.num_tokens("high"), vision.num_tokens("auto"), vision.num_tokens("low")) == (49, 49, 16)
    assert vision.encode(IMAGES, "high").shape == (2, 49, TEXT_HIDDEN)
    assert vision.encode(IMAGES, "low").shape == (2, 16, TEXT_HIDDEN)
    assert vision.preprocess_key("low") == "224px/16t"
    assert vision.identity.startswith("efficientnet-lite0:") and "+proj:" in vision.identity


def test_efficientnet_vision_batch_equals_one_by_one():
    torch.manual_seed(0)
    vision = EfficientNetVision(EfficientNetLite0(), random_projector(1280))
    batch = vision.encode(IMAGES, "high")
    torch.testing.assert_close(batch[1], vision.encode(IMAGES[1:], "high")[0], atol=1e-4, rtol=1e-4)


def test_efficientnet_multiscale_features_hold_the_head_earlier_stages_and_where_each_cell_is():
    torch.manual_seed(0)
    backbone = EfficientNetLite0()
    multiscale = EfficientNetVision(backbone, random_projector(1442), "multiscale")
    head = EfficientNetVision(backbone, random_projector(1280))

    features = multiscale.features(IMAGES)  # (2, 49, 1442)
    assert features.shape == (2, 49, 1442)
    torch.testing.assert_close(features[..., :1280], head.features(IMAGES))  # the head's features come first
    position = features[..., -10:]  # the same for every image: x and y of each cell, then their sines and cosines
    torch.testing.assert_close(position[0], position[1])
    assert position[0, 0, :2].tolist() == pytest.approx([-6 / 7, -6 / 7])  # top left cell, row-major like the tokens
    assert position[0, 6, :2].tolist() == pytest.approx([6 / 7, -6 / 7])  # top right
    assert position[0, 48, :2].tolist() == pytest.approx([6 / 7, 6 / 7])  # bottom right
    assert multiscale.encode(IMAGES, "low").shape == (2, 16, TEXT_HIDDEN)
    assert multiscale.encoder_identity == head.encoder_identity + ":multiscale"  # features cached apart


def test_efficientnet_summary_token_comes_first_holds_each_features_maximum_and_is_never_pooled():
    torch.manual_seed(0)
    backbone = EfficientNetLite0()
    plain = EfficientNetVision(backbone, random_projector(1442), "multiscale")
    summary = EfficientNetVision(backbone, random_projector(1442), "multiscale", summary_token=True)

    features = summary.features(IMAGES)  # (2, 1 + 49, 1442)
    assert features.shape == (2, 50, 1442)
    torch.testing.assert_close(features[:, 1:], plain.features(IMAGES))  # the grid as it was, after it
    torch.testing.assert_close(features[:, 0], features[:, 1:].amax(dim=1))
    assert (summary.num_tokens("high"), summary.num_tokens("low")) == (50, 17)
    high, low = summary.encode(IMAGES, "high"), summary.encode(IMAGES, "low")
    assert low.shape == (2, 17, TEXT_HIDDEN)
    torch.testing.assert_close(low[:, 0], high[:, 0])  # the low-detail pooling leaves it alone
    assert summary.encoder_identity == plain.encoder_identity + ":summary-max"  # features cached apart


def test_efficientnet_multiscale_colour_features_are_the_multiscale_ones_then_colour_histograms():
    torch.manual_seed(0)
    backbone = EfficientNetLite0()
    colour = EfficientNetVision(backbone, random_projector(1459), "multiscale-colour", summary_token=True)
    multiscale = EfficientNetVision(backbone, random_projector(1442), "multiscale", summary_token=True)

    features = colour.features(IMAGES)  # (2, 1 + 49, 1459)
    assert features.shape == (2, 50, 1459)
    torch.testing.assert_close(features[..., :1442], multiscale.features(IMAGES))
    shares = features[:, 1:, 1442:]  # (2, 49, 17): each cell's colour channels
    torch.testing.assert_close(shares.sum(-1), torch.full((2, 49), efficientnet.COLOUR_SCALE), atol=1e-3, rtol=0)
    assert colour.encoder_identity == backbone_identity(backbone) + ":multiscale-colour:summary-max"


def shape_on(background: tuple[int, int, int], box: tuple[int, int, int, int] | None) -> Image.Image:
    """A 224 px image of one colour with a red rectangle at ``box`` (left, top, right, bottom), if any."""
    image = Image.new("RGB", (224, 224), background)
    if box is not None:
        ImageDraw.Draw(image).rectangle(box, fill=(220, 30, 30))
    return image


def test_the_summary_centroid_says_where_what_stands_out_is_and_leaves_the_rest_as_it_was():
    torch.manual_seed(0)
    backbone = EfficientNetLite0()
    centroid = EfficientNetVision(backbone, random_projector(1459), "multiscale-colour", summary_token=True,
                                  summary_centroid=True)
    maximum = EfficientNetVision(backbone, random_projector(1459), "multiscale-colour", summary_token=True)
    images = [shape_on((240, 240, 240), (10, 90, 60, 140)),  # on the left, halfway down
              shape_on((30, 60, 200), (150, 170, 200, 215)),  # bottom right, on blue
              shape_on((240, 240, 240), None)]  # nothing stands out

    features, plain = centroid.features(images), maximum.features(images)  # (3, 50, 1459) each
    where = efficientnet.POSITION_CHANNELS
    torch.testing.assert_close(features[:, 1:], plain[:, 1:])  # the grid as it was
    torch.testing.assert_close(features[:, 0, :where.start], plain[:, 0, :where.start])  # the maxima before...
    torch.testing.assert_close(features[:, 0, where.stop:], plain[:, 0, where.stop:])  # ...and after the positions
    x, y = features[:, 0, where.start], features[:, 0, where.start + 1]  # in [-1, 1], like each cell's
    assert x[0] < -0.6 and abs(y[0]) < 0.15
    assert x[1] > 0.4 and y[1] > 0.5
    assert abs(x[2]) < 1e-6 and abs(y[2]) < 1e-6  # the mean of all cells: the centre
    torch.testing.assert_close(features[2, 0, where], features[2, 1:, where].mean(0))
    assert centroid.encoder_identity == maximum.encoder_identity + "-centroid"  # features cached apart
    with pytest.raises(ValueError, match="summary_centroid needs the summary token and the multiscale-colour"):
        EfficientNetVision(backbone, random_projector(1442), "multiscale", summary_token=True, summary_centroid=True)


def backbone_identity(backbone: EfficientNetLite0) -> str:
    return EfficientNetVision(backbone, random_projector(1280)).encoder_identity


def test_a_widened_projector_gives_what_the_narrow_one_gave_whatever_the_new_features():
    narrow = random_projector(1442)
    wide = widen_projector(narrow, 1459)
    features = torch.randn(3, 50, 1442)
    extra = torch.randn(3, 50, 17) * 10
    assert (wide.kind, wide.in_dim, wide.out_dim) == ("mlp2x_gelu", 1459, TEXT_HIDDEN)
    torch.testing.assert_close(wide(torch.cat([features, extra], dim=-1)), narrow(features))
    assert wide[0].weight[:, 1442:].abs().sum() == 0 and not wide.training
    assert widen_projector(narrow, 1442).state_dict()["0.weight"].equal(narrow[0].weight)
    with pytest.raises(ValueError, match="cannot narrow a projector from 1442 to 1280"):
        widen_projector(narrow, 1280)


def test_a_word_shortcut_adds_each_last_features_word_embedding_beside_the_unchanged_mlp(tmp_path):
    narrow = random_projector(20)
    words = torch.randn(3, TEXT_HIDDEN)
    projector = add_word_shortcut(narrow, words, scale=5.0)
    features = torch.randn(2, 7, 20)
    features[..., 17:] = 0
    torch.testing.assert_close(projector(features), narrow(features))  # no colour: what the MLP gives
    features[0, 0, 18] = 5.0  # feature 1 of 3 at the scale: its word, added
    torch.testing.assert_close(projector(features)[0, 0], narrow(features)[0, 0] + words[1])
    assert (projector.shortcut_dim, projector.in_dim, sorted(projector.state_dict())) == (
        3, 20, ["0.bias", "0.weight", "2.bias", "2.weight", "shortcut.weight"])
    save_projector(projector, tmp_path / "projector")
    loaded = load_projector(tmp_path / "projector")
    torch.testing.assert_close(loaded(features), projector(features))
    assert fingerprint(loaded) == fingerprint(projector) != fingerprint(narrow)
    with pytest.raises(ValueError, match="has a shortcut already"):
        add_word_shortcut(projector, words, scale=5.0)
    with pytest.raises(ValueError, match="cannot widen a projector with a shortcut"):
        widen_projector(projector, 24)
    with pytest.raises(ValueError, match=r"do not fit a projector from 20 to"):
        add_word_shortcut(narrow, torch.randn(3, TEXT_HIDDEN + 1), scale=5.0)


def test_efficientnet_refuses_unknown_features_and_a_projector_of_the_other_width():
    with pytest.raises(ValueError, match="must be one of head, multiscale, multiscale-colour"):
        EfficientNetVision(EfficientNetLite0(), random_projector(1280), "pyramid")
    with pytest.raises(ValueError, match="multiscale features are 1442 wide"):
        EfficientNetVision(EfficientNetLite0(), random_projector(1280), "multiscale")


def test_unknown_detail_is_refused():
    vision = EfficientNetVision(EfficientNetLite0(), random_projector(1280))
    with pytest.raises(ValueError, match="detail must be one of"):
        vision.num_tokens("medium")
    with pytest.raises(ValueError, match="detail must be one of"):
        vision.encode(IMAGES, "ultra")


# --- pieces -------------------------------------------------------------------------------------------

def test_pool_grid_averages_2x2_neighbourhoods_and_keeps_the_prefix():
    grid = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # (1, 16, 1): a 4 × 4 grid 0..15
    cls = torch.full((1, 1, 1), -1.0)
    pooled = pool_grid(torch.cat([cls, grid], dim=1), num_prefix=1, grid=4)  # (1, 5, 1)
    assert pooled.flatten().tolist() == [-1.0, 2.5, 4.5, 10.5, 12.5]


def test_pool_grid_handles_odd_grids():
    x = torch.randn(2, 49, 8)
    assert pool_grid(x, num_prefix=0, grid=7).shape == (2, 16, 8)


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_projector_round_trip(tmp_path, kind):
    projector = random_projector(12, 20, kind)
    save_projector(projector, tmp_path / "proj")
    loaded = load_projector(tmp_path / "proj")

    assert (loaded.kind, loaded.in_dim, loaded.out_dim) == (kind, 12, 20)
    assert fingerprint(loaded) == fingerprint(projector)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(loaded(x), projector(x))


def test_projector_uses_llava_mm_projector_names():
    assert sorted(Projector("mlp2x_gelu", 4, 8).state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_load_projector_explains_a_bad_directory(tmp_path):
    with pytest.raises(ValueError, match="not a projector directory"):
        load_projector(tmp_path)
    with pytest.raises(ValueError, match="projector kind must be one of"):
        Projector("conv", 4, 8)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_fallback_preprocessing_matches_the_family_processor(tower):
    """Without a shipped processor, the config constants give the very pixels the processor would."""
    from assistant.engine.vision import resize_normalize
    from tests.vision_fixtures import IMAGE_SIZE, tiny_image_processor

    images = IMAGES + [make_image(3, size=(300, 200)), make_image(4, size=(20, 25))]
    expected = tiny_image_processor(tower)(images=images, return_tensors="pt")["pixel_values"]
    actual = resize_normalize(images, IMAGE_SIZE, is_clip=tower == "clip")
    torch.testing.assert_close(actual, expected)
