"""Composition files: parsing, path resolution, loud errors, and building the vision part they name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from assistant.engine.composition import CompositionSpec, load_composition, load_vision_part, write_composition
from assistant.engine.vision import HFVisionTower, Projector, save_projector
from tests.vision_fixtures import GRID, TEXT_HIDDEN, VISION_HIDDEN, make_image, save_tiny_tower

EXAMPLE = """\
decoder = "../decoder"

[vision]
encoder = "efficientnet-lite0"
projector = "projector"
feature_layer = -1
select = "full"
"""


def write(directory: Path, text: str, *, projector: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if projector:
        save_projector(Projector("linear", 4, 8), directory / "projector")
    path = directory / "model.toml"
    path.write_text(text)
    return path


def test_full_example_resolves_paths_against_the_file(tmp_path):
    spec = load_composition(write(tmp_path / "conf", EXAMPLE))

    assert spec == CompositionSpec(decoder=str(tmp_path / "decoder"), encoder="efficientnet-lite0",
                                   projector=tmp_path / "conf" / "projector", feature_layer=-1, select="full")


def test_defaults_and_hub_ids(tmp_path):
    (tmp_path / "clip").mkdir()
    text = 'decoder = "HuggingFaceTB/SmolLM2-135M-Instruct"\n[vision]\nencoder = "clip"\nprojector = "projector"\n'
    spec = load_composition(write(tmp_path, text))

    assert spec.decoder == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not a local path: a hub id, untouched
    assert spec.encoder == str(tmp_path / "clip")  # exists next to the file: a local path
    assert (spec.feature_layer, spec.select, spec.features) == (-2, "default", "head")


def test_absolute_paths_stay_absolute(tmp_path):
    projector = tmp_path / "elsewhere" / "proj"
    save_projector(Projector("linear", 4, 8), projector)
    text = f'decoder = "/opt/decoder"\n[vision]\nencoder = "openai/clip"\nprojector = "{projector}"\n'
    spec = load_composition(write(tmp_path / "conf", text, projector=False))

    assert (spec.decoder, spec.encoder, spec.projector) == ("/opt/decoder", "openai/clip", projector)


@pytest.mark.parametrize(("text", "message"), [
    ('[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\n', "missing decoder"),
    ('decoder = "d"\n', "missing vision"),
    ('decoder = "d"\n[vision]\nprojector = "projector"\n', "missing vision.encoder"),
    ('decoder = "d"\n[vision]\nencoder = "efficientnet-lite0"\n', "missing vision.projector"),
    ('decoder = "d"\nvison = 1\n[vision]\nencoder = "e"\nprojector = "projector"\n', "unknown key vison"),
    ('decoder = "d"\n[vision]\nencoder = "e"\nprojector = "projector"\nlayer = 2\n', "unknown key vision.layer"),
    ('decoder = "d"\n[vision]\nencoder = "e"\nprojector = "projector"\nfeature_layer = "-2"\n',
     "vision.feature_layer must be an integer"),
    ('decoder = "d"\n[vision]\nencoder = "e"\nprojector = "projector"\nfeature_layer = true\n',
     "vision.feature_layer must be an integer"),
    ('decoder = 3\n[vision]\nencoder = "e"\nprojector = "projector"\n', "decoder must be a string"),
    ('decoder = "d"\n[vision]\nencoder = "e"\nprojector = "projector"\nselect = "cls"\n', "vision.select must be"),
    ('decoder = "d"\n[vision]\nencoder = "e"\nprojector = "nowhere"\n', "no projector directory"),
    ('decoder = "d"\nadapter = "nowhere"\n[vision]\nencoder = "e"\nprojector = "projector"\n',
     "adapter: no LoRA adapter"),
    ('decoder = "d"\nvision = "clip"\n', "must be a table"),
    ('decoder = "d"\nadapters = "a"\n[vision]\nencoder = "e"\nprojector = "projector"\n',
     "'adapters' must be a table"),
    ('decoder = "d"\n[adapters]\nnf5 = "a"\n[vision]\nencoder = "e"\nprojector = "projector"\n',
     "unknown key adapters.nf5; expected adapters.int4-cpu"),
    ('decoder = "d"\n[adapters]\nnf4 = "nowhere"\n[vision]\nencoder = "e"\nprojector = "projector"\n',
     "adapters.nf4: no LoRA adapter"),
    ('decoder = "d"\n[adapters]\nnf4 = 4\n[vision]\nencoder = "e"\nprojector = "projector"\n',
     "adapters.nf4 must be a string"),
    ('decoder = "d"\n[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\nfeatures = "all"\n',
     "vision.features must be one of head, multiscale"),
    ('decoder = "d"\n[vision]\nencoder = "e"\nprojector = "projector"\nfeatures = "multiscale"\n',
     "vision.features is for efficientnet-lite0"),
    ('decoder = "d"\n[vision]\nencoder = "e"\nprojector = "projector"\nsummary_token = true\n',
     "vision.summary_token is for efficientnet-lite0"),
    ('decoder = "d"\n[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\nsummary_token = 1\n',
     "vision.summary_token must be true or false"),
    ('decoder = "d"\n[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\nsummary_centroid = true\n'
     'features = "multiscale-colour"\n', "vision.summary_centroid needs summary_token = true"),
    ('decoder = "d"\n[vision]\nencoder = "efficientnet-lite0"\nprojector = "projector"\nsummary_centroid = true\n'
     'summary_token = true\nfeatures = "multiscale"\n', "vision.summary_centroid needs .*multiscale-colour"),
    ('decoder = "d\n', "cannot read"),
])
def test_mistakes_are_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as info:
        load_composition(path)
    assert str(path) in str(info.value)


def test_a_written_composition_reads_back_as_the_same_spec(tmp_path):
    """What `assistant train` writes: parts inside the file's folder become relative, the others stay as given."""
    out = tmp_path / "out"
    save_projector(Projector("linear", 4, 8), out / "projector")
    for name in ("adapter", "adapter-nf4"):
        (out / name).mkdir()
        (out / name / "adapter_config.json").write_text("{}")
    spec = CompositionSpec(decoder="/opt/decoder", encoder="openai/clip", projector=out / "projector",
                           feature_layer=-1, select="full", adapter=out / "adapter",
                           adapters={"nf4": out / "adapter-nf4", "int4-cpu": out / "adapter"})

    write_composition(spec, out / "model.toml")

    text = (out / "model.toml").read_text()
    assert 'projector = "projector"' in text and 'adapter = "adapter"' in text and '"nf4" = "adapter-nf4"' in text
    assert load_composition(out / "model.toml") == spec
    assert (spec.adapter_for("nf4"), spec.adapter_for("int8"), spec.adapter_for("none")) == (
        out / "adapter-nf4", out / "adapter", out / "adapter")


@pytest.mark.parametrize("features, summary_token, summary_centroid", [
    ("multiscale", False, False), ("multiscale", True, False), ("multiscale-colour", True, True)])
def test_efficientnet_features_are_written_and_read_back(tmp_path, features, summary_token, summary_centroid):
    save_projector(Projector("linear", 4, 8), tmp_path / "projector")
    spec = CompositionSpec(decoder="/opt/decoder", encoder="efficientnet-lite0", projector=tmp_path / "projector",
                           features=features, summary_token=summary_token, summary_centroid=summary_centroid)

    write_composition(spec, tmp_path / "model.toml")

    text = (tmp_path / "model.toml").read_text()
    assert f'features = "{features}"' in text and ("summary_token = true" in text) == summary_token
    assert ("summary_centroid = true" in text) == summary_centroid
    assert load_composition(tmp_path / "model.toml") == spec


def test_a_projector_yet_to_be_trained_may_be_missing_when_asked(tmp_path):
    path = write(tmp_path, 'decoder = "d"\n[vision]\nencoder = "e"\nprojector = "fresh"\n', projector=False)

    assert load_composition(path, require_projector=False).projector == tmp_path / "fresh"


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_composition(tmp_path / "absent.toml")


def test_load_vision_part_builds_a_local_clip_tower(tmp_path):
    save_tiny_tower(tmp_path / "clip", "clip")
    torch.manual_seed(0)
    save_projector(Projector("mlp2x_gelu", VISION_HIDDEN, TEXT_HIDDEN), tmp_path / "projector")
    path = tmp_path / "model.toml"
    path.write_text('decoder = "d"\n[vision]\nencoder = "clip"\nprojector = "projector"\n')

    vision = load_vision_part(load_composition(path), data_dir=tmp_path / "data")

    assert isinstance(vision, HFVisionTower)
    assert vision.encode([make_image(0)], "high").shape == (1, GRID**2, TEXT_HIDDEN)
