"""Composition files: a decoder and a vision encoder + projector put together by hand.

A composition file (TOML, conventionally ``model.toml``) names the parts; the
``--model`` option may point at one. A full example::

    # model.toml
    decoder = "../smollm2-135m-instruct"      # a local directory (relative to this file) or a hub id

    [vision]
    encoder = "efficientnet-lite0"            # or a CLIP/SigLIP checkpoint: a directory or a hub id
    projector = "projector"                   # a directory written by save_projector (config.json + model.safetensors)
    feature_layer = -2                        # CLIP/SigLIP only: which hidden_states entry feeds the projector
    select = "default"                        # CLIP/SigLIP only: "default" drops CLIP's CLS token, "full" keeps it

Required: ``decoder``, ``[vision] encoder``, ``[vision] projector``; the others
take the defaults shown. A relative path is resolved against the file's
directory. ``decoder`` and ``encoder`` are taken as local paths when they exist
there or start with ``.``, ``/`` or ``~``, and as hub ids otherwise. An unknown
key, a missing one, a wrong type or a missing projector directory raise
:class:`ValueError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from assistant.engine import efficientnet
from assistant.engine.efficientnet import Progress
from assistant.engine.vision import EfficientNetVision, GridVision, load_hf_vision_tower, load_projector

EFFICIENTNET = "efficientnet-lite0"
SELECTS = ("default", "full")
KIND_NAMES = {str: "a string", int: "an integer"}


@dataclass(frozen=True)
class CompositionSpec:
    decoder: str  # an absolute local path or a hub id
    encoder: str  # "efficientnet-lite0", an absolute local path or a hub id
    projector: Path
    feature_layer: int = -2
    select: str = "default"


def load_composition(path: Path) -> CompositionSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the composition file: {exc}") from exc
    base = path.parent.resolve()
    _check_keys(path, "", data, required={"decoder", "vision"}, allowed={"decoder", "vision"})
    vision = data["vision"]
    if not isinstance(vision, dict):
        raise ValueError(f"{path}: 'vision' must be a table ([vision])")
    _check_keys(path, "vision.", vision, required={"encoder", "projector"},
                allowed={"encoder", "projector", "feature_layer", "select"})
    decoder = _get(path, "decoder", data, str)
    encoder = _get(path, "vision.encoder", vision, str)
    projector = base / Path(_get(path, "vision.projector", vision, str)).expanduser()
    if not projector.is_dir():
        raise ValueError(f"{path}: vision.projector: no projector directory at {projector}")
    spec = CompositionSpec(
        decoder=_resolve(decoder, base),
        encoder=encoder if encoder == EFFICIENTNET else _resolve(encoder, base),
        projector=projector,
        feature_layer=_get(path, "vision.feature_layer", vision, int, -2),
        select=_get(path, "vision.select", vision, str, "default"),
    )
    if spec.select not in SELECTS:
        raise ValueError(f"{path}: vision.select must be one of {', '.join(SELECTS)}, got {spec.select!r}")
    if not decoder or not encoder:
        raise ValueError(f"{path}: decoder and vision.encoder must not be empty")
    return spec


def load_vision_part(spec: CompositionSpec, *, data_dir: Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, progress: Progress = print) -> GridVision:
    """Build the spec's encoder + projector (pulling EfficientNet-Lite0's weights on first use)."""
    projector = load_projector(spec.projector)
    if spec.encoder == EFFICIENTNET:
        backbone = efficientnet.load_efficientnet_lite0(efficientnet.pull_efficientnet_weights(data_dir, progress))
        return EfficientNetVision(backbone.to(device, dtype), projector.to(device, dtype))
    return load_hf_vision_tower(spec.encoder, projector, feature_layer=spec.feature_layer,
                                select=spec.select, device=device, dtype=dtype)  # type: ignore[arg-type]


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
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{path}: {name} must be {KIND_NAMES[kind]}, got {value!r}")
    return value
