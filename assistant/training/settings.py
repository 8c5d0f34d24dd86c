"""The settings of one training run: frozen, checked on construction, built once by the CLI.

Torch-free, so that building the command line parser stays fast. A setting that
cannot work raises :class:`TrainingRefused` with a message that says what to
change, before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("align", "finetune")
DEFAULT_LR = {"align": 1e-3, "finetune": 2e-4}  # LLaVA-1.5's projector pre-training and LoRA rates
QUANTIZE_CHOICES = ("none", "nf4")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


class TrainingRefused(ValueError):
    """The run cannot start: the message says what to change."""


@dataclass(frozen=True)
class TrainSettings:
    stage: str
    model: Path  # a composition file, or a directory holding model.toml
    data: tuple[Path, ...]
    out: Path
    heldout: Path | None = None
    epochs: int = 1
    steps: int | None = None  # overrides epochs
    batch_size: int = 8
    lr: float | None = None  # default: DEFAULT_LR[stage]
    projector_lr: float | None = None  # finetune: the projector's peak rate (default: lr), as LLaVA's mm_projector_lr;
    # 0 freezes the projector (an adapter alone trains: e.g. one for a quantized decoder that shares the projector)
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    dtype: str = "auto"  # of the frozen decoder weights (and nf4's compute): see _pick_dtype
    checkpoint_every: int = 100
    lora_rank: int = 8
    quantize: str = "none"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TrainingRefused(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if not self.data:
            raise TrainingRefused("give at least one --data file")
        for name in ("epochs", "batch_size", "checkpoint_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise TrainingRefused(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise TrainingRefused(f"--steps must be at least 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise TrainingRefused(f"--lr must be positive, got {self.lr}")
        if self.projector_lr is not None and not (self.projector_lr >= 0 and self.stage == "finetune"):
            raise TrainingRefused(f"--projector-lr is for finetune and must be positive or 0 (a frozen projector), "
                                  f"got {self.projector_lr}")
        if self.quantize not in QUANTIZE_CHOICES or (self.quantize != "none" and self.stage != "finetune"):
            raise TrainingRefused(f"--quantize is nf4 or none, and only for finetune; got {self.quantize!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise TrainingRefused(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    @property
    def trains_projector(self) -> bool:
        return self.projector_learning_rate > 0

    @property
    def projector_learning_rate(self) -> float:
        return self.projector_lr if self.projector_lr is not None else self.learning_rate

    def run_identity(self, dtype: str) -> dict[str, object]:
        """What makes a run this run: the settings --resume must find unchanged (device and
        checkpoint_every may change; ``dtype`` is the one resolved from "auto")."""
        return {"stage": self.stage, "model": str(self.model_file.resolve()),
                "data": [str(Path(p).resolve()) for p in self.data],
                "heldout": str(Path(self.heldout).resolve()) if self.heldout else None, "epochs": self.epochs,
                "steps": self.steps, "batch_size": self.batch_size, "lr": self.learning_rate,
                **({"projector_lr": self.projector_lr} if self.projector_lr is not None else {}), "seed": self.seed,
                "lora_rank": self.lora_rank, "quantize": self.quantize, "dtype": dtype}

    @property
    def model_file(self) -> Path:
        model = Path(self.model).expanduser()
        return model / "model.toml" if model.is_dir() else model
