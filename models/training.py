"""The one trainer of the project: every model (experts, FER baselines, valence/arousal) is a ``Task`` of it.

A ``Task`` supplies what differs between models: the ViT head (``make_model``), the training rows, their
targets and sampler (``training_set``), the evaluation sets and their metrics (``evaluations``), the loss
and the model card. ``train(task)`` does the rest, the same way for all: build the accelerator, load the
splits, make the loaders, ``fit``, and write the checkpoint folder.

``fit`` is accelerate's canonical loop: ``prepare``, ``accumulate``, ``backward``, clip,
``gather_for_metrics``, ``wait_for_everyone``, ``unwrap_model``, save on the main process,
``save_state``/``load_state`` for resuming. Images travel to the device as uint8 and are augmented there
in batches (``models.transforms.BatchTransform``), which keeps the loader workers cheap and a GPU fed.

Training checkpoints (``output_dir/checkpoints/step_N``) are written into a temporary sibling folder and
renamed when complete, so ``latest`` never picks a partial one; ``save_total_limit`` keeps the newest N.
Resuming only reads a finished checkpoint of the run's own ``checkpoints/`` folder: the model from
safetensors, the optimizer, scheduler and RNG states through ``torch.load(weights_only=True)``.

Example:
    >>> from models.training import TrainConfig
    >>> TrainConfig(output_dir="experts/happy-f0", num_train_epochs=3).gradient_accumulation_steps
    1
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, set_seed
from accelerate.utils import load as accelerate_load
from transformers import get_cosine_schedule_with_warmup

from core.files import write_json_atomic
from models.transforms import AugmentConfig, BatchTransform
from models.vit import PRESETS, input_size, make_processor, processor_stats

RESULTS_FILE = "all_results.json"  # written last: its presence means the model folder is complete
CONFIG_FILE = "training_config.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_MARKER = "checkpoint.json"  # written last into a checkpoint, before the rename
STEADY_AFTER = 5  # micro-batches left out of the steady-state throughput


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    Args:
        output_dir: where the model, its card, the results and ``checkpoints/step_N`` go.
        num_train_epochs: passes over the (re-drawn) training epochs; ``max_steps`` wins if set.
        max_steps: optimizer steps to run, counted per process.
        per_device_batch_size: images per process and micro-batch, before gradient accumulation.
        eval_batch_size: images per process and batch in evaluation.
        learning_rate: peak AdamW learning rate (linear warmup, then cosine decay to 0).
        weight_decay: AdamW weight decay, not applied to biases and norm weights.
        warmup_ratio: share of the optimizer steps spent in linear warmup, in [0, 1).
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping norm (0 disables it).
        checkpointing_steps: save the full training state to ``checkpoints/step_N`` every N optimizer steps.
        save_total_limit: keep only the newest N training checkpoints (default: all).
        resume_from_checkpoint: a ``checkpoints/step_N`` folder of this run's output_dir, or ``latest``
            (the newest finished one); not recorded in training_config.json, since a resumed run ends with the
            weights of an uninterrupted one.
        report_to: accelerate tracker(s): ``none``, ``tensorboard``, ``wandb``, ``all``, ...
        num_workers: DataLoader worker processes decoding JPEGs.
        seed: seeds the model init, the augmentation and the epochs' draws.
        log_every: log the mean training loss every N optimizer steps (each log waits for the device).
    """

    output_dir: str
    num_train_epochs: int = 3
    max_steps: int | None = None
    per_device_batch_size: int = 64
    eval_batch_size: int = 256
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    checkpointing_steps: int | None = None
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    report_to: str = "none"
    num_workers: int = 4
    seed: int = 42
    log_every: int = 10

    def __post_init__(self):
        self.output_dir = str(self.output_dir)
        positive = ("num_train_epochs", "per_device_batch_size", "eval_batch_size", "gradient_accumulation_steps",
                    "log_every")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpointing_steps", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ModelConfig:
    """Data, architecture and optimisation of one model (every task's config extends it).

    Args:
        data: a built AffectNet+ folder (``affectnet-plus build``) with ``train`` (and ``validation``).
        train: the optimisation settings (``TrainConfig``).
        preset: the ViT architecture when ``init_from`` is not given: ``tiny`` (3 layers at 64 px, random
            init; for tests and CPUs) or ``base`` (ViT-B/16 at 224 px).
        init_from: a pretrained ViT or DINOv2 to start from (a classifier or a bare ``ViTModel`` / ``Dinov2Model``
            backbone): a local folder or a Hub id (safetensors only).
        image_size: input side in pixels (default: the preset's or the checkpoint's; a DINOv2's processor size).
        push_to_hub: a Hub repository to push the finished checkpoint to (main process only).
        augment: the on-device augmentation of training batches (``AugmentConfig``).
    """

    data: str
    train: TrainConfig
    preset: str = field(default="tiny", metadata={"choices": tuple(PRESETS)})
    init_from: str | None = None
    image_size: int | None = None
    push_to_hub: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        self.data = str(self.data)
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass
class TrainingSet:
    """What a task trains on: a split, one target per row of it, and the sampler of each epoch's rows.

    ``sampler`` has ``set_epoch(epoch)`` and draws from ``(seed, epoch)`` only, so every process sees the
    same order and a resumed run repeats it. ``results`` are facts about the rows, added to the results.
    """

    split: object
    targets: np.ndarray
    sampler: torch.utils.data.Sampler
    results: dict = field(default_factory=dict)


@dataclass
class Evaluation:
    """One evaluation set: ``rows`` of ``split`` with one target per row of the split, and ``metrics``,
    which maps the gathered ``(logits, targets)`` of those rows (any order) to a dict of numbers."""

    split: object
    targets: np.ndarray
    rows: np.ndarray
    metrics: Callable[[torch.Tensor, torch.Tensor], dict]


class Task:
    """One kind of model for ``train``; a subclass implements what differs between models.

    Attributes:
        config: the task's ``ModelConfig`` (subclass), saved as ``training_config.json``.
        name: the trackers' run name.
        columns: the columns of the splits the task reads.
    """

    name = "model"
    columns: tuple[str, ...] = ("image_id", "image", "human_label")

    def __init__(self, config: ModelConfig):
        self.config = config

    def make_model(self):
        """The image classifier to train (``models.vit.make_vit`` with the task's head)."""
        raise NotImplementedError

    def training_set(self, splits) -> TrainingSet:
        """The training rows, targets and sampler; raises ``ValueError`` when there is nothing to learn."""
        raise NotImplementedError

    def evaluations(self, splits) -> dict[str, Evaluation]:
        """The sets evaluated after every epoch, by name (the results' key prefix)."""
        return {}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def card(self, results: dict):
        """The model card (``huggingface_hub.ModelCard``) of the finished model."""
        raise NotImplementedError

    def write_extras(self, out: Path) -> None:
        """Task-specific files of the model folder, written before ``all_results.json`` (main process)."""


def train(task: Task) -> dict:
    """Trains ``task``'s model and writes its folder (``task.config.train.output_dir``); returns the results.

    The folder holds ``model.safetensors``, ``config.json``, ``preprocessor_config.json``,
    ``training_config.json`` (the resolved config, which ``--config`` accepts), the model card ``README.md``,
    the task's extras and, written last, ``all_results.json``. Every bad input raises ``ValueError`` or
    ``FileNotFoundError`` before the first training step.

    Example:
        >>> from models.expert import ExpertConfig, ExpertTask  # doctest: +SKIP
        >>> train(ExpertTask(ExpertConfig(data="affectnet_plus", emotion="happy", train=TrainConfig("x"))))  # doctest: +SKIP
    """
    from models.data import FaceDataset, load_splits

    config = task.config
    options = config.train
    accelerator = make_accelerator(options)
    set_seed(options.seed)
    model = task.make_model()
    image_size = input_size(model, config.init_from, config.image_size)
    mean, std = processor_stats(config.init_from)
    with accelerator.main_process_first():  # one process builds the datasets cache, the others reuse it
        splits = load_splits(config.data, columns=task.columns)
    if "train" not in splits:
        raise ValueError(f"{config.data} has no train split (splits: {', '.join(splits)})")
    training = task.training_set(splits)
    evaluations = {}
    for name, evaluation in task.evaluations(splits).items():
        dataset = FaceDataset(evaluation.split, evaluation.targets, image_size)
        loader = make_loader(torch.utils.data.Subset(dataset, np.asarray(evaluation.rows).tolist()),
                             options.eval_batch_size, num_workers=options.num_workers)  # fmt: skip
        evaluations[name] = (loader, evaluation.metrics)
    train_data = FaceDataset(training.split, training.targets, image_size)
    train_loader = make_train_loader(train_data, training.sampler, options, accelerator)
    transform = BatchTransform(image_size, mean, std, augment=config.augment)
    if options.report_to != "none":
        accelerator.init_trackers(task.name, config=flat_config(dataclasses.asdict(config)))
    model, results = fit(accelerator, model, transform, train_loader, evaluations, task.loss, options)
    results.update(training.results)
    results.update(image_size=image_size, image_mean=list(mean), image_std=list(std))
    save_model(accelerator, model, task, results)
    return results


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator for ``config``: mixed precision and processes come from ``accelerate launch``/config."""
    report_to = None if config.report_to == "none" else config.report_to
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=report_to,
        project_dir=str(Path(config.output_dir) / "logs") if report_to else None,
    )


def make_loader(dataset, batch_size: int, sampler=None, num_workers: int = 0, shuffle: bool = False, drop_last=False):
    """A DataLoader that keeps a GPU fed: workers, pinned memory, persistent workers, prefetching."""
    workers = dict(num_workers=num_workers)
    if num_workers:
        workers.update(persistent_workers=True, prefetch_factor=4)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        **workers,
    )


def make_train_loader(dataset, sampler, config: TrainConfig, accelerator: Accelerator):
    """The training loader of ``sampler``'s rows: full batches only (steady shapes for compiled graphs),
    unless an epoch is smaller than one batch across the processes."""
    drop_last = len(sampler) >= config.per_device_batch_size * accelerator.num_processes
    return make_loader(
        dataset, config.per_device_batch_size, sampler=sampler, num_workers=config.num_workers, drop_last=drop_last
    )


# -- training checkpoints ---------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int | None:
    """The step of a finished checkpoint folder ``step_N`` (its marker names step N), else None."""
    match = re.fullmatch(r"step_(\d+)", path.name)
    marker = path / CHECKPOINT_MARKER
    if not match or not path.is_dir() or not marker.is_file():
        return None
    try:
        step = json.loads(marker.read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if step == int(match.group(1)) else None


def finished_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the finished checkpoints in ``output_dir/checkpoints``, oldest first.

    A folder being written (``.step_N.partial``) or left half-written by a crash has no marker: it is not
    listed.
    """
    root = Path(output_dir) / CHECKPOINTS
    found = [(step, p) for p in root.glob("step_*") if (step := _checkpoint_step(p)) is not None]
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    """The newest finished checkpoint of ``output_dir``, or None."""
    found = finished_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint ``config.resume_from_checkpoint`` names, if it is a finished one of this run's own
    ``checkpoints/`` folder (symbolic links resolved); anything else is refused: resuming unpickles the
    optimizer, scheduler and RNG states, so they are only read from where this run writes them."""
    root = (Path(config.output_dir) / CHECKPOINTS).resolve()
    if config.resume_from_checkpoint == "latest":
        latest = latest_checkpoint(config.output_dir)
        if latest is None:
            raise FileNotFoundError(f"no finished checkpoint to resume from in {root}")
        checkpoint = latest.resolve()
    else:
        checkpoint = Path(config.resume_from_checkpoint).resolve()
    if checkpoint.parent != root:
        raise ValueError(
            f"--resume-from-checkpoint {config.resume_from_checkpoint} ({checkpoint}) is not in this run's "
            f"checkpoints folder ({root}); training state is only read from there"
        )
    if _checkpoint_step(checkpoint) is None:
        raise FileNotFoundError(
            f"{config.resume_from_checkpoint} is not a finished checkpoint (no {CHECKPOINT_MARKER})"
        )
    return checkpoint


@contextlib.contextmanager
def weights_only_loads():
    """Within the block every ``torch.load`` runs the restricted unpickler (``weights_only=True``).

    That unpickler rebuilds tensors, numbers, strings and containers (plus the globals accelerate allowlists
    for numpy RNG states) and raises on a pickle naming anything else, instead of running it. A call asking
    for ``weights_only=False`` raises ``pickle.UnpicklingError``.
    """
    original = torch.load

    def load(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            raise pickle.UnpicklingError("refusing a full unpickle (weights_only=False) of training state")
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


class AugmentRNG:
    """The torch.Generator on the training device that the augmentation draws from, one per process.

    It does not draw from the global RNG, which DataLoaders also consume when they start, so a run resumed
    mid-epoch sees exactly the augmentations of an uninterrupted one. Its state is saved in checkpoints as
    safetensors (``augment_rng_<process>.safetensors``), never pickled.
    """

    def __init__(self, device: torch.device, seed: int, process_index: int = 0):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed + process_index)
        self.process_index = process_index

    def path(self, checkpoint: Path) -> Path:
        return Path(checkpoint) / f"augment_rng_{self.process_index}.safetensors"

    def save(self, checkpoint: Path) -> None:
        from safetensors.torch import save_file

        save_file({"state": self.generator.get_state()}, str(self.path(checkpoint)))

    def load(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        if not self.path(checkpoint).is_file():
            raise FileNotFoundError(f"{checkpoint} has no {self.path(checkpoint).name}")
        self.generator.set_state(load_file(str(self.path(checkpoint)))["state"])


def save_training_state(accelerator: Accelerator, config: TrainConfig, step: int, augment_rng: AugmentRNG) -> Path:
    """Saves the full training state as ``checkpoints/step_<step>``, atomically, then rotates old ones.

    Every process writes into ``checkpoints/.step_<step>.partial`` (accelerate's ``save_state``: model as
    safetensors, optimizer, scheduler, RNG states; plus the augmentation generator); when all are done, the
    main process writes the marker and renames the folder, so ``step_<step>`` only ever appears complete.
    Then it deletes the oldest finished checkpoints beyond ``config.save_total_limit``.
    """
    root = Path(config.output_dir) / CHECKPOINTS
    final, partial = root / f"step_{step}", root / f".step_{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash while saving this step
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    augment_rng.save(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"step": step, "num_processes": accelerator.num_processes}
        write_json_atomic(partial / CHECKPOINT_MARKER, marker)
        if final.exists():  # an older run's checkpoint of the same step
            shutil.rmtree(final)
        os.replace(partial, final)
        if config.save_total_limit:
            for _, old in finished_checkpoints(config.output_dir)[: -config.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator: Accelerator, checkpoint: Path, augment_rng: AugmentRNG) -> int:
    """Restores the state ``save_training_state`` wrote into ``checkpoint`` (see ``resolve_checkpoint``);
    returns its step.

    The model is read from ``model.safetensors``; the optimizer (``optimizer.bin``), scheduler
    (``scheduler.bin``) and RNG states (``random_states_<process>.pkl``) by ``accelerator.load_state`` under
    ``weights_only_loads``: the restricted unpickler, nothing else; the augmentation generator from
    safetensors. accelerate's custom states (``custom_checkpoint_*.pkl``, which it unpickles fully) are
    refused, and so is a checkpoint whose RNG states do not load (accelerate would only log it).
    """
    checkpoint = Path(checkpoint)
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    if marker.get("num_processes") != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint} was saved by {marker.get('num_processes')} processes; resume it with as many "
            f"(this run has {accelerator.num_processes})"
        )
    if not (checkpoint / "model.safetensors").is_file():
        raise ValueError(f"{checkpoint} has no model.safetensors: model weights are only read from safetensors")
    pickled_custom = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickled_custom:
        raise ValueError(f"{checkpoint} holds {', '.join(pickled_custom)}, which would be fully unpickled")
    with weights_only_loads():
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
        # accelerate only logs a failed RNG-state load; a resumed run must not go on with other random states.
        rng_file = checkpoint / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
        try:
            saved = accelerate_load(rng_file)
        except Exception as err:  # anything the restricted unpickler refuses, or a damaged file
            raise ValueError(f"{rng_file} could not be loaded as RNG states ({err})") from err
    if not torch.equal(saved["torch_manual_seed"], torch.get_rng_state()):
        raise ValueError(f"{rng_file} was not restored")
    augment_rng.load(checkpoint)
    return int(marker["step"])


# -- the loop ---------------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW at ``config.learning_rate``, with no weight decay on biases and norm weights (the usual ViT recipe)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or name.endswith(".bias") else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def make_scheduler(optimizer, config: TrainConfig, total_steps: int, num_processes: int = 1):
    """Linear warmup over ``warmup_ratio`` of ``total_steps``, then cosine decay to 0.

    accelerate's prepared scheduler steps once per process per optimizer step, hence the scaling.
    """
    return get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    transform: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    evaluations: dict[str, tuple[torch.utils.data.DataLoader, Callable[[torch.Tensor, torch.Tensor], dict]]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: TrainConfig,
) -> tuple[torch.nn.Module, dict]:
    """Trains ``model`` and evaluates it after every epoch; returns (unwrapped model, results).

    ``train_loader`` yields ``(uint8 images, targets)``; its sampler, if it has ``set_epoch``, is told
    the epoch (through accelerate) so that every process draws the same rows. ``evaluations`` maps a name
    to ``(loader, metrics)``: ``metrics(logits, targets)`` gets the gathered logits and targets of that
    loader. The results hold the last epoch's metrics prefixed by name, the training throughput, and one
    parameter checksum per process (``replica_checksums``: all equal when the replicas stayed in sync).
    """
    optimizer = make_optimizer(model, config)
    model, optimizer, train_loader, *eval_list = accelerator.prepare(
        model, optimizer, train_loader, *(loader for loader, _ in evaluations.values())
    )
    transform = transform.to(accelerator.device)
    evaluations = {name: (loader, metrics) for (name, (_, metrics)), loader in zip(evaluations.items(), eval_list)}
    augment_rng = AugmentRNG(accelerator.device, config.seed, accelerator.process_index)

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * config.num_train_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = accelerator.prepare(make_scheduler(optimizer, config, total_steps, accelerator.num_processes))

    global_step, start_epoch, skip_batches = 0, 0, 0
    if config.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(config)
        global_step = load_training_state(accelerator, checkpoint, augment_rng)
        start_epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        skip_batches = done_in_epoch * config.gradient_accumulation_steps
        accelerator.print(f"resumed from {checkpoint} at step {global_step} (epoch {start_epoch})")

    results: dict = {}
    samples, train_time, save_time, running_loss, loss_count = 0, 0.0, 0.0, 0.0, 0
    # Steady-state throughput leaves out the first micro-batches (allocator, kernel autotuning, compile).
    steady_samples, steady_time, micro_batches = 0, 0.0, 0
    for epoch in range(start_epoch, num_epochs):
        # Prepared loaders set their sampler's epoch from their own iteration count when iterated:
        # tell them the epoch, also the one-off loader that skips the batches a resumed run has done.
        loader = train_loader
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
        loader.set_epoch(epoch)
        model.train()
        transform.train()
        start = last = time.perf_counter()
        for images, targets in loader:
            with accelerator.accumulate(model):
                logits = model(pixel_values=transform(images, generator=augment_rng.generator)).logits
                loss = loss_fn(logits.float(), targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            samples += images.shape[0]
            micro_batches += 1
            if micro_batches > STEADY_AFTER:
                now = time.perf_counter()
                steady_samples, steady_time, last = steady_samples + images.shape[0], steady_time + now - last, now
            else:
                last = time.perf_counter()
            running_loss, loss_count = running_loss + loss.detach(), loss_count + 1
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if global_step % config.log_every == 0:
                mean_loss = accelerator.reduce(running_loss / loss_count, reduction="mean").item()
                accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=global_step)
                results["train_loss"] = mean_loss
                running_loss, loss_count = 0.0, 0
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                saving = time.perf_counter()
                save_training_state(accelerator, config, global_step, augment_rng)
                last = time.perf_counter()  # saving is not training time
                save_time += last - saving
            if global_step >= total_steps:
                break
        train_time += time.perf_counter() - start

        metrics = {"epoch": epoch + 1, "step": global_step}
        for name, (eval_loader, metrics_fn) in evaluations.items():
            for key, value in evaluate(accelerator, model, transform, eval_loader, metrics_fn).items():
                metrics[f"{name}_{key}"] = value
        accelerator.log({k.replace("_", "/", 1): v for k, v in metrics.items()}, step=global_step)
        results.update(metrics)
        if global_step >= total_steps:
            break

    accelerator.wait_for_everyone()
    if loss_count:
        results["train_loss"] = accelerator.reduce(running_loss / loss_count, reduction="mean").item()
    unwrapped = accelerator.unwrap_model(model)
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()]).sum().reshape(1)
    results["replica_checksums"] = accelerator.gather(checksum.to(accelerator.device)).tolist()
    results["num_processes"] = accelerator.num_processes
    seen = accelerator.reduce(torch.tensor(float(samples), device=accelerator.device), reduction="sum").item()
    results["train_samples"] = int(seen)
    # Training time: the epochs' loops, evaluation and checkpoint saving left out.
    train_time -= save_time
    results["train_samples_per_second"] = round(seen / train_time, 2) if train_time > 0 else None
    if steady_time:
        # Host-side timing: the loop waits on the device every log_every steps (the logged loss), so over
        # many steps it measures the device's pace, not just how fast kernels are queued.
        results["steady_samples_per_second"] = round(steady_samples * accelerator.num_processes / steady_time, 2)
    return unwrapped, results


@torch.inference_mode()
def evaluate(accelerator: Accelerator, model, transform, loader, metrics_fn) -> dict:
    """Logits and targets of every row of ``loader`` (gathered, padding dropped) -> ``metrics_fn``."""
    model.eval()
    transform.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        logits = model(pixel_values=transform(images)).logits.float()
        logits, targets = accelerator.gather_for_metrics((logits, targets))
        all_logits.append(logits.cpu())
        all_targets.append(targets.cpu())
    if not all_logits:
        return {}
    return metrics_fn(torch.cat(all_logits), torch.cat(all_targets))


# -- the model folder -------------------------------------------------------------------------------------------


def resolved_config(config: ModelConfig) -> dict:
    """The config as ``training_config.json`` records it: every field, ``resume_from_checkpoint`` cleared."""
    saved = dataclasses.asdict(config)
    saved["train"]["resume_from_checkpoint"] = None
    return saved


def save_model(accelerator: Accelerator, model, task: Task, results: dict) -> None:
    """Writes the model folder (main process) and ends the run; pushes it to the Hub if asked.

    In order: the model (safetensors), its image processor, ``training_config.json``, the card, the task's
    extras, and last ``all_results.json``, atomically: a folder with ``all_results.json`` is complete. A
    previous run's ``all_results.json`` is removed first, so a crash while saving leaves no marker.
    """
    if accelerator.is_main_process:
        write_model_folder(model, task, results, save_function=accelerator.save)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.free_memory()


def write_model_folder(model, task: Task, results: dict, save_function=torch.save) -> Path:
    """Writes ``task.config.train.output_dir`` as ``save_model`` describes (one process); returns it.

    Also the path of models trained without the loop (experts on a frozen backbone, ``models.expert``).
    """
    config = task.config
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).unlink(missing_ok=True)
    model.save_pretrained(out, is_main_process=True, save_function=save_function)  # safetensors (always, in 5.x)
    make_processor(results["image_size"], results["image_mean"], results["image_std"]).save_pretrained(out)
    write_json_atomic(out / CONFIG_FILE, resolved_config(config))
    task.card(results).save(out / "README.md")
    task.write_extras(out)
    write_json_atomic(out / RESULTS_FILE, results)
    if config.push_to_hub:
        from core.hub import push_model

        push_model(out, config.push_to_hub)
    return out


def flat_config(config: dict, prefix: str = "") -> dict:
    """Trackers take flat scalars: nested dataclasses become dotted keys, None becomes a string."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
