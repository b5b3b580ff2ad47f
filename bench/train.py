"""Training throughput of the project's trainer (``models.training.train``) against ``transformers.Trainer``.

    python bench/train.py                       # tiny ViT expert, CPU, 3 alternating repeats
    python bench/train.py --steps 100 --batch-size 32 --repeats 3

Both sides train the same tiny expert in this process, on the same cores and in float32: same seed (so
the same initial weights), the same rows in the same order (the project's ``OneVsRestSampler``, epoch
by epoch, full batches only), batch size, loader workers and prefetching, AdamW parameter groups and
cosine schedule (``make_optimizer``, ``make_scheduler``), gradient clipping, device-side
``BatchTransform`` augmentation drawn from a generator with the same seed, and class-balanced
cross-entropy. Neither side evaluates or checkpoints while training; the project's task runs without
evaluation sets and Trainer with ``eval_strategy="no"``, ``save_strategy="no"``, ``logging_strategy="no"``.

The timed window is the same on both sides and measured by the same code: a global optimizer-step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``) records when every optimizer step ends, and
throughput is ``(steps - 1) x batch size / (end of the last step - end of the first step)``. So setup,
the first step (loader start-up, allocator warm-up), evaluation and saving are excluded on both sides;
data waits, forward, backward, clipping, optimizer and scheduler steps and every per-step overhead of
each loop are included. The report also gives each call's wall time (everything included), the number of
steps each hook saw, and the largest difference between the two sides' final weights (same work: ~0).
Medians over alternating repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from models.expert import ExpertConfig, ExpertTask, emotion_index, make_expert  # noqa: E402
from models.losses import balanced_cross_entropy  # noqa: E402
from models.training import TrainConfig, make_optimizer, make_scheduler, train  # noqa: E402
from models.transforms import AugmentConfig, BatchTransform  # noqa: E402

EMOTION = "happy"
SEED = 42


def sample_folder(out: Path, n: int) -> Path:
    """A built sample folder (cached)."""
    from affectnet_plus import AffectNetPlusConfig
    from builder.export import BuildOptions, build
    from builder.sample import SampleConfig, write_sample

    built = out / f"sample-{n}" / "affectnet_plus"
    if not (built / "build_report.json").is_file():
        shutil.rmtree(out / f"sample-{n}", ignore_errors=True)
        write_sample(out / f"sample-{n}" / "raw", SampleConfig(n=n, seed=2), progress=True)
        build(out / f"sample-{n}" / "raw", built, AffectNetPlusConfig(), BuildOptions(num_proc=2, progress=False))
    return built


class StepClock:
    """Records the end of every optimizer step of any torch optimizer, while in a ``with`` block."""

    def __enter__(self):
        self.ends: list[float] = []
        self.handle = register_optimizer_step_post_hook(lambda *_: self.ends.append(time.perf_counter()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def samples_per_second(self, batch_size: int) -> float:
        return (len(self.ends) - 1) * batch_size / (self.ends[-1] - self.ends[0])


class NoEvaluation(ExpertTask):
    """The expert task without evaluation sets (Trainer evaluates nothing either)."""

    def evaluations(self, splits):
        return {}


def train_config(out: Path, args) -> TrainConfig:
    return TrainConfig(output_dir=str(out), max_steps=args.steps, per_device_batch_size=args.batch_size,
                       num_workers=args.num_workers, warmup_ratio=0.0, learning_rate=1e-3, seed=SEED,
                       log_every=10**9)  # fmt: skip


def run_project(data: Path, out: Path, args) -> dict:
    from safetensors.torch import load_file

    shutil.rmtree(out, ignore_errors=True)
    config = ExpertConfig(data=str(data), emotion=EMOTION, fold=0, num_folds=2, preset="tiny",
                          train=train_config(out, args))  # fmt: skip
    from accelerate.state import AcceleratorState

    start = time.perf_counter()
    with StepClock() as clock:
        train(NoEvaluation(config))
    wall = time.perf_counter() - start
    weights = load_file(out / "model.safetensors")
    precision = f"{next(iter(weights.values())).dtype}, mixed precision {AcceleratorState().mixed_precision}"
    return {"samples_s": clock.samples_per_second(args.batch_size), "steps": len(clock.ends), "wall_s": wall,
            "weights": weights, "precision": precision, "ends": clock.ends}  # fmt: skip


def run_trainer(data: Path, out: Path, args) -> dict:
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from models.data import FaceDataset, OneVsRestSampler, folds, load_splits

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    set_seed(SEED)
    model = make_expert(EMOTION)  # the project's init: set_seed(seed), then the model
    split = load_splits(data)["train"]
    labels = np.asarray(split["human_label"])
    emotion = emotion_index(EMOTION)
    rows = np.flatnonzero(folds(split["image_id"], 2) != 0)
    dataset = FaceDataset(split, (labels == emotion).astype(np.int64), model.config.image_size)
    sampler = OneVsRestSampler(labels, rows, emotion, seed=SEED)
    transform = BatchTransform(model.config.image_size, augment=AugmentConfig())
    generator = torch.Generator().manual_seed(SEED)  # the project's AugmentRNG on process 0
    options = train_config(out, args)
    optimizer = make_optimizer(model, options)
    scheduler = make_scheduler(optimizer, options, args.steps)

    class ExpertTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return sampler  # Trainer calls its set_epoch(epoch), as the project's loop does

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pixels = transform.to(inputs["images"].device)(inputs["images"], generator=generator)
            logits = model(pixel_values=pixels).logits
            loss = balanced_cross_entropy(logits.float(), inputs["labels"])
            return (loss, logits) if return_outputs else loss

    def collate(batch):
        return {"images": torch.stack([b[0] for b in batch]), "labels": torch.stack([b[1] for b in batch])}

    arguments = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        max_grad_norm=options.max_grad_norm, dataloader_num_workers=args.num_workers,
        dataloader_persistent_workers=args.num_workers > 0,
        dataloader_prefetch_factor=4 if args.num_workers else None, dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_drop_last=len(sampler) >= args.batch_size, report_to=[], eval_strategy="no", save_strategy="no",
        logging_strategy="no", remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), seed=SEED,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = ExpertTrainer(model=model, args=arguments, train_dataset=dataset, data_collator=collate,
                            optimizers=(optimizer, scheduler))  # fmt: skip
    with StepClock() as clock:
        trainer.train()
    trainer.save_model(str(out))
    wall = time.perf_counter() - start
    weights = load_file(out / "model.safetensors")  # the names and layout the project's save writes too
    precision = f"{next(iter(weights.values())).dtype}, mixed precision {trainer.accelerator.mixed_precision}"
    return {"samples_s": clock.samples_per_second(args.batch_size), "steps": len(clock.ends), "wall_s": wall,
            "weights": weights, "precision": precision, "rows_per_epoch": len(sampler), "ends": clock.ends,
            "batches_per_epoch": len(trainer.get_train_dataloader())}  # fmt: skip


def max_weight_difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise ValueError("the two sides trained different models")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of both sides (0: torch's own choice). With the loader workers on few, "
                        "shared cores, busy-waiting OpenMP threads make more than one slower and noisier")  # fmt: skip
    parser.add_argument("--sample-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = sample_folder(args.out, args.sample_size)
    project, trainer, differences = [], [], []
    for repeat in range(args.repeats):  # alternate the order, so drift in the machine's speed hits both
        order = ("project", "trainer") if repeat % 2 == 0 else ("trainer", "project")
        runs = {}
        for side in order:
            run = run_project if side == "project" else run_trainer
            runs[side] = run(data, args.out / f"train-{side}", args)
        differences.append(max_weight_difference(runs["project"].pop("weights"), runs["trainer"].pop("weights")))
        project.append(runs["project"])
        trainer.append(runs["trainer"])
    steps = {r["steps"] for r in project + trainer}
    if steps != {args.steps}:
        raise RuntimeError(f"the step hooks saw {sorted(steps)} optimizer steps, not {args.steps}")
    median = lambda runs, key: round(statistics.median(r[key] for r in runs), 2)  # noqa: E731
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch threads "
        f"{torch.get_num_threads()}, {'cuda' if torch.cuda.is_available() else 'cpu'}",
        "precision": {"project": project[0]["precision"], "trainer": trainer[0]["precision"]},
        "versions": {m.__name__: m.__version__ for m in map(__import__, ("torch", "transformers", "accelerate"))},
        "window": f"end of optimizer step 1 to end of step {args.steps} ({args.steps - 1} steps), both sides",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "rows_per_epoch": trainer[0]["rows_per_epoch"],
        "batches_per_epoch": trainer[0]["batches_per_epoch"],
        "repeats": args.repeats,
        "project_samples_s": median(project, "samples_s"),
        "trainer_samples_s": median(trainer, "samples_s"),
        "project_wall_s": median(project, "wall_s"),
        "trainer_wall_s": median(trainer, "wall_s"),
        "all_project_samples_s": [round(r["samples_s"], 1) for r in project],
        "all_trainer_samples_s": [round(r["samples_s"], 1) for r in trainer],
        "max_final_weight_difference": max(differences),
    }
    results["ratio"] = round(results["project_samples_s"] / results["trainer_samples_s"], 3)
    # Each repeat's two runs ran back to back: their ratio is less exposed to drift in the machine's speed.
    results["paired_ratios"] = [round(p["samples_s"] / t["samples_s"], 3) for p, t in zip(project, trainer)]
    results["load_average"] = [round(v, 2) for v in os.getloadavg()]
    results["target_holds"] = results["ratio"] >= 1.0
    print(json.dumps(results, indent=2))
    (args.out / "train.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
