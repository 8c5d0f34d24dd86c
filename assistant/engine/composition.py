"""Composition files: a decoder and a vision encoder + projector put together by hand.

A composition file (TOML, conventionally ``model.toml``) names the parts; the
``--model`` option may point at one. A full example::

    # model.toml
    decoder = "../smollm2-135m-instruct"      # a local directory (relative to this file) or a hub id
    adapter = "adapter"                       # optional: a LoRA adapter of the decoder (peft's save_pretrained)

    [adapters]                                # optional: adapters by --quantize value, each used in place of
    nf4 = "adapter-nf4"                       #   `adapter` when the decoder is quantized so (e.g. trained QLoRA)

    [vision]
    encoder = "efficientnet-lite0"            # or a CLIP/SigLIP checkpoint: a directory or a hub id
    projector = "projector"                   # a directory written by save_projector (config.json + model.safetensors)
    feature_layer = -2                        # CLIP/SigLIP only: which hidden_states entry feeds the projector
    select = "default"                        # CLIP/SigLIP only: "default" drops CLIP's CLS token, "full" keeps it
    features = "head"                         # EfficientNet-Lite0 only: "head" (1280 wide), "multiscale" (1442)
                                              #   or "multiscale-colour" (1459)
    summary_token = false                     # EfficientNet-Lite0 only: one more token first, each feature's max
    summary_centroid = false                  # with summary_token and "multiscale-colour": its position channels
                                              #   say where the image's content is

Required: ``decoder``, ``[vision] encoder``, ``[vision] projector``; the others
take the defaults shown (no adapter: the decoder as it is; no ``[adapters]``: ``adapter`` whatever the
quantization). A relative path is resolved against the file's
directory. ``decoder`` and ``encoder`` are taken as local paths when they exist
there or start with ``.``, ``/`` or ``~``, and as hub ids otherwise. An unknown
key, a missing one, a wrong type or a missing projector or adapter directory
raise :class:`ValueError` naming the file and the key.

:func:`write_composition` writes a spec back (``assistant train`` writes one per
trained model); reading it back gives the same spec.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from assistant.engine import efficientnet
from assistant.engine.efficientnet import Progress
from assistant.engine.quantize import QUANTIZE_KINDS
from assistant.engine.vision import (EfficientNetVision, ProjectedVision, Projector, load_hf_vision_tower,
                                     load_projector)

EFFICIENTNET = "efficientnet-lite0"
SELECTS = ("default", "full")
KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


@dataclass(frozen=True)
class CompositionSpec:
    decoder: str  # an absolute local path or a hub id
    encoder: str  # "efficientnet-lite0", an absolute local path or a hub id
    projector: Path
    feature_layer: int = -2
    select: str = "default"
    adapter: Path | None = None  # a peft LoRA adapter directory of the decoder
    features: str = "head"  # EfficientNet-Lite0 only: efficientnet.FEATURE_SETS
    summary_token: bool = False  # EfficientNet-Lite0 only: EfficientNetVision's summary token
    summary_centroid: bool = False  # EfficientNet-Lite0 only: EfficientNetVision's summary_centroid
    adapters: dict[str, Path] = field(default_factory=dict)  # by quantization, in place of adapter

    def adapter_for(self, quantize: str) -> Path | None:
        """The adapter for a decoder quantized as ``quantize`` (a concrete --quantize value, not "auto")."""
        return self.adapters.get(quantize, self.adapter)


def load_composition(path: Path, *, require_projector: bool = True) -> CompositionSpec:
    """The spec of the file at ``path``; ``require_projector=False`` admits a projector directory that does not
    exist yet (``assistant train align`` starts a fresh projector there)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the composition file: {exc}") from exc
    base = path.parent.resolve()
    _check_keys(path, "", data, required={"decoder", "vision"}, allowed={"decoder", "vision", "adapter", "adapters"})
    vision = data["vision"]
    if not isinstance(vision, dict):
        raise ValueError(f"{path}: 'vision' must be a table ([vision])")
    _check_keys(path, "vision.", vision, required={"encoder", "projector"},
                allowed={"encoder", "projector", "feature_layer", "select", "features", "summary_token",
                         "summary_centroid"})
    decoder = _get(path, "decoder", data, str)
    encoder = _get(path, "vision.encoder", vision, str)
    projector = base / Path(_get(path, "vision.projector", vision, str)).expanduser()
    if require_projector and not projector.is_dir():
        raise ValueError(f"{path}: vision.projector: no projector directory at {projector}")
    adapter = _adapter(path, "adapter", data, base) if "adapter" in data else None
    by_quantize = data.get("adapters", {})
    if not isinstance(by_quantize, dict):
        raise ValueError(f"{path}: 'adapters' must be a table ([adapters]) of --quantize values")
    _check_keys(path, "adapters.", by_quantize, required=set(), allowed=set(QUANTIZE_KINDS))
    adapters = {kind: _adapter(path, f"adapters.{kind}", by_quantize, base) for kind in by_quantize}
    spec = CompositionSpec(
        decoder=_resolve(decoder, base),
        encoder=encoder if encoder == EFFICIENTNET else _resolve(encoder, base),
        projector=projector,
        feature_layer=_get(path, "vision.feature_layer", vision, int, -2),
        select=_get(path, "vision.select", vision, str, "default"),
        adapter=adapter,
        features=_get(path, "vision.features", vision, str, "head"),
        summary_token=_get(path, "vision.summary_token", vision, bool, False),
        summary_centroid=_get(path, "vision.summary_centroid", vision, bool, False),
        adapters=adapters,
    )
    if spec.select not in SELECTS:
        raise ValueError(f"{path}: vision.select must be one of {', '.join(SELECTS)}, got {spec.select!r}")
    if spec.features not in efficientnet.FEATURE_SETS:
        raise ValueError(f"{path}: vision.features must be one of {', '.join(efficientnet.FEATURE_SETS)}, "
                         f"got {spec.features!r}")
    if spec.summary_centroid and not (spec.summary_token and spec.features == "multiscale-colour"):
        raise ValueError(f"{path}: vision.summary_centroid needs summary_token = true and features = "
                         f"\"multiscale-colour\"")
    for key, is_set in (("features", spec.features != "head"), ("summary_token", spec.summary_token)):
        if is_set and spec.encoder != EFFICIENTNET:
            raise ValueError(f"{path}: vision.{key} is for {EFFICIENTNET}; a CLIP or SigLIP encoder takes "
                             f"feature_layer and select")
    if not decoder or not encoder:
        raise ValueError(f"{path}: decoder and vision.encoder must not be empty")
    return spec


def _adapter(path: Path, key: str, table: dict[str, Any], base: Path) -> Path:
    adapter = base / Path(_get(path, key, table, str)).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{path}: {key}: no LoRA adapter (adapter_config.json) at {adapter}")
    return adapter


def write_composition(spec: CompositionSpec, path: Path) -> None:
    """Write ``spec`` as a composition file at ``path``; projector and adapter inside its folder become relative."""
    path = Path(path)
    base = path.parent.resolve()

    def quoted(path: Path) -> str:  # a JSON string is a valid TOML basic string
        path = path.resolve()
        return json.dumps(str(path.relative_to(base) if path.is_relative_to(base) else path))

    lines = [f"decoder = {json.dumps(spec.decoder)}"]
    if spec.adapter is not None:
        lines.append(f"adapter = {quoted(spec.adapter)}")
    if spec.adapters:
        lines += ["", "[adapters]", *(f"{json.dumps(kind)} = {quoted(path)}" for kind, path in spec.adapters.items())]
    lines += ["", "[vision]", f"encoder = {json.dumps(spec.encoder)}", f"projector = {quoted(spec.projector)}",
              f"feature_layer = {spec.feature_layer}", f"select = {json.dumps(spec.select)}"]
    if spec.features != "head":
        lines.append(f"features = {json.dumps(spec.features)}")
    if spec.summary_token:
        lines.append("summary_token = true")
    if spec.summary_centroid:
        lines.append("summary_centroid = true")
    path.write_text("\n".join(lines) + "\n")


def load_vision_part(spec: CompositionSpec, *, data_dir: Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, progress: Progress = print,
                     projector: Projector | None = None) -> ProjectedVision:
    """Build the spec's encoder + projector (pulling EfficientNet-Lite0's weights on first use); ``projector``
    replaces the spec's."""
    projector = projector if projector is not None else load_projector(spec.projector)
    if spec.encoder == EFFICIENTNET:
        backbone = efficientnet.load_efficientnet_lite0(efficientnet.pull_efficientnet_weights(data_dir, progress))
        return EfficientNetVision(backbone.to(device, dtype), projector.to(device, dtype), spec.features,
                                  spec.summary_token, spec.summary_centroid)
    return load_hf_vision_tower(spec.encoder, projector, feature_layer=spec.feature_layer,
                                select=spec.select, device=device, dtype=dtype)  # type: ignore[arg-type]


def encoder_width(spec: CompositionSpec) -> int:
    """Width of the spec's encoder features: what its projector takes (``in_dim``)."""
    if spec.encoder == EFFICIENTNET:
        return efficientnet.FEATURE_SETS[spec.features]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.encoder)
    return int((getattr(config, "vision_config", None) or config).hidden_size)  # a two-tower CLIP, or the tower


def _resolve(value: str, base: Path) -> str:
    local = base / Path(value).expanduser()
    if local.exists() or value.startswith((".", "/", "~")):
        return str(local.resolve())
    return value  # a hub id


def _check_keys(path: Path, prefix: str, table: dict[str, Any], *, required: set[str], allowed: set[str]) -> None:
    missing = sorted(required - table.keys())
    if missing:
        raise ValueError(f"{path}: missing {', '.join(prefix + key for key in missing)}")
    unknown = sorted(table.keys() - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key {', '.join(prefix + key for key in unknown)}; "
                         f"expected {', '.join(prefix + key for key in sorted(allowed))}")


def _get(path: Path, name: str, table: dict[str, Any], kind: type, default: Any = None) -> Any:
    value = table.get(name.rsplit(".", 1)[-1], default)
    # bool is an int in Python; a feature layer of `true` is a mistake, not layer 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{path}: {name} must be {KIND_NAMES[kind]}, got {value!r}")
    return value
