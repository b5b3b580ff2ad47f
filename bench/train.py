"""Training throughput of the experts' accelerate loop against `transformers.Trainer`.

    python bench/train.py                       # tiny ViT, CPU, 3 alternating repeats
    python bench/train.py --steps 60 --batch-size 32

Both train the same tiny expert (preset `tiny`, random init, same seed) on the same rows of the same
built sample folder, with the same batch size, optimizer, augmentation and loss, for the same number
of steps, in this process. The project's figure is `train_expert`'s own loop throughput; Trainer's
is the `train_samples_per_second` of `Trainer.train()`, whose collator and loss apply the same
`BatchTransform` and class-balanced cross-entropy (Trainer has no device-side transform hook, so it
runs in `compute_loss`, on the training device too). Medians over alternating repeats.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.expert import ExpertConfig, make_expert, train_expert  # noqa: E402
from models.losses import balanced_cross_entropy  # noqa: E402
from models.training import TrainConfig  # noqa: E402
from models.transforms import AugmentConfig, BatchTransform  # noqa: E402


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


def run_project(data: Path, out: Path, args) -> float:
    shutil.rmtree(out, ignore_errors=True)
    config = ExpertConfig(
        data=str(data), emotion="happy", fold=0, num_folds=2, preset="tiny",
        train=TrainConfig(output_dir=str(out), max_steps=args.steps, per_device_batch_size=args.batch_size,
                          num_workers=args.num_workers, warmup_ratio=0.0, learning_rate=1e-3, log_every=10**9),
    )  # fmt: skip
    return train_expert(config)["train_samples_per_second"]


def run_trainer(data: Path, out: Path, args) -> float:
    from transformers import Trainer, TrainingArguments

    from models.data import FaceDataset, OneVsRestSampler, folds, load_splits

    torch.manual_seed(42)
    train = load_splits(data)["train"]
    labels = np.asarray(train["human_label"])
    rows = np.flatnonzero(folds(train["image_id"], 2) != 0)
    dataset = FaceDataset(train, (labels == 1).astype(np.int64), 64)
    sampler = OneVsRestSampler(labels, rows, emotion=1, seed=42)
    epochs = []
    for epoch in range(50):  # the same balanced epochs the project draws, concatenated
        sampler.set_epoch(epoch)
        epochs.append(sampler.indices())
    subset = torch.utils.data.Subset(dataset, np.concatenate(epochs).tolist())
    transform = BatchTransform(64, augment=AugmentConfig())

    class ExpertTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pixels = transform.to(inputs["images"].device)(inputs["images"])
            logits = model(pixel_values=pixels).logits
            loss = balanced_cross_entropy(logits.float(), inputs["labels"])
            return (loss, logits) if return_outputs else loss

    def collate(batch):
        return {"images": torch.stack([b[0] for b in batch]), "labels": torch.stack([b[1] for b in batch])}

    shutil.rmtree(out, ignore_errors=True)
    arguments = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0,
        dataloader_num_workers=args.num_workers, report_to=[], save_strategy="no", logging_strategy="no",
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), seed=42, disable_tqdm=True,
    )  # fmt: skip
    trainer = ExpertTrainer(model=make_expert("happy"), args=arguments, train_dataset=subset, data_collator=collate)
    return trainer.train().metrics["train_samples_per_second"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-size", type=int, default=600)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    data = sample_folder(args.out, args.sample_size)
    project, trainer = [], []
    for _ in range(args.repeats):
        project.append(run_project(data, args.out / "train-project", args))
        trainer.append(run_trainer(data, args.out / "train-trainer", args))
    results = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "repeats": args.repeats,
        "project_samples_s": round(statistics.median(project), 1),
        "trainer_samples_s": round(statistics.median(trainer), 1),
        "all_project": project,
        "all_trainer": trainer,
    }
    results["ratio"] = round(results["project_samples_s"] / results["trainer_samples_s"], 2)
    print(json.dumps(results, indent=2))
    (args.out / "train.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
