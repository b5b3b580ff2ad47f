"""The training loop shared by every model of the project (experts, FER baselines).

It is accelerate's canonical loop: ``prepare``, ``accumulate``, ``backward``, clip, ``gather_for_metrics``,
``wait_for_everyone``, ``unwrap_model``, save on the main process, ``save_state``/``load_state`` for
resuming. Images travel to the device as uint8 and are augmented there in batches
(``models.transforms.BatchTransform``), which keeps the loader workers cheap and a GPU fed.

Example:
    >>> from models.training import TrainConfig
    >>> TrainConfig(output_dir="experts/happy-f0", num_train_epochs=3).gradient_accumulation_steps
    1
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run.

    Args:
        output_dir: where the model, its card, the results and ``checkpoints/step_N`` go.
        num_train_epochs: passes over the (re-drawn) training epochs; ``max_steps`` wins if set.
        max_steps: optimizer steps to run, counted per process.
        per_device_batch_size: images per process and step, before gradient accumulation.
        learning_rate, weight_decay, warmup_ratio: AdamW with a cosine schedule after linear warmup.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping (0 disables it).
        checkpointing_steps: save the full training state every N optimizer steps.
        resume_from_checkpoint: a ``checkpoints/step_N`` folder, or ``latest`` for the newest in output_dir.
        report_to: accelerate tracker(s): ``none``, ``tensorboard``, ``wandb``, ``all``, ...
        num_workers: DataLoader worker processes decoding JPEGs.
        seed: seeds the model init, the augmentation and the epochs' draws.
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
    resume_from_checkpoint: str | None = None
    report_to: str = "none"
    num_workers: int = 4
    seed: int = 42
    log_every: int = 10

    def __post_init__(self):
        positive = ("num_train_epochs", "per_device_batch_size", "eval_batch_size", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            raise ValueError(f"checkpointing_steps must be >= 1, got {self.checkpointing_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


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


def latest_checkpoint(output_dir) -> Path | None:
    steps = [
        (int(m.group(1)), p)
        for p in (Path(output_dir) / "checkpoints").glob("step_*")
        if (m := re.fullmatch(r"step_(\d+)", p.name))
    ]
    return max(steps)[1] if steps else None


STEADY_AFTER = 5  # micro-batches left out of the steady-state throughput


class CheckpointedGenerator:
    """A torch.Generator on the training device whose state is saved in accelerate checkpoints.

    Augmentation draws from it rather than from the global RNG, which DataLoaders also consume when
    they start; so a run resumed mid-epoch sees exactly the augmentations of an uninterrupted one.
    """

    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (the usual ViT recipe).
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or name.endswith(".bias") else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    transform: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    eval_loaders: dict[str, torch.utils.data.DataLoader],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    evaluate_fn: Callable[[torch.Tensor, torch.Tensor], dict],
    config: TrainConfig,
) -> tuple[torch.nn.Module, dict]:
    """Trains ``model`` and evaluates it after every epoch; returns (unwrapped model, results).

    ``train_loader`` yields ``(uint8 images, targets)``; its sampler, if it has ``set_epoch``, is told
    the epoch (through accelerate) so that every process draws the same rows. ``evaluate_fn(logits, targets)`` gets the
    gathered logits and targets of one eval loader and returns metrics. The results hold the last
    epoch's metrics prefixed by loader name, the training throughput, and one parameter checksum per
    process (``replica_checksums``: all equal when the replicas stayed in sync).
    """
    optimizer = _optimizer(model, config)
    model, optimizer, train_loader, *eval_list = accelerator.prepare(
        model, optimizer, train_loader, *eval_loaders.values()
    )
    transform = transform.to(accelerator.device)
    eval_loaders = dict(zip(eval_loaders, eval_list))
    augment_rng = CheckpointedGenerator(accelerator.device, config.seed + accelerator.process_index)
    accelerator.register_for_checkpointing(augment_rng)

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or steps_per_epoch * config.num_train_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # The prepared scheduler steps once per process per optimizer step, hence the scaling.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    scheduler = accelerator.prepare(scheduler)

    global_step, start_epoch, skip_batches = 0, 0, 0
    if config.resume_from_checkpoint:
        checkpoint = (
            latest_checkpoint(config.output_dir)
            if config.resume_from_checkpoint == "latest"
            else Path(config.resume_from_checkpoint)
        )
        if checkpoint is None or not checkpoint.is_dir():
            raise FileNotFoundError(f"no checkpoint to resume from: {config.resume_from_checkpoint}")
        accelerator.load_state(str(checkpoint))
        global_step = int(checkpoint.name.split("_")[-1])
        start_epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        skip_batches = done_in_epoch * config.gradient_accumulation_steps
        accelerator.print(f"resumed from {checkpoint} at step {global_step} (epoch {start_epoch})")

    results: dict = {}
    samples, train_time, running_loss, loss_count = 0, 0.0, 0.0, 0
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
                accelerator.save_state(str(Path(config.output_dir) / "checkpoints" / f"step_{global_step}"))
            if global_step >= total_steps:
                break
        train_time += time.perf_counter() - start

        metrics = {"epoch": epoch + 1, "step": global_step}
        for name, eval_loader in eval_loaders.items():
            for key, value in evaluate(accelerator, model, transform, eval_loader, evaluate_fn).items():
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
    results["train_samples_per_second"] = round(seen / train_time, 2) if train_time else None
    if steady_time:
        # Host-side timing: the loop waits on the device every log_every steps (the logged loss), so over
        # many steps it measures the device's pace, not just how fast kernels are queued.
        results["steady_samples_per_second"] = round(steady_samples * accelerator.num_processes / steady_time, 2)
    return unwrapped, results


@torch.inference_mode()
def evaluate(accelerator: Accelerator, model, transform, loader, evaluate_fn) -> dict:
    """Logits and targets of every row of ``loader`` (gathered, padding dropped) -> ``evaluate_fn``."""
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
    return evaluate_fn(torch.cat(all_logits), torch.cat(all_targets))
