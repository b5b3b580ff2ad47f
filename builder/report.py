"""A report on a built AffectNet+ folder: a markdown page with PNG plots, to look at rather than read.

Plots (each only when the folder has the columns it needs): the mean soft label per human label
(heatmap), the subset composition per emotion, the soft-label entropy per subset, example faces per
subset, the metadata distributions (age, gender, ethnicity, head pose), and, given the baselines'
runs, their confusion matrices and reliability diagrams. Written to
``OUT/report.md`` + ``OUT/*.png``.

Example:
    >>> from builder.report import write_report
    >>> write_report("demo/affectnet_plus", "demo/report")  # doctest: +SKIP
    PosixPath('demo/report/report.md')
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.schema import EMOTIONS, SUBSETS, as_distribution

PLOT_SPLITS = ("train", "validation")  # the unlabeled split's labels are automatic: kept out of the plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _columns(folder: Path) -> dict[str, list]:
    """The labels config's columns of the labelled splits, concatenated."""
    from datasets import load_dataset

    labels = load_dataset(str(folder), "labels")
    splits = [labels[s] for s in PLOT_SPLITS if s in labels]
    if not splits:
        raise ValueError(f"{folder} has no train or validation split to report on")
    return {c: [v for s in splits for v in s[c]] for c in splits[0].column_names}


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _pyplot().close(fig)
    return name


def soft_label_heatmap(human: np.ndarray, soft: np.ndarray, out: Path) -> str:
    plt = _pyplot()
    rows = np.array([soft[human == k].mean(0) if (human == k).any() else np.full(8, np.nan) for k in range(8)])
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(8), EMOTIONS, rotation=45, ha="right")
    ax.set_yticks(range(8), EMOTIONS)
    ax.set_xlabel("emotion confidence (independent, in [0, 1])")
    ax.set_ylabel("human label")
    for i in range(8):
        for j in range(8):
            if np.isfinite(rows[i, j]):
                ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if rows[i, j] > 0.5 else "white")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("Mean soft label per human label")
    return _save(fig, out, "soft_label_per_human_label.png")


def subset_composition(human: np.ndarray, subset: np.ndarray, out: Path) -> str:
    plt = _pyplot()
    counts = np.array([[((human == k) & (subset == s)).sum() for s in range(len(SUBSETS))] for k in range(8)])
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    left = np.zeros(8)
    for s, (name, colour) in enumerate(zip(SUBSETS, ("#4caf50", "#ffb300", "#e53935"))):
        ax.barh(range(8), shares[:, s], left=left, color=colour, label=name)
        left += shares[:, s]
    ax.set_yticks(range(8), [f"{e} (n={n})" for e, n in zip(EMOTIONS, counts.sum(1))])
    ax.invert_yaxis()
    ax.set_xlabel("share of rows")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Complexity subsets per human label")
    return _save(fig, out, "subsets_per_emotion.png")


def entropy_histogram(soft: np.ndarray, subset: np.ndarray, out: Path) -> str:
    plt = _pyplot()
    distribution = as_distribution(soft)  # the confidences, normalised: entropy needs a distribution
    entropy = -(distribution * np.log(np.clip(distribution, 1e-12, None))).sum(1)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(0, np.log(8), 30)
    for s, (name, colour) in enumerate(zip(SUBSETS, ("#4caf50", "#ffb300", "#e53935"))):
        if (subset == s).any():
            ax.hist(entropy[subset == s], bins=bins, alpha=0.6, color=colour, label=f"{name} (n={(subset == s).sum()})")
    ax.axvline(np.log(8), color="grey", linestyle=":", label="uniform")
    ax.set_xlabel("entropy of the normalised soft label (nats)")
    ax.set_ylabel("rows")
    ax.legend(fontsize=8)
    ax.set_title("How spread the soft labels are, per subset")
    return _save(fig, out, "soft_label_entropy.png")


def example_grid(folder: Path, out: Path, per_subset: int = 8) -> str:
    """The first faces of each subset config (train split), with their human label and top soft label."""
    from datasets import load_dataset

    plt = _pyplot()
    fig, axes = plt.subplots(len(SUBSETS), per_subset, figsize=(1.6 * per_subset, 1.9 * len(SUBSETS)), squeeze=False)
    for s, name in enumerate(SUBSETS):
        try:
            rows = load_dataset(str(folder), name, split="train")
        except (ValueError, FileNotFoundError):
            rows = []
        for i in range(per_subset):
            ax = axes[s, i]
            ax.axis("off")
            if i < len(rows):
                row = rows[i]
                ax.imshow(row["image"])
                top = int(np.argmax(row["soft_label"]))
                ax.set_title(f"{EMOTIONS[row['human_label']][:7]} / {EMOTIONS[top][:7]}", fontsize=7)
        axes[s, 0].text(-0.15, 0.5, name, transform=axes[s, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle("Examples per subset (human label / top of the soft label)", fontsize=9)
    return _save(fig, out, "examples_per_subset.png")


def metadata_distributions(columns: dict[str, list], out: Path) -> str | None:
    present = [c for c in ("age", "gender", "ethnicity", "head_pose") if c in columns]
    if not present:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(3.4 * len(present), 3.0), squeeze=False)
    for ax, column in zip(axes[0], present):
        values = [v for v in columns[column] if v is not None]
        if column == "age":
            ax.hist(values, bins=np.arange(0, 101, 5), color="#5c6bc0")
            ax.set_xlabel("age (years)")
        elif column == "head_pose":
            for angle, colour in zip(("yaw", "pitch", "roll"), ("#1e88e5", "#43a047", "#fb8c00")):
                ax.hist([v[angle] for v in values], bins=np.arange(-90, 91, 5), alpha=0.6, color=colour, label=angle)
            ax.set_xlabel("degrees")
            ax.legend(fontsize=7)
        else:  # probability structs: the most probable class per row
            names = list(values[0]) if values else []
            counts = [sum(max(v, key=v.get) == n for v in values) for n in names]
            ax.bar(names, counts, color="#8d6e63")
            ax.tick_params(axis="x", rotation=45)
            ax.set_xlabel(f"most probable {column}")
        ax.set_title(f"{column} (n={len(values)})", fontsize=9)
    fig.suptitle("Metadata (model estimates where the source lacked them)", fontsize=9)
    return _save(fig, out, "metadata.png")


def _baseline_runs(baselines: Path) -> dict[str, dict]:
    """``{run name: {"probs", "labels", "classes", "target"}}`` of the finished runs under ``baselines``."""
    import json

    runs = {}
    for path in sorted(Path(baselines).glob("*/validation_predictions.npz")):
        results = json.loads((path.parent / "all_results.json").read_text())
        with np.load(path) as arrays:
            runs[path.parent.name] = {"probs": arrays["probs"], "labels": arrays["labels"],
                                      "classes": results["classes"], "target": results["target"]}  # fmt: skip
    if not runs:
        raise FileNotFoundError(f"no finished baseline run (*/validation_predictions.npz) under {baselines}")
    return runs


def confusion_matrices(runs: dict[str, dict], out: Path) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.2), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        k = len(run["classes"])
        matrix = np.zeros((k, k))
        np.add.at(matrix, (run["labels"], run["probs"].argmax(1)), 1)
        matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), [c[:4] for c in run["classes"]], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [c[:4] for c in run["classes"]], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("human label")
        ax.set_title(f"{name} (top-1 {(run['probs'].argmax(1) == run['labels']).mean():.1%})", fontsize=9)
    fig.suptitle("Confusion matrices on the validation split (rows normalised)", fontsize=9)
    return _save(fig, out, "baselines_confusion.png")


def reliability_diagrams(runs: dict[str, dict], out: Path, bins: int = 10) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    edges = np.linspace(0, 1, bins + 1)
    for name, run in runs.items():
        confidence, correct = run["probs"].max(1), run["probs"].argmax(1) == run["labels"]
        which = np.clip(np.digitize(confidence, edges) - 1, 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        ax.plot([confidence[which == b].mean() for b in filled], [correct[which == b].mean() for b in filled],
                marker="o", label=name)  # fmt: skip
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title("Reliability on the validation split", fontsize=9)
    return _save(fig, out, "baselines_reliability.png")


def release_agreement(columns: dict[str, list]) -> dict | None:
    """How the build's soft labels and subsets agree with the release's (a ``--recompute`` build).

    Over the rows with an emotion label and both values: per-emotion Pearson correlation of
    ``soft_label`` with ``release_soft_label``, how often their argmax agrees, and how often
    ``subset`` equals ``release_subset`` (with the 3 x 3 table, release in rows). ``None`` when the
    folder keeps neither release column.

    Example:
        >>> cols = {"human_label": [1, 2], "subset": [0, 1], "release_subset": [0, 2]}
        >>> release_agreement(cols)["subset_agreement"]
        0.5
    """
    if "release_subset" not in columns and "release_soft_label" not in columns:
        return None
    human = np.asarray(columns["human_label"])
    result: dict = {}
    if "release_soft_label" in columns and "soft_label" in columns:
        keep = [i for i, (h, a, b) in enumerate(zip(human, columns["soft_label"], columns["release_soft_label"]))
                if h < len(EMOTIONS) and a is not None and b is not None]  # fmt: skip
        ours = np.asarray([columns["soft_label"][i] for i in keep], dtype=np.float64).reshape(-1, len(EMOTIONS))
        theirs = np.asarray([columns["release_soft_label"][i] for i in keep], dtype=np.float64).reshape(ours.shape)
        correlation = {}
        for k, name in enumerate(EMOTIONS):
            x, y = ours[:, k], theirs[:, k]
            correlation[name] = (float(np.corrcoef(x, y)[0, 1]) if len(keep) > 1 and x.std() > 0 and y.std() > 0
                                 else float("nan"))  # fmt: skip
        result.update(rows=len(keep), correlation=correlation,
                      argmax_agreement=float((ours.argmax(1) == theirs.argmax(1)).mean()) if keep else float("nan"))
    if "release_subset" in columns:
        pairs = [(r, o) for h, r, o in zip(human, columns["release_subset"], columns["subset"])
                 if h < len(EMOTIONS) and r is not None and o is not None and r >= 0 and o >= 0]  # fmt: skip
        table = np.zeros((len(SUBSETS), len(SUBSETS)), dtype=np.int64)
        for r, o in pairs:
            table[r, o] += 1
        result.update(subset_rows=len(pairs), subset_table=table.tolist(),
                      subset_agreement=float(np.trace(table) / len(pairs)) if pairs else float("nan"))
    return result


def _agreement_section(agreement: dict) -> list[str]:
    lines = ["", "## Agreement with the release's labels", "",
             "This build recomputed labels that the official release gives; the release's are kept as "
             "`release_soft_label` / `release_subset`.", ""]  # fmt: skip
    if "correlation" in agreement:
        lines += [f"Soft labels, over {agreement['rows']} rows: argmax agreement "
                  f"{agreement['argmax_agreement']:.1%}; per-emotion Pearson correlation:", "",
                  "| " + " | ".join(EMOTIONS) + " |", "|" + "---|" * len(EMOTIONS),
                  "| " + " | ".join(f"{agreement['correlation'][e]:.3f}" for e in EMOTIONS) + " |", ""]  # fmt: skip
    if "subset_table" in agreement:
        lines += [f"Subsets, over {agreement['subset_rows']} rows: {agreement['subset_agreement']:.1%} agree "
                  "(release in rows, this build in columns):", "",
                  "| release \\ build | " + " | ".join(SUBSETS) + " |", "|---|" + "---|" * len(SUBSETS),
                  *("| " + name + " | " + " | ".join(str(v) for v in row) + " |"
                    for name, row in zip(SUBSETS, agreement["subset_table"]))]  # fmt: skip
    return lines


def write_report(folder, out, baselines=None) -> Path:
    """Writes ``out/report.md`` and its plots for the built folder ``folder``; returns the page's path.

    ``baselines``: the output folder of ``scripts/reproduce_baselines.sh`` (or of ``scripts/train.py fer`` runs)
    adds their confusion matrices and reliability diagrams.
    """
    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(folder)
    human = np.asarray(columns["human_label"])
    emotion = human < len(EMOTIONS)
    sections = [f"# AffectNet+ report: `{folder.name}`", "",
                f"{len(human)} labelled rows (train + validation), {int(emotion.sum())} with an emotion label."]  # fmt: skip
    if "soft_label" in columns:
        soft = np.asarray([s for s, e in zip(columns["soft_label"], emotion) if e], dtype=np.float64)
        subset = np.asarray(columns["subset"])[emotion]
        h = human[emotion]
        agree = float((soft.argmax(1) == h).mean())
        sizes = ", ".join(f"{name} {int((subset == s).sum())} ({(subset == s).mean():.0%})" for s, name in enumerate(SUBSETS))
        sections += [
            "", "## Soft labels", "",
            f"The soft label's top emotion is the human label on {agree:.1%} of the rows. Subsets: {sizes}.", "",
            f"![mean soft label per human label]({soft_label_heatmap(h, soft, out)})", "",
            f"![subsets per emotion]({subset_composition(h, subset, out)})", "",
            f"![soft-label entropy]({entropy_histogram(soft, subset, out)})", "",
            f"![examples per subset]({example_grid(folder, out)})",
        ]  # fmt: skip
    else:
        sections += ["", "This folder has no soft labels: build it with `--experts` to see them here."]
    agreement = release_agreement(columns)
    if agreement:
        sections += _agreement_section(agreement)
        (out / "release_agreement.json").write_text(json.dumps(agreement, indent=2) + "\n", encoding="utf-8")
    if baselines:
        runs = _baseline_runs(Path(baselines))
        sections += ["", "## Baselines: hard vs soft labels", "",
                     f"![confusion matrices]({confusion_matrices(runs, out)})", "",
                     f"![reliability]({reliability_diagrams(runs, out)})"]  # fmt: skip
    metadata = metadata_distributions(columns, out)
    if metadata:
        sections += ["", "## Metadata", "", f"![metadata]({metadata})"]
    page = out / "report.md"
    page.write_text("\n".join(sections) + "\n", encoding="utf-8")
    return page
