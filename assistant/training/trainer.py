"""The training run: data in, a composition that ``assistant serve --model DIR/model.toml`` loads, out.

:func:`train` does, in order, refusing up front whatever it can:

1. read the settings' composition file (or ``DIR/model.toml``), check ``--resume``
   against the checkpoints already in ``out`` (a run never overwrites another),
   and read the data files: a file without a usable entry is refused;
2. load the parts for the stage (:mod:`assistant.training.trainable`);
3. render the sequences (:mod:`assistant.training.examples`) and encode every
   image not in the feature cache (:mod:`assistant.training.features`); every bad
   entry met so far is reported with its location and skipped, and all of them are
   listed in ``out/data-problems.txt``; no usable entry at all is refused;
4. train (:class:`TrainingLoop`): AdamW, linear warm-up over the first 3 % of the steps then cosine decay
   to zero, gradients clipped to norm 1; every ``checkpoint_every`` steps and at
   the end, the held-out loss is reported and a checkpoint written
   (:mod:`assistant.training.checkpoints`);
5. write ``out/projector/``, ``out/adapter/`` (when the decoder has one), and
   ``out/model.toml`` naming the same decoder and encoder, plus ``out/train.json``
   (the settings and the final losses).

Each epoch visits the training sequences in an order drawn from the seed and the
epoch alone, so a resumed run sees the batches an uninterrupted one would. The
held-out set is ``--heldout`` (its first :data:`MAX_HELDOUT_SEQUENCES`), else a
fixed split of the data (:func:`~assistant.training.examples.split_heldout`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from assistant.config import Config
from assistant.data.llava import DataError, DataProblem, Example
from assistant.engine.composition import CompositionSpec, load_composition, write_composition
from assistant.engine.loader import pick_device
from assistant.engine.vision import save_projector
from assistant.prompts import load_system_prompt
from assistant.training.checkpoints import (Checkpoint, check_same_run, latest_checkpoint, restore_checkpoint,
                                            save_checkpoint)
from assistant.training.examples import (TrainingSequence, build_sequences, collate, read_examples,
                                         split_heldout)
from assistant.training.features import FeatureCache
from assistant.training.settings import TrainingRefused, TrainSettings
from assistant.training.trainable import TrainableModel, add_colour_words, load_trainable, needs_colour_words

Report = Callable[[str], None]

WARMUP_SHARE = 0.03
MAX_GRAD_NORM = 1.0
MAX_HELDOUT_SEQUENCES = 256
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class TrainResult:
    steps: int
    train_loss: float  # mean over the steps since the last report (nan when a finished run is only rewritten)
    heldout_loss: float | None
    model_file: Path  # out/model.toml
    seconds_per_step: float  # mean of this invocation's training steps (without held-out losses and checkpoints)
    num_sequences: int
    problems: list[DataProblem] = field(default_factory=list)


class TrainingLoop:
    """A run between its steps: the trainable model, its optimizer, the data, and the step it is at."""

    def __init__(self, model: TrainableModel, cache: FeatureCache, sequences: list[TrainingSequence],
                 heldout: list[TrainingSequence], settings: TrainSettings) -> None:
        self.model, self.cache, self.sequences, self.heldout = model, cache, sequences, heldout
        self.settings = settings
        self.parameters = model.trainable_parameters()
        # One group per peak rate: the projector's (--projector-lr) when it differs, then the rest (a frozen
        # projector has no parameters here).
        projector = [p for name, p in self.parameters.items() if name.startswith("projector.")]
        rest = [p for name, p in self.parameters.items() if not name.startswith("projector.")]
        if settings.projector_learning_rate == settings.learning_rate or not rest or not projector:
            groups, self.peak_rates = [list(self.parameters.values())], [settings.learning_rate]
        else:
            groups, self.peak_rates = [projector, rest], [settings.projector_learning_rate, settings.learning_rate]
        self.optimizer = torch.optim.AdamW([{"params": group} for group in groups], lr=settings.learning_rate,
                                           weight_decay=0.0)
        self.steps_per_epoch = math.ceil(len(sequences) / settings.batch_size)
        self.total_steps = settings.steps if settings.steps is not None else settings.epochs * self.steps_per_epoch
        self.step = 0
        tokenizer = model.chat.tokenizer
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else min(model.chat.eos_token_ids))

    def restore(self, checkpoint: Checkpoint) -> None:
        restore_checkpoint(checkpoint, self.parameters, self.optimizer)
        self.step = checkpoint.step

    def save(self, directory: Path, run: dict[str, object]) -> None:
        save_checkpoint(directory, self.step, self.parameters, self.optimizer, run)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step on the next batch: its loss and its number of tokens."""
        batch = collate([self.sequences[i] for i in self.batch_indices(self.step)], self.pad_id)
        features = self.cache.load(batch.image_sha256s)  # (B, T_high, in_dim)
        self.model.train(True)
        for group, peak in zip(self.optimizer.param_groups, self.peak_rates, strict=True):
            group["lr"] = learning_rate(self.step, self.total_steps, peak)
        summed, count = self.model.loss_sum(batch, features)
        loss = summed / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.parameters.values()), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item(), batch.num_tokens

    def batch_indices(self, step: int) -> list[int]:
        """The sequences of ``step``: its epoch's order is a permutation drawn from (seed, epoch) alone."""
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.sequences), generator=generator)
        size = self.settings.batch_size
        return order[position * size:(position + 1) * size].tolist()

    @torch.no_grad()
    def heldout_loss(self) -> float | None:
        """Mean cross-entropy per answer token over the held-out sequences, without dropout; None without any."""
        if not self.heldout:
            return None
        self.model.train(False)
        total, count = 0.0, 0
        for start in range(0, len(self.heldout), self.settings.batch_size):
            batch = collate(self.heldout[start:start + self.settings.batch_size], self.pad_id)
            summed, n = self.model.loss_sum(batch, self.cache.load(batch.image_sha256s))
            total, count = total + summed.item(), count + n
        return total / count


def train(settings: TrainSettings, config: Config, report: Report = print) -> TrainResult:
    """Run the stage (see the module docstring); raise :class:`TrainingRefused` before any work it cannot do."""
    spec = _read_composition(settings)
    device = pick_device(settings.device)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise TrainingRefused(f"--device {settings.device}: this machine has no CUDA device; use --device cpu")
    dtype = _pick_dtype(settings.dtype, device)
    run = settings.run_identity(dtype)
    checkpoints = Path(settings.out) / "checkpoints"
    latest = _checkpoint_to_resume(settings, checkpoints, run)
    examples, heldout_examples, problems = _read_examples(settings)

    model = load_trainable(spec, stage=settings.stage, config=config, device=device, dtype=dtype,
                           seed=settings.seed, lora_rank=settings.lora_rank, quantize=settings.quantize,
                           train_projector=settings.trains_projector, report=report)
    cache = FeatureCache(config.data_dir / "features", model.vision)
    system_prompt = load_system_prompt(config.system_prompt_file or None)
    sequences, heldout = _prepare(examples, heldout_examples, model, cache, system_prompt, settings, problems)
    _report_problems(problems, Path(settings.out), report)
    if not sequences:
        raise TrainingRefused("no usable training entry in " + ", ".join(str(p) for p in settings.data))
    run["data_digest"] = _digest(sequences) + _digest(heldout)
    if needs_colour_words(spec, model):
        if not settings.trains_projector:
            raise TrainingRefused(f"{spec.projector}: the projector has no colour-word shortcut yet and training "
                                  f"adds one, which must train: --projector-lr 0 (a frozen projector) cannot")
        add_colour_words(model, cache.load([s.image_sha256 for s in sequences[:16]]), report)
    if latest is not None:
        check_same_run(latest, {"data_digest": run["data_digest"]})

    loop = TrainingLoop(model, cache, sequences, heldout, settings)
    if latest is not None:
        loop.restore(latest)
        report(f"resuming from step {loop.step} ({latest.path})")
    total = loop.total_steps
    report(f"{settings.stage}: {len(sequences)} training sequences, {len(heldout)} held out; {total} steps of "
           f"{settings.batch_size} on {device} ({dtype}); {sum(p.numel() for p in loop.parameters.values()):,} "
           f"trainable parameters")
    start = loop.step
    bar = tqdm(total=total, initial=start, desc=settings.stage, unit="step", disable=not settings.show_progress)
    losses: list[float] = []
    train_loss, heldout_loss, step_seconds = float("nan"), None, 0.0
    while loop.step < total:
        began = time.perf_counter()
        loss, num_tokens = loop.train_step()
        seconds = time.perf_counter() - began
        step_seconds += seconds
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{num_tokens / seconds:.0f}")
        if loop.step % settings.checkpoint_every == 0 or loop.step == total:
            train_loss, heldout_loss = sum(losses) / len(losses), loop.heldout_loss()
            losses = []
            shown = f", held-out loss {heldout_loss:.4f}" if heldout_loss is not None else ""
            report(f"step {loop.step}/{total}: train loss {train_loss:.4f}{shown}")
            loop.save(checkpoints, run)
    bar.close()
    if start >= total:
        report(f"the run in {settings.out} is complete (step {start}); writing its model again")
        heldout_loss = loop.heldout_loss()
    model_file = _write_model(settings, spec, model)
    result = TrainResult(total, train_loss, heldout_loss, model_file, step_seconds / max(1, total - start),
                         len(sequences), problems)
    summary = {k: v for k, v in asdict(result).items() if k != "problems"} | {"num_problems": len(problems)}
    (Path(settings.out) / "train.json").write_text(json.dumps({"settings": run, "result": summary}, indent=2,
                                                              default=str) + "\n")
    report(f"wrote {model_file}: serve it with `assistant serve --model {model_file}`")
    return result


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first WARMUP_SHARE of the steps, then cosine decay to zero at ``total``."""
    warmup = max(1, round(WARMUP_SHARE * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _checkpoint_to_resume(settings: TrainSettings, checkpoints: Path, run: dict[str, object]) -> Checkpoint | None:
    """The checkpoint that --resume continues (None for a new run); a run never overwrites another."""
    latest = latest_checkpoint(checkpoints)
    if settings.resume and latest is None:
        raise TrainingRefused(f"--resume: no checkpoint in {checkpoints}")
    if not settings.resume and latest is not None:
        raise TrainingRefused(f"{settings.out} already holds checkpoints of a run (step {latest.step}); pass "
                              f"--resume to continue it, or choose another --out")
    if latest is not None:
        check_same_run(latest, run)
    return latest


def _read_examples(settings: TrainSettings) -> tuple[list[Example], list[Example], list[DataProblem]]:
    """The usable entries of --data and --heldout, before anything is loaded; a file without any is refused."""
    try:
        examples, problems = read_examples(Path(p) for p in settings.data)
        heldout: list[Example] = []
        if settings.heldout is not None:
            heldout, heldout_problems = read_examples([Path(settings.heldout)])
            problems += heldout_problems
    except DataError as exc:
        raise TrainingRefused(str(exc)) from None
    return examples, heldout[:MAX_HELDOUT_SEQUENCES], problems


def _prepare(examples: list[Example], heldout_examples: list[Example], model: TrainableModel,
             cache: FeatureCache, system_prompt: str, settings: TrainSettings,
             problems: list[DataProblem]) -> tuple[list[TrainingSequence], list[TrainingSequence]]:
    """Training and held-out sequences whose image features are cached; new problems are added to ``problems``."""
    sequences, more = build_sequences(examples, model.chat, system_prompt)
    heldout, heldout_more = build_sequences(heldout_examples, model.chat, system_prompt)
    problems += more + heldout_more
    if settings.heldout is None:
        sequences, heldout = split_heldout(sequences)
    images = {s.image_sha256: (s.image_path, s.location) for s in sequences + heldout}
    problems += cache.compute(images, show_progress=settings.show_progress)
    return ([s for s in sequences if cache.has(s.image_sha256)], [s for s in heldout if cache.has(s.image_sha256)])


def _report_problems(problems: list[DataProblem], out: Path, report: Report) -> None:
    """Each problem as a warning (the first MAX_PROBLEMS_SHOWN), all of them in out/data-problems.txt."""
    if not problems:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "data-problems.txt").write_text("".join(f"{problem}\n" for problem in problems))
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        report(f"warning: skipped {problem}")
    if len(problems) > MAX_PROBLEMS_SHOWN:
        report(f"warning: {len(problems) - MAX_PROBLEMS_SHOWN} more entries skipped; all are listed in "
               f"{out / 'data-problems.txt'}")


def _read_composition(settings: TrainSettings) -> CompositionSpec:
    path = settings.model_file
    if path.suffix != ".toml" or not path.is_file():
        raise TrainingRefused(f"--model must be a composition file (model.toml) or a directory holding one; "
                              f"{settings.model} is neither")
    try:
        return load_composition(path, require_projector=False)
    except ValueError as exc:
        raise TrainingRefused(str(exc)) from None


def _write_model(settings: TrainSettings, spec: CompositionSpec, model: TrainableModel) -> Path:
    """out/projector, out/adapter (when there is one) and out/model.toml naming the same decoder and encoder."""
    out = Path(settings.out)
    save_projector(model.projector, out / "projector")
    adapter = None
    if model.peft_model is not None:
        adapter = out / "adapter"
        # the decoder as the composition names it (a built-in name stays one), not where this machine keeps it
        model.peft_model.peft_config["default"].base_model_name_or_path = spec.decoder
        model.peft_model.save_pretrained(str(adapter))
    elif spec.adapter is not None:  # align keeps the adapter it was given
        adapter = out / "adapter"
        if adapter.resolve() != spec.adapter.resolve():
            shutil.copytree(spec.adapter, adapter, dirs_exist_ok=True)
    model_file = out / "model.toml"
    # everything else as the composition trained from says: decoder, encoder, its features
    # ... but not its adapters by quantization: they were trained beside another adapter
    write_composition(replace(spec, projector=out / "projector", adapter=adapter, adapters={}), model_file)
    return model_file


def _pick_dtype(dtype: str, device: str) -> str:
    """The frozen decoder's dtype: bfloat16 (1.8 times faster than float32 per step on an AVX512-BF16 CPU),
    except on a GPU without bfloat16 and on a CPU without AVX512-BF16, where PyTorch emulates bfloat16
    matmuls (on an AVX2-only EPYC, ten align steps in bfloat16 had not finished after 15 minutes; in float32
    they took 3.9 s each). Trainable parameters are float32 either way."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if torch.cpu._is_avx512_bf16_supported() else "float32"


def _digest(sequences: list[TrainingSequence]) -> str:
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(f"{sequence.location}|{sequence.image_sha256}|{sequence.token_ids}|{sequence.labels};".encode())
    return digest.hexdigest()[:16]
