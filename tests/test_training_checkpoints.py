"""Checkpoints: what is saved comes back exactly; only the newest are kept; another run's checkpoint is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from assistant.training.checkpoints import (KEEP_CHECKPOINTS, check_same_run, latest_checkpoint, list_checkpoints,
                                            restore_checkpoint, save_checkpoint)

SETTINGS = {"stage": "align", "seed": 0, "batch_size": 4}


def trained_layer(steps: int) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    for _ in range(steps):
        layer(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return layer, optimizer


def test_a_restored_run_continues_exactly(tmp_path: Path) -> None:
    layer, optimizer = trained_layer(3)
    save_checkpoint(tmp_path, 3, dict(layer.named_parameters()), optimizer, SETTINGS)
    expected = torch.randn(4, 3)  # what the RNG draws next

    fresh, fresh_optimizer = trained_layer(0)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.step == 3 and checkpoint.settings == SETTINGS
    restore_checkpoint(checkpoint, dict(fresh.named_parameters()), fresh_optimizer)

    assert torch.equal(torch.randn(4, 3), expected)
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), fresh.parameters(), strict=True))
    for model, opt in ((layer, optimizer), (fresh, fresh_optimizer)):
        model(expected).pow(2).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), fresh.parameters(), strict=True))


def test_only_the_newest_checkpoints_are_kept_and_partial_ones_are_ignored(tmp_path: Path) -> None:
    layer, optimizer = trained_layer(1)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, dict(layer.named_parameters()), optimizer, SETTINGS)
    (tmp_path / "step-00000008.partial").mkdir()  # a run killed while writing

    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 4, 6][-KEEP_CHECKPOINTS:]
    assert latest_checkpoint(tmp_path).step == 6  # type: ignore[union-attr]
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_resuming_with_other_settings_names_each_difference(tmp_path: Path) -> None:
    layer, optimizer = trained_layer(1)
    save_checkpoint(tmp_path, 1, dict(layer.named_parameters()), optimizer, SETTINGS)

    with pytest.raises(ValueError, match=r"seed: 0 then, 1 now; batch_size: 4 then, 8 now"):
        check_same_run(latest_checkpoint(tmp_path), {**SETTINGS, "seed": 1, "batch_size": 8})  # type: ignore[arg-type]
    check_same_run(latest_checkpoint(tmp_path), SETTINGS)  # type: ignore[arg-type]
