"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding

- ``trainable.safetensors``: every trainable parameter (projector, LoRA) in float32, by name;
- ``optimizer.pt``: the optimizer's state dict;
- ``rng.pt``: the torch RNG states (CPU, and CUDA when present): LoRA dropout draws from them;
- ``state.json``: the step, and the run's settings (what :func:`check_same_run` compares).

It is written to ``step-NNNNNNNN.partial`` and renamed when complete, so the latest
folder without that suffix is always whole. Only the newest :data:`KEEP_CHECKPOINTS`
are kept. Data order needs no state: each epoch's order is a function of the seed
and the epoch (:mod:`assistant.training.trainer`), so restoring the parameters, the
optimizer, the RNG and the step continues a run bit for bit on the same device.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

KEEP_CHECKPOINTS = 2
PREFIX = "step-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    settings: dict[str, Any]


def save_checkpoint(directory: Path, step: int, parameters: dict[str, nn.Parameter],
                    optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> Path:
    """Write the checkpoint of ``step`` under ``directory`` and drop all but the newest few."""
    final = directory / f"{PREFIX}{step:08d}"
    partial = final.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({name: p.detach().to("cpu", torch.float32).contiguous() for name, p in parameters.items()},
              partial / "trainable.safetensors")
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, partial / "rng.pt")
    (partial / "state.json").write_text(json.dumps({"step": step, "settings": settings}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(directory)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old.path)
    return final


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """The complete checkpoints under ``directory``, oldest first."""
    found = []
    for path in directory.glob(f"{PREFIX}*"):
        if path.suffix == ".partial" or not (path / "state.json").is_file():
            continue
        state = json.loads((path / "state.json").read_text())
        found.append(Checkpoint(path, int(state["step"]), state["settings"]))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def check_same_run(checkpoint: Checkpoint, settings: dict[str, Any]) -> None:
    """Raise ValueError naming every setting that differs from the run the checkpoint belongs to."""
    differences = [f"{key}: {checkpoint.settings.get(key)!r} then, {value!r} now"
                   for key, value in settings.items() if checkpoint.settings.get(key) != value]
    if differences:
        raise ValueError(f"--resume continues the run in {checkpoint.path.parent.parent} with the settings it was "
                         f"started with, and these differ: {'; '.join(differences)}")


def restore_checkpoint(checkpoint: Checkpoint, parameters: dict[str, nn.Parameter],
                       optimizer: torch.optim.Optimizer) -> None:
    """Load parameters, optimizer state and RNG state from ``checkpoint`` (in place)."""
    saved = load_file(checkpoint.path / "trainable.safetensors")
    if saved.keys() != parameters.keys():
        raise ValueError(f"{checkpoint.path} holds other parameters than this run trains "
                         f"({len(saved)} saved, {len(parameters)} trained)")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name])
    optimizer.load_state_dict(torch.load(checkpoint.path / "optimizer.pt", weights_only=True))
    rng = torch.load(checkpoint.path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
