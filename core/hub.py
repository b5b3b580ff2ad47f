"""Publishing to the Hugging Face Hub: a built AffectNet+ folder as a dataset, an expert checkpoint as a model.

Datasets are pushed **private and gated** by default: AffectNet's license forbids redistribution, so only
people who hold it may get access. ``labels_only=True`` publishes the ``labels`` config alone (no images);
users then join it to their own licensed copy with ``join_labels``.

Tokens come from where ``huggingface_hub`` looks (``HF_TOKEN``, the file written by ``hf auth login``)
or the ``token`` argument; they are never printed, logged or put in an error message.

Example:
    >>> from core.hub import push_dataset, push_model
    >>> push_dataset("affectnet_plus/", "my-lab/affectnet_plus")  # doctest: +SKIP
    'https://huggingface.co/datasets/my-lab/affectnet_plus/commit/...'
    >>> push_model("experts/happy-f0", "my-lab/affectnet-plus-happy-f0")  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from pathlib import Path

from core.schema import BUILD_CONFIG_FILE, DATA_DIR, LABELS_CONFIG, LABELS_DIR, WORK_DIR

# Weights formats that unpickle on load: never published, and never loaded as weights.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Training state and tracker logs stay local: they are large, and optimizer state is pickled.
MODEL_IGNORE = ["checkpoints/**", "logs/**"]
TRAINING_CONFIG = "training_config.json"  # the resolved run config saved next to a checkpoint
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
# The folders of a built dataset that hold its Parquet files: a push replaces them whole on the Hub.
PARQUET_DIRS = (DATA_DIR, LABELS_DIR)


class HubPushError(RuntimeError):
    """A push that the Hub refused, or that was refused before any request."""


def _token(token: str | None) -> str:
    """The explicit token or the one ``huggingface_hub`` finds; raises before any request without one."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPushError(f"no Hugging Face token found: {LOGIN_HINT}")
    return token


@contextmanager
def _hub_errors(repo_id: str, repo_type: str):
    """Turns 401/403 answers into an error that names the repo (the client's own messages never hold
    the token, and neither does this one)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise HubPushError(
                f"the Hub refused to let this token write the {repo_type} repo '{repo_id}' (HTTP {status}): "
                f"check that the namespace is yours or an organisation you can write to, and {LOGIN_HINT} "
                "with a token that has write access"
            ) from err
        raise


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def check_dataset_folder(folder, labels_only: bool = False) -> Path:
    """Raises unless ``folder`` is a finished build (README.md, Parquet under data/ and labels/, no ``.build/``);
    ``labels_only`` needs only labels/."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if (folder / WORK_DIR).exists():
        raise ValueError(
            f"{folder} holds an unfinished build ({WORK_DIR}/ is still there): run the build again to finish it "
            "before pushing"
        )
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no README.md: it is not a finished AffectNet+ build")
    for name in (LABELS_DIR,) if labels_only else PARQUET_DIRS:
        if not any((folder / name).rglob("*.parquet")):
            raise ValueError(f"{folder} has no Parquet files under {name}/: it is not a finished AffectNet+ build")
    return folder


def labels_card(folder) -> str:
    """The folder's card with only the ``labels`` config (made the default) in its YAML ``configs`` and
    ``dataset_info``; the body gains a note on joining the labels to one's own images."""
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(Path(folder) / "README.md")
    configs = [c for c in (card.data.get("configs") or []) if c.get("config_name") == LABELS_CONFIG]
    if not configs:
        raise ValueError(f"the card of {folder} declares no `{LABELS_CONFIG}` config")
    # A single config marked default: load_dataset("ORG/NAME") needs no config name.
    card.data["configs"] = [{**configs[0], "default": True}]
    infos = card.data.get("dataset_info")
    if isinstance(infos, list):
        card.data["dataset_info"] = [i for i in infos if i.get("config_name") == LABELS_CONFIG]
    elif isinstance(infos, dict) and infos.get("config_name") != LABELS_CONFIG:
        card.data["dataset_info"] = None
    card.text = (
        f"> This repository holds only the `{LABELS_CONFIG}` config (every column but `image`). Join it to your "
        "own licensed copy of the images by `image_id`, e.g. with `core.hub.join_labels` of affectnet-plus.\n\n"
        + card.text
    )
    return str(card)


def push_dataset(
    folder, repo_id: str, private: bool = True, gated: bool = True, labels_only: bool = False, token: str | None = None
) -> str:
    """Publishes a built AffectNet+ folder as a Hub dataset in one commit; returns the commit URL.

    Args:
        folder: the output of ``builder.export.build`` (README.md, data/<split>/*.parquet, labels/<split>/*.parquet,
            reports).
        repo_id: ``ORG/NAME``; created if missing.
        private, gated: the repo's visibility and manual access approval, set before any data is sent.
        labels_only: publish only ``labels/`` and a card that lists only the ``labels`` config: no images.
        token: a Hub token; by default the one ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``).

    Remote files under ``data/`` and ``labels/`` that the push does not send (older shards, another
    layout's, the images of an earlier full push under a labels-only one) are deleted in the same commit,
    so the repo never mixes two builds. The local folder is only read.

    Example:
        >>> push_dataset("affectnet_plus/", "my-lab/affectnet_plus-labels", labels_only=True)  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = check_dataset_folder(folder, labels_only)
    readme = labels_card(folder).encode() if labels_only else None
    token = _token(token)
    api = HfApi(token=token)
    with _hub_errors(repo_id, "dataset"):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        # An existing repo keeps its visibility on create_repo: set both before any file goes up.
        api.update_repo_settings(repo_id, gated="manual" if gated else False, private=private, repo_type="dataset")
        if not labels_only:
            commit = api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=str(folder),
                delete_patterns=[f"{name}/**" for name in PARQUET_DIRS],
                ignore_patterns=[BUILD_CONFIG_FILE],  # local: it may name this machine's paths
                commit_message="Upload AffectNet+ build",
            )
            return str(commit)
        # The card is sent from memory, so nothing (not even a temporary file) is written into the folder.
        local = [f for f in _files(folder) if f.startswith(f"{LABELS_DIR}/")]
        remote = api.list_repo_files(repo_id, repo_type="dataset")
        stale = [f for f in remote if f.startswith(tuple(f"{name}/" for name in PARQUET_DIRS)) and f not in local]
        operations = [CommitOperationDelete(path_in_repo=f) for f in stale]
        operations += [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme)]
        operations += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in local]
        commit = api.create_commit(
            repo_id, operations, repo_type="dataset", commit_message="Upload AffectNet+ labels (no images)"
        )
        return str(commit.commit_url)


def check_model_folder(checkpoint_dir) -> Path:
    """Raises unless ``checkpoint_dir`` holds safetensors weights and a config, and no pickled weights
    outside the (never pushed) ``checkpoints/`` and ``logs/``."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} has no model.safetensors: only safetensors checkpoints are pushed")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: it is not a transformers checkpoint")
    pushed = [f for f in _files(folder) if not any(fnmatch.fnmatch(f, p) for p in MODEL_IGNORE)]
    pickles = [f for f in pushed if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"{folder} holds pickle files ({', '.join(pickles[:5])}): they can run code when loaded, so they are "
            "never pushed; delete them (the weights are in model.safetensors)"
        )
    return folder


def publishable_config(config):
    """A saved run config with every absolute local path reduced to its last part (data, output and
    checkpoint folders name this machine's disk; a published file must not). Relative paths and Hub
    ids stay as they are.

    Example:
        >>> publishable_config({"data": "/home/me/affectnet_plus", "init_from": "google/vit-base", "seed": 3})
        {'data': 'affectnet_plus', 'init_from': 'google/vit-base', 'seed': 3}
    """
    if isinstance(config, dict):
        return {key: publishable_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [publishable_config(value) for value in config]
    if isinstance(config, str) and Path(config).is_absolute():
        return Path(config).name
    return config


def push_model(checkpoint_dir, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Uploads an expert checkpoint folder as a Hub model in one commit; returns the commit URL.

    Pushed: ``model.safetensors``, ``config.json``, ``preprocessor_config.json``, the ``README.md`` card,
    ``all_results.json``, ``training_config.json`` (its local paths reduced by ``publishable_config``);
    never ``checkpoints/`` (training state) or ``logs/``.

    Example:
        >>> push_model("experts/happy-f0", "my-lab/affectnet-plus-happy-f0")  # doctest: +SKIP
        >>> AutoModelForImageClassification.from_pretrained("my-lab/affectnet-plus-happy-f0")  # doctest: +SKIP
    """
    import json

    from huggingface_hub import CommitOperationAdd, HfApi

    folder = check_model_folder(checkpoint_dir)
    token = _token(token)
    api = HfApi(token=token)
    operations = []
    for name in _files(folder):
        if any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_IGNORE):
            continue
        content = str(folder / name)
        if name == TRAINING_CONFIG:
            config = publishable_config(json.loads((folder / name).read_text(encoding="utf-8")))
            content = (json.dumps(config, indent=2) + "\n").encode()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    with _hub_errors(repo_id, "model"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.update_repo_settings(repo_id, private=private)
        commit = api.create_commit(repo_id, operations, commit_message="Upload AffectNet+ expert")
    return str(commit.commit_url)


def join_labels(labels, images, on: str = "image_id"):
    """Joins a ``labels``-config Dataset (no images) to your own copy of the images by ``image_id``.

    Args:
        labels: a ``datasets.Dataset`` of the ``labels`` config (e.g. one split of
            ``load_dataset("ORG/affectnet_plus", "labels")``).
        images: a ``datasets.Dataset`` with ``on`` and ``image`` (any extra column is kept too), e.g. the
            ``default`` config of your local build.
        on: the key column.

    Returns a Dataset in the order of ``labels`` with ``on``, the columns of ``images`` that ``labels`` lacks
    (``image``), then the other label columns. A label row whose id has no image is an error (listing a few
    ids): a silent inner join would quietly change the split.

    Example:
        >>> labels = load_dataset("my-lab/affectnet_plus-labels", split="train")  # doctest: +SKIP
        >>> mine = load_dataset("affectnet_plus", split="train")  # doctest: +SKIP
        >>> joined = join_labels(labels, mine)  # doctest: +SKIP
        >>> joined[0]["image"], joined[0]["soft_label"]  # doctest: +SKIP
    """
    from datasets import concatenate_datasets

    for name, data in (("labels", labels), ("images", images)):
        if on not in data.column_names:
            raise ValueError(f"{name} has no `{on}` column (columns: {', '.join(data.column_names)})")
    row_of: dict[str, int] = {}
    for i, key in enumerate(images[on]):
        row_of.setdefault(key, i)
    keys = labels[on]
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(keys)} label rows have no image in `images` (by {on}), e.g. "
            f"{', '.join(map(str, missing[:5]))}"
        )
    extra = [c for c in images.column_names if c not in labels.column_names]
    picked = images.select_columns(extra).select([row_of[k] for k in keys])
    joined = concatenate_datasets([labels, picked], axis=1)
    order = [on, *extra, *(c for c in labels.column_names if c != on)]
    return joined.select_columns(order)
