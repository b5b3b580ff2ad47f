"""Model cards of the checkpoints (huggingface_hub ``ModelCard`` with ``EvalResult``s).

Example:
    >>> from models.cards import expert_card  # doctest: +SKIP
    >>> expert_card(config, results).save("experts/happy-f0/README.md")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard, EvalResult, ModelCard, ModelCardData

EXPERT_TEMPLATE = """---
{{ card_data }}
---

# AffectNet+ expert: {{ emotion }} (fold {{ fold }} of {{ num_folds }})

A one-vs-rest facial-expression expert: `P({{ emotion }} present | face)`. It is one of the
8 emotions x {{ num_folds }} folds experts whose cross-fitted predictions become the soft labels of
AffectNet+ (Fard et al., arXiv:2410.22506; this is an independent reimplementation). It was trained
on the train rows of `{{ dataset }}` whose fold is not {{ fold }} (fold = sha1(image_id) mod {{ num_folds }}),
{{ training_summary }}

```python
from transformers import pipeline

expert = pipeline("image-classification", model="PATH_OR_HUB_ID")
expert("face.jpg")   # [{'label': '{{ emotion }}', 'score': ...}, {'label': 'not_{{ emotion }}', 'score': ...}]
```

Input: a face crop, resized to {{ image_size }}x{{ image_size }}, normalised with mean {{ mean }} and std {{ std }}.

## Results

{{ results_table }}

AUROC and balanced accuracy are computed one-vs-rest on rows labelled with one of the 8 emotions;
ECE is the expected calibration error of `P({{ emotion }})` (15 equal-width bins).
`heldout` is this expert's own fold of the train split, which it never saw.

## Training

{{ training_table }}

## Cross-fitting

This expert never saw a row of fold {{ fold }}; a build scores the train rows of fold {{ fold }} with it and
every other row with the mean over the {{ num_folds }} folds' experts. The fold plan it was trained under
(`core.schema.fold_plan`), checked wherever the experts are used:

{{ plan_table }}

## License

{{ license_text }}
"""


def _table(rows: list[tuple[str, object]], header=("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def dataset_license(data) -> tuple[dict, str]:
    """The card license fields and a sentence, inherited from the training data's own card.

    The data's card (``builder.card.render_card``) already decided the license from the source (its
    format, a license given to the build, or a verified bundled sample); weights trained on it carry
    the same. AffectNet's research terms are recognised by their ``license_name``; any other ``other``
    license is passed on with its name and link; a folder without a readable card is ``unknown``.
    """
    try:
        data_card = DatasetCard.load(Path(data) / "README.md").data
    except (OSError, ValueError):
        data_card = None
    license_id = (data_card.get("license") if data_card is not None else None) or "unknown"
    if isinstance(license_id, list):  # a card may list several: the weights carry all of them
        license_id = license_id[0] if len(license_id) == 1 else "other"
    if license_id == "other":
        name, link = data_card.get("license_name"), data_card.get("license_link")
        fields = {"license": "other", "license_name": name, "license_link": link}
        if name == "affectnet-research":
            text = (
                "The weights were trained on AffectNet-derived data, which its license allows for non-commercial "
                "academic research only; the same terms apply to these weights. Share them only with people who "
                "hold the AffectNet license (keep Hub repositories private or gated)."
            )
        else:
            text = (
                f"Inherited from the training data, whose license is `{name or 'other'}`"
                + (f" ({link})" if link else "")
                + ": its terms apply to these weights too."
            )
        return {k: v for k, v in fields.items() if v is not None}, text
    if license_id == "unknown":
        return {"license": "unknown"}, (
            "The training data's license is unknown (its card does not state one): these weights carry that "
            "data's license, so state it here before publishing them."
        )
    return {"license": license_id}, f"Inherited from the training data: `{license_id}`."


def expert_card(config, results: dict) -> ModelCard:
    """The model card of one expert from its ``ExpertConfig`` and its training results: held-out and validation
    metrics, the backbone (name, digest, origin), the training mode, the fold plan and the data's licence."""
    dataset = Path(config.data).name
    frozen = results.get("training_mode") == "frozen"
    evals = []
    for split in ("validation", "heldout"):
        for metric, name in (("auroc", "AUROC"), ("balanced_accuracy", "balanced accuracy"), ("ece", "ECE")):
            value = results.get(f"{split}_{metric}")
            if value is not None and value == value:  # skip NaN (one class only)
                evals.append(
                    EvalResult(
                        task_type="image-classification",
                        dataset_type=dataset,
                        dataset_name=f"{dataset} ({split})",
                        dataset_split="validation" if split == "validation" else f"train (fold {config.fold})",
                        metric_type=metric,
                        metric_name=name,
                        metric_value=round(float(value), 4),
                    )
                )
    license_fields, license_text = dataset_license(config.data)
    data = ModelCardData(
        model_name=f"affectnet-plus-expert-{config.emotion}-f{config.fold}",
        base_model=config.init_from if config.init_from and not Path(config.init_from).exists() else None,
        datasets=[dataset],
        tags=[
            "image-classification",
            "vision-transformer",
            "facial-expression-recognition",
            *(["frozen-backbone"] if frozen else []),
            "affectnet-plus",
            f"emotion-{config.emotion}",
        ],  # fmt: skip
        pipeline_tag="image-classification",
        library_name="transformers",
        eval_results=evals or None,
        **license_fields,
    )
    metric_rows = [
        (key, round(value, 4) if isinstance(value, float) else value)
        for key, value in results.items()
        if key.startswith(("validation_", "heldout_", "train_")) and not isinstance(value, (dict, list))
    ]
    training = config.train
    image_size = results.get("image_size", config.image_size)
    backbone = results.get("backbone") or {}
    plan = results.get("fold_plan") or {}
    if frozen:
        head = results.get("head") or {}
        summary = (
            f"with its backbone frozen: a class-balanced logistic head (L2 {head.get('l2', '?'):g}, chosen by "
            "cross-validation on these training rows) fitted on the backbone's features, as if in balanced epochs: "
            f"every `{config.emotion}` row and as many rows evenly from the other 7 emotions."
            if isinstance(head.get("l2"), float)
            else "with its backbone frozen: a class-balanced logistic head fitted on the backbone's features."
        )
        steps = [
            ("training mode", "frozen: the pretrained backbone unchanged, a linear head fitted on its features"),
            ("head", "L2-regularised logistic regression on standardised features, LBFGS, class-balanced as the "
                     "fine-tuning epochs are; folded into the classifier"),
            ("L2 strength", f"{head.get('l2')}, shared by the heads of this fold (the best mean AUROC of an inner "
                            f"{head.get('inner_folds', 3)}-fold cross-validation over {len(head.get('l2_grid') or [])} "
                            "values)"),
        ]  # fmt: skip
    else:
        summary = f"in balanced epochs: every `{config.emotion}` row and as many rows drawn evenly from the other 7 emotions."
        steps = [
            ("training mode", "fine-tuned: the whole network"),
            ("epochs / steps", f"{results.get('epoch')} / {results.get('step')}"),
            (
                "batch size per device x accumulation x processes",
                f"{training.per_device_batch_size} x {training.gradient_accumulation_steps} x {results.get('num_processes')}",
            ),
            (
                "optimizer",
                f"AdamW, lr {training.learning_rate:g}, weight decay {training.weight_decay:g}, cosine, warmup {training.warmup_ratio:g}",
            ),
            ("loss", "class-balanced cross-entropy over the two labels"),
            ("augmentation", "random resized crop, horizontal flip, rotation, colour jitter (on device)"),
        ]
    families = {"vit": "ViT (`ViTForImageClassification`)", "dinov2": "DINOv2 (`Dinov2ForImageClassification`)"}
    architecture = families.get(backbone.get("family"), "ViT")
    backbone_rows = [
        ("backbone", f"`{backbone.get('name')}`: {backbone.get('source')}" if backbone else
         (f"`{config.init_from}`" if config.init_from else f"ViT preset `{config.preset}`, random init")),
        ("backbone digest", f"`{backbone.get('digest')}`" if backbone.get("digest") else "not recorded"),
    ]  # fmt: skip
    plan_rows = [
        ("folds K", plan.get("num_folds", config.num_folds)),
        ("fold rule", plan.get("rule", "not recorded")),
        ("data", f"`{plan.get('data', dataset)}`"),
        ("train ids sha256", f"`{plan['train_ids_sha256']}`" if plan.get("train_ids_sha256") else "not recorded"),
        ("train labels sha256", f"`{plan['train_labels_sha256']}`" if plan.get("train_labels_sha256") else "not recorded"),
        ("this expert's training rows (ids sha256)", f"`{(results.get('train_rows') or {}).get('ids_sha256')}`"),
    ]
    return ModelCard.from_template(
        data,
        template_str=EXPERT_TEMPLATE,
        emotion=config.emotion,
        fold=config.fold,
        num_folds=config.num_folds,
        dataset=dataset,
        image_size=image_size,
        mean=results.get("image_mean"),
        std=results.get("image_std"),
        results_table=_table(metric_rows, ("metric", "value")),
        training_summary=summary,
        training_table=_table(
            [
                ("architecture", f"{architecture}, " + (f"preset `{config.preset}`" if not config.init_from else "pretrained")),
                *backbone_rows,
                *steps,
                ("seed", training.seed),
            ],
            ("setting", "value"),
        ),
        plan_table=_table(plan_rows, ("", "")),
        license_text=license_text,
    )
