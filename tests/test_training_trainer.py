"""Training runs end to end on a tiny Llama + tiny CLIP tower: the loss falls, images are encoded once, a resumed
run ends where an uninterrupted one does, bad data is reported and skipped, and the output serves."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import assistant.training.trainable as trainable_module
from assistant.config import Config
from assistant.engine.engine import Engine
from assistant.engine.composition import load_composition
from assistant.engine.loader import load_chat_model, load_model
from assistant.engine.request import ChatMessage, TextChunk
from assistant.engine.vision import HFVisionTower
from assistant.models import default_data_dir
from assistant.training.checkpoints import save_checkpoint
from assistant.training.settings import TrainingRefused
from assistant.training.trainer import _pick_dtype, train
from tests.engine_fixtures import save_tiny_chat_model
from tests.training_fixtures import config, entry, save_tiny_composition, settings, write_data, write_llava
from tests.vision_fixtures import IMAGES, generate, image_chunk, make_image


@pytest.fixture(scope="module")
def composition(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_composition(tmp_path_factory.mktemp("composition"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("synth"))


def losses(lines: list[str], kind: str) -> list[float]:
    return [float(match) for line in lines for match in re.findall(rf"{kind} loss ([0-9.]+)", line)]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(directory.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def look_at_image(question: str = "What is in this picture?") -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", (TextChunk(question), image_chunk(make_image(1)))),)


def test_align_lowers_the_heldout_loss_and_writes_a_composition(composition: Path, data: Path,
                                                                tmp_path: Path) -> None:
    lines: list[str] = []
    result = train(settings("align", composition, data / "captions.json", tmp_path / "out", steps=6,
                            checkpoint_every=2, heldout=data / "captions.json", lr=3e-3),
                   config(tmp_path / "home"), report=lines.append)

    heldout = losses(lines, "held-out")
    assert len(heldout) == 3 and heldout[-1] < heldout[0] and result.heldout_loss == pytest.approx(heldout[-1], abs=1e-4)
    assert result.steps == 6 and result.num_sequences == 8 and result.seconds_per_step > 0
    written = (tmp_path / "out" / "model.toml").read_text()
    assert f'decoder = "{composition.parent / "decoder"}"' in written and "adapter" not in written
    assert 'projector = "projector"' in written and (tmp_path / "out" / "projector" / "model.safetensors").is_file()


def test_the_encoder_sees_each_image_once_across_epochs_and_runs(composition: Path, data: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[int] = []
    features = HFVisionTower.features

    def counting(self: HFVisionTower, images: list) -> torch.Tensor:
        encoded.append(len(images))
        return features(self, images)

    monkeypatch.setattr(HFVisionTower, "features", counting)
    home = config(tmp_path / "home")
    train(settings("align", composition, data / "captions.json", tmp_path / "one", epochs=3), home,
          report=lambda _: None)
    train(settings("finetune", composition, data / "qa.json", tmp_path / "two", steps=1), home,
          report=lambda _: None)

    assert sum(encoded) == 8  # 8 images, 6 align steps over 3 epochs, then another run and stage


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(composition: Path, data: Path,
                                                                    tmp_path: Path) -> None:
    """finetune: projector + LoRA with dropout, so the optimizer, the RNG and the data order must all come back."""
    home = config(tmp_path / "home")
    whole = train(settings("finetune", composition, data / "qa.json", tmp_path / "whole", steps=4,
                           checkpoint_every=2), home, report=lambda _: None)
    # An interrupted run: what the uninterrupted one had on disk after its step-2 checkpoint.
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-00000002",
                    tmp_path / "cut" / "checkpoints" / "step-00000002")
    lines: list[str] = []

    resumed = train(settings("finetune", composition, data / "qa.json", tmp_path / "cut", steps=4,
                             checkpoint_every=2, resume=True), home, report=lines.append)

    assert "resuming from step 2" in " ".join(lines) and resumed.steps == whole.steps == 4
    assert resumed.train_loss == whole.train_loss
    for part in ("projector", "adapter"):
        expected, actual = tensors(tmp_path / "whole" / part), tensors(tmp_path / "cut" / part)
        assert expected.keys() == actual.keys() and expected
        assert all(torch.equal(expected[name], actual[name]) for name in expected), part


def test_a_run_never_overwrites_another_and_resumes_only_its_own(composition: Path, data: Path,
                                                                 tmp_path: Path) -> None:
    layer = nn.Linear(2, 2)
    save_checkpoint(tmp_path / "out" / "checkpoints", 2, dict(layer.named_parameters()),
                    torch.optim.AdamW(layer.parameters()), {"stage": "align", "batch_size": 16})
    home = config(tmp_path / "home")

    with pytest.raises(TrainingRefused, match="already holds checkpoints of a run .step 2.; pass --resume"):
        train(settings("align", composition, data / "captions.json", tmp_path / "out"), home)
    with pytest.raises(ValueError, match="batch_size: 16 then, 4 now"):
        train(settings("align", composition, data / "captions.json", tmp_path / "out", resume=True), home)
    with pytest.raises(TrainingRefused, match="no checkpoint"):
        train(settings("align", composition, data / "captions.json", tmp_path / "new", resume=True), home)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_dtype_is_float32_on_a_cpu_that_only_emulates_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert _pick_dtype("auto", "cpu") == "float32"
    assert _pick_dtype("bfloat16", "cpu") == "bfloat16"  # asked for, given
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert _pick_dtype("auto", "cpu") == "bfloat16"


def test_cuda_without_a_gpu_is_refused_up_front(composition: Path, data: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingRefused, match="no CUDA device; use --device cpu"):
        train(settings("align", composition, data / "captions.json", tmp_path / "out", device="cuda"),
              config(tmp_path / "home"))


def test_bad_entries_are_warned_about_with_their_location_and_skipped(composition: Path, data: Path,
                                                                      tmp_path: Path) -> None:
    images = f"{data}/images"
    path = write_llava(tmp_path / "mixed.json", [
        entry(f"{images}/000000.png", "<image>\nDescribe it.", "A shape."),
        entry(f"{images}/missing.png", "<image>\nDescribe it.", "A shape."),
        entry(f"{images}/000001.png", "Describe it.", "A shape."),
        entry(f"{images}/000002.png", "<image>\nDescribe it.", ""),
        entry(f"{images}/000003.png", "<image>\nDescribe it.", "A shape."),
    ])
    lines: list[str] = []

    result = train(settings("align", composition, path, tmp_path / "out", steps=1), config(tmp_path / "home"),
                   report=lines.append)

    warnings = [line for line in lines if line.startswith("warning: skipped")]
    assert [w.split(":")[1].strip() for w in warnings] == [f"skipped {path} entry {n}" for n in (2, 3, 4)]
    assert result.num_sequences == 2 and len(result.problems) == 3
    assert (tmp_path / "out" / "data-problems.txt").read_text().count(str(path)) == 3


def test_data_without_a_usable_entry_is_refused_before_training(composition: Path, tmp_path: Path) -> None:
    path = write_llava(tmp_path / "bad.json", [entry("missing.png", "<image>\nWhat?", "x")])

    with pytest.raises(TrainingRefused, match=r"bad\.json: no usable entry"):
        train(settings("align", composition, path, tmp_path / "out"), config(tmp_path / "home"))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_align_then_qlora_finetune_gives_a_model_that_serves(composition: Path, data: Path, tmp_path: Path) -> None:
    home = config(tmp_path / "home")
    train(settings("align", composition, data / "captions.json", tmp_path / "aligned", steps=2), home,
          report=lambda _: None)
    lines: list[str] = []
    train(settings("finetune", tmp_path / "aligned", data / "qa.json", tmp_path / "tuned", steps=2,
                   quantize="nf4", dtype="bfloat16"), home, report=lines.append)
    model_file = tmp_path / "tuned" / "model.toml"
    assert 'adapter = "adapter"' in model_file.read_text()
    # nf4 trains on this CPU; where bitsandbytes cannot, the run says so and trains the unquantized decoder.
    assert any("(bfloat16, nf4)" in line for line in lines) or any("nf4 cannot train" in line for line in lines)

    for quantize in ("none", "nf4"):  # the adapter stays beside the base layers, to be switched per sequence
        model = load_model(Config(model=str(model_file), data_dir=tmp_path / "home", device="cpu",
                                  dtype="float32" if quantize == "none" else "bfloat16", quantize=quantize),
                           progress=lambda _: None)
        assert type(model.hf_model).__name__ == "LlamaForCausalLM" and model.has_image_adapter
        text, finished = generate(Engine(model), look_at_image())
        assert text and finished.num_image_tokens == 16


def test_the_adapter_applies_to_conversations_with_images_only(composition: Path, data: Path,
                                                                tmp_path: Path) -> None:
    home = config(tmp_path / "home")
    train(settings("finetune", composition, data / "qa.json", tmp_path / "tuned", steps=3, lr=1e-2), home,
          report=lambda _: None)
    model = load_model(Config(model=str(tmp_path / "tuned" / "model.toml"), data_dir=tmp_path / "home",
                              device="cpu", dtype="float32", quantize="none"), progress=lambda _: None)
    decoder = load_chat_model(load_composition(tmp_path / "tuned" / "model.toml").decoder, dtype="float32")
    text_only = (ChatMessage("user", (TextChunk("Hello there"),)),)
    with_image = model.render(look_at_image(), model.max_context_tokens)
    image_embeds, _ = model.encode_images(with_image.images, IMAGES)  # (16, C)
    embeds = model.embed(with_image, image_embeds)  # (1, T, C)

    for _ in range(2):  # and again after an image turn switched the adapter on
        logits, _ = model.prefill(model.render(text_only, model.max_context_tokens))
        expected, _ = decoder.prefill(decoder.render(text_only, decoder.max_context_tokens))
        assert torch.equal(logits, expected)  # exactly the decoder without the vision part
        with torch.inference_mode():
            on = model.forward(has_images=True, inputs_embeds=embeds).logits
            off = model.forward(has_images=False, inputs_embeds=embeds).logits
        assert not torch.allclose(on, off)  # the trained adapter changes what an image turn gets
        model.prefill(with_image, image_embeds)


def test_nf4_that_cannot_train_here_falls_back_to_the_unquantized_decoder(composition: Path, data: Path,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_backward(_: object) -> None:
        raise NotImplementedError("no nf4 backward on this device")

    monkeypatch.setattr(trainable_module, "_try_one_step", no_backward)
    lines: list[str] = []

    result = train(settings("finetune", composition, data / "qa.json", tmp_path / "out", steps=1, quantize="nf4"),
                   config(tmp_path / "home"), report=lines.append)

    assert any("nf4 cannot train here (NotImplementedError: no nf4 backward on this device); training the LoRA "
               "adapter on the unquantized decoder" in line for line in lines)
    assert result.steps == 1 and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_the_projector_learns_at_its_own_rate_when_given_one(composition: Path, data: Path, tmp_path: Path) -> None:
    """--projector-lr: the projector moves at its rate while the adapter keeps --lr (here next to nothing)."""
    home = config(tmp_path / "home")
    train(settings("align", composition, data / "captions.json", tmp_path / "aligned", steps=1), home,
          report=lambda _: None)
    for name, projector_lr in (("same", None), ("own", 1e-2)):
        train(settings("finetune", tmp_path / "aligned", data / "qa.json", tmp_path / name, steps=2, lr=1e-9,
                       projector_lr=projector_lr), home, report=lambda _: None)
    same, own = (tensors(tmp_path / name / "projector") for name in ("same", "own"))
    assert max((own[key] - same[key]).abs().max().item() for key in same) > 1e-3
    same_adapter, own_adapter = (tensors(tmp_path / name / "adapter") for name in ("same", "own"))
    assert all(torch.allclose(own_adapter[key], same_adapter[key], atol=1e-6) for key in same_adapter)
    assert '"projector_lr": 0.01' in (tmp_path / "own" / "train.json").read_text()
    with pytest.raises(TrainingRefused, match="--projector-lr is for finetune and must be positive"):
        settings("align", composition, data / "captions.json", tmp_path / "x", projector_lr=1e-2)
    with pytest.raises(TrainingRefused, match="--projector-lr is for finetune and must be positive or 0"):
        settings("finetune", composition, data / "qa.json", tmp_path / "x", projector_lr=-1e-3)


def lora_weight(model_or_dir: object, layer: str = "layers.0.self_attn.q_proj") -> torch.Tensor:
    """One LoRA A matrix: from a loaded model's layers, or from an adapter directory's file."""
    if isinstance(model_or_dir, Path):
        return next(t for name, t in tensors(model_or_dir).items() if f"{layer}.lora_A" in name)
    return next(p for name, p in model_or_dir.hf_model.named_parameters()  # type: ignore[attr-defined]
                if f"{layer}.lora_A" in name).detach()


def test_an_adapter_trained_on_nf4_with_the_projector_frozen_serves_nf4_in_place_of_the_other(
        composition: Path, data: Path, tmp_path: Path) -> None:
    """--projector-lr 0 with --quantize nf4 (the default model's stage 9): the projector stays as it was, the
    adapter trains; [adapters] nf4 names it, and only a decoder quantized nf4 gets it."""
    home = config(tmp_path / "home")
    train(settings("finetune", composition, data / "qa.json", tmp_path / "tuned", steps=2), home,
          report=lambda _: None)
    lines: list[str] = []
    train(settings("finetune", tmp_path / "tuned", data / "qa.json", tmp_path / "nf4", steps=3, lr=1e-2,
                   projector_lr=0.0, quantize="nf4", dtype="bfloat16"), home, report=lines.append)
    tuned, nf4 = (tensors(tmp_path / name / "projector") for name in ("tuned", "nf4"))
    assert all(torch.equal(tuned[key], nf4[key]) for key in tuned)  # frozen
    assert not torch.allclose(lora_weight(tmp_path / "tuned" / "adapter"), lora_weight(tmp_path / "nf4" / "adapter"))
    assert "adapters" not in (tmp_path / "nf4" / "model.toml").read_text()
    model_file = tmp_path / "tuned" / "model.toml"
    model_file.write_text(model_file.read_text().replace("\n\n[vision]", '\n\n[adapters]\nnf4 = "../nf4/adapter"\n\n'
                                                                           "[vision]"))

    for quantize, adapter in (("nf4", "nf4"), ("none", "tuned")):
        said: list[str] = []
        model = load_model(Config(model=str(model_file), data_dir=tmp_path / "home", device="cpu",
                                  dtype="float32" if quantize == "none" else "bfloat16", quantize=quantize),
                           progress=said.append)
        expected = lora_weight(tmp_path / adapter / "adapter")
        assert torch.allclose(lora_weight(model).float(), expected.float(), atol=1e-2)
        assert any("the adapter for nf4" in line for line in said) == (quantize == "nf4")
        text, finished = generate(Engine(model), look_at_image())
        assert text and finished.num_image_tokens == 16


@pytest.mark.real_model
@pytest.mark.usefixtures("efficientnet_weights_path")
def test_efficientnet_lite0_aligns_with_a_decoder(data: Path, tmp_path: Path) -> None:
    """The real encoder: (49, 1280) features per image, a fresh 1280 → 64 projector that learns."""
    (tmp_path / "model.toml").write_text('decoder = "decoder"\n[vision]\nencoder = "efficientnet-lite0"\n'
                                         'projector = "projector"\n')
    save_tiny_chat_model(tmp_path / "decoder", max_position_embeddings=1024)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(default_data_dir() / "models")  # the pulled weights; a fresh cache
    home = config(tmp_path / "home")
    lines: list[str] = []

    train(settings("align", tmp_path / "model.toml", data / "captions.json", tmp_path / "out", steps=4,
                   checkpoint_every=2, heldout=data / "captions.json", lr=3e-3), home, report=lines.append)

    heldout = losses(lines, "held-out")
    assert heldout[-1] < heldout[0]
    model = load_model(Config(model=str(tmp_path / "out" / "model.toml"), data_dir=tmp_path / "home", device="cpu",
                              dtype="float32", quantize="none"), progress=lambda _: None)
    _, finished = generate(Engine(model), look_at_image())
    assert finished.num_image_tokens == 49


@pytest.mark.real_model
@pytest.mark.usefixtures("efficientnet_weights_path")
def test_a_projector_of_narrower_efficientnet_features_is_widened_and_trains_on(data: Path, tmp_path: Path) -> None:
    """A "multiscale" projector under a "multiscale-colour" composition (with the summary centroid): widened (the
    new inputs at zero weight, what it learnt kept), then fine-tuned; the output serves with the same features."""
    from transformers import AutoConfig

    from assistant.engine.vision import Projector, load_projector, save_projector

    save_tiny_chat_model(tmp_path / "decoder", max_position_embeddings=1024)
    torch.manual_seed(0)
    narrow = Projector("mlp2x_gelu", 1442, AutoConfig.from_pretrained(tmp_path / "decoder").hidden_size)
    save_projector(narrow, tmp_path / "projector")
    (tmp_path / "model.toml").write_text('decoder = "decoder"\n[vision]\nencoder = "efficientnet-lite0"\n'
                                         'projector = "projector"\nfeatures = "multiscale-colour"\n'
                                         'summary_token = true\nsummary_centroid = true\n')
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").symlink_to(default_data_dir() / "models")
    lines: list[str] = []

    train(settings("finetune", tmp_path / "model.toml", data / "qa.json", tmp_path / "out", steps=2,
                   checkpoint_every=2, lr=3e-3), config(tmp_path / "home"), report=lines.append)

    assert any("the projector takes 1442 features, multiscale-colour gives 1459: widening it, the 17 new inputs "
               "start at zero weight" in line for line in lines)
    assert any("adding a shortcut from the 17 colour channels to the projector's output, the hues' starting at the "
               "decoder's embeddings of red, orange, yellow, green, cyan, blue, purple, pink (length" in line
               for line in lines)
    wide = load_projector(tmp_path / "out" / "projector")
    assert wide.in_dim == 1459 and wide[0].weight[:, 1442:].abs().sum() > 0  # the new inputs trained
    assert wide.shortcut_dim == 17
    trained = load_file(tmp_path / "out" / "projector" / "model.safetensors")["shortcut.weight"]
    # Resuming the finished run rebuilds the shortcut before restoring the checkpoint into it: the same weights.
    train(settings("finetune", tmp_path / "model.toml", data / "qa.json", tmp_path / "out", steps=2,
                   checkpoint_every=2, lr=3e-3, resume=True), config(tmp_path / "home"), report=lines.append)
    assert load_file(tmp_path / "out" / "projector" / "model.safetensors")["shortcut.weight"].equal(trained)
    model = load_model(Config(model=str(tmp_path / "out" / "model.toml"), data_dir=tmp_path / "home", device="cpu",
                              dtype="float32", quantize="none"), progress=lambda _: None)
    assert model.vision.summary_centroid and "summary_centroid = true" in (tmp_path / "out" / "model.toml").read_text()
    _, finished = generate(Engine(model), look_at_image())
    assert finished.num_image_tokens == 50
