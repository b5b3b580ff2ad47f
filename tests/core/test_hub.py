"""Hub round trips through the local fake Hub (tests/hub_server.py): push, then load with the real clients."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from datasets import Image as ImageFeature
from datasets import load_dataset
from huggingface_hub import DatasetCard

from core.hub import HubPushError, join_labels, push_dataset, push_model
from core.schema import SUBSETS
from tests.hub_server import TOKEN, USER, fake_hub  # noqa: F401  (the fixture)

# huggingface_hub's LFS upload passes a file as ``data=``, which httpx2 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny build of the bundled sample: 30 rendered faces, no experts, no metadata."""
    from affectnet_plus import AffectNetPlusConfig
    from builder.export import BuildOptions, build
    from builder.sample import SampleConfig, write_sample

    root = tmp_path_factory.mktemp("hub")
    write_sample(root / "raw", SampleConfig(n=30, seed=0))
    build(root / "raw", root / "affectnet_plus", AffectNetPlusConfig(), BuildOptions(progress=False))
    return root / "affectnet_plus"


@pytest.fixture
def local(built, monkeypatch):
    """The built folder loaded with datasets, offline (before the fake Hub switches the clients online)."""

    def load(config=None):
        return load_dataset(str(built), config)

    return load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny ViT checkpoint saved like an expert: safetensors, config, processor, card, results."""
    from transformers import ViTConfig, ViTForImageClassification

    from models.expert import make_processor

    folder = tmp_path_factory.mktemp("ckpt") / "happy-f0"
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2, id2label={0: "not_happy", 1: "happy"},
                       label2id={"not_happy": 0, "happy": 1})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    make_processor(32).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny expert\n")
    (folder / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
    (folder / "training_config.json").write_text(json.dumps({"data": str(folder.parent / "affectnet_plus"),
                                                             "train": {"output_dir": str(folder), "max_steps": 1}}))
    (folder / "checkpoints" / "step_1").mkdir(parents=True)
    (folder / "checkpoints" / "step_1" / "optimizer.bin").write_bytes(b"pickled optimizer state")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out").write_text("log")
    return folder


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    """A build of the bundled sample in the release layout: every row has a subset, all three present."""
    from affectnet_plus import AffectNetPlusConfig
    from builder.export import BuildOptions, build
    from builder.sample import SampleConfig, write_sample

    root = tmp_path_factory.mktemp("partitioned")
    write_sample(root / "raw", SampleConfig(n=60, seed=0, layout="affectnet-plus"))
    out = root / "affectnet_plus"
    config = AffectNetPlusConfig(source_format="affectnet-plus")  # the release's poses are in radians
    report = build(root / "raw", out, config, BuildOptions(shard_rows=25, progress=False))
    assert all(report["configs"].get(name) for name in SUBSETS)
    return out


def _parquet_files(folder, top: str) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in (Path(folder) / top).rglob("*.parquet")]


def listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*"))


def as_rows(dataset):
    """Every column, images as their stored bytes (decoded PIL objects do not compare)."""
    if "image" in dataset.column_names:
        dataset = dataset.cast_column("image", ImageFeature(decode=False))
    return dataset.to_list()


def test_push_dataset_round_trip(built, local, request):
    expected = {config: local(config) for config in ("default", "labels")}
    before = listing(built)
    hub = request.getfixturevalue("fake_hub")

    url = push_dataset(built, f"{USER}/affectnet_plus")

    repo = hub.repo("dataset", f"{USER}/affectnet_plus")
    assert repo["private"] and repo["gated"] == "manual"
    assert len(repo["messages"]) == 1  # one commit
    assert repo["sha"] in url
    files = hub.files("dataset", f"{USER}/affectnet_plus")
    assert any(f["lfs"] for p, f in files.items() if p.endswith(".parquet"))  # went through LFS batch + PUT
    assert listing(built) == before
    for config, want in expected.items():
        got = load_dataset(f"{USER}/affectnet_plus", config)
        assert set(got) == set(want)
        for split in want:
            assert got[split].features == want[split].features
            assert as_rows(got[split]) == as_rows(want[split])


def test_push_labels_only_and_join(built, local, request):
    default, labels_local = local("default"), local("labels")
    before = listing(built)
    hub = request.getfixturevalue("fake_hub")

    push_dataset(built, f"{USER}/affectnet_plus-labels", labels_only=True)

    files = hub.files("dataset", f"{USER}/affectnet_plus-labels")
    assert files and all(p == "README.md" or p.startswith("labels/") for p in files)
    assert sorted(p for p in files if p != "README.md") == sorted(_parquet_files(built, "labels"))
    assert hub.repo("dataset", f"{USER}/affectnet_plus-labels")["gated"] == "manual"
    card = DatasetCard(files["README.md"]["data"].decode())
    assert [c["config_name"] for c in card.data.configs] == ["labels"]
    assert [i["config_name"] for i in card.data.dataset_info] == ["labels"]
    assert listing(built) == before
    for config in (None, "labels"):
        labels = load_dataset(f"{USER}/affectnet_plus-labels", config)
        assert set(labels) == set(default)
        for split in labels:
            assert "image" not in labels[split].column_names
            assert as_rows(labels[split]) == as_rows(labels_local[split])
    for split in default:
        joined = join_labels(labels[split], default[split].select_columns(["image_id", "image"]))
        assert joined.column_names == default[split].column_names
        assert as_rows(joined) == as_rows(default[split])


def test_labels_only_push_over_a_full_push_removes_the_images(built, request):
    hub = request.getfixturevalue("fake_hub")
    push_dataset(built, f"{USER}/ds", private=False, gated=False)
    repo = hub.repo("dataset", f"{USER}/ds")
    assert not repo["private"] and not repo["gated"]
    assert any(p.startswith("data/") for p in hub.files("dataset", f"{USER}/ds"))

    push_dataset(built, f"{USER}/ds", labels_only=True)

    assert repo["private"] and repo["gated"] == "manual"  # the defaults apply to an existing repo too
    remote = hub.files("dataset", f"{USER}/ds")
    assert not [p for p in remote if p.startswith("data/")]  # no image left
    assert sorted(p for p in remote if p.startswith("labels/")) == sorted(_parquet_files(built, "labels"))
    assert len(repo["messages"]) == 2


def test_push_uploads_each_image_once(partitioned, request):
    """Subset configs reference the default config's files: each image goes up once, and an older
    layout's files are deleted by the same commit."""
    from huggingface_hub import HfApi

    hub = request.getfixturevalue("fake_hub")
    local = {config: load_dataset(str(partitioned), config) for config in ("default", "labels", *SUBSETS)}
    api = HfApi()
    api.create_repo(f"{USER}/parts", repo_type="dataset", private=True)
    api.upload_file(path_or_fileobj=b"an older build", path_in_repo="data/default/train-00000-of-00001.parquet",
                    repo_id=f"{USER}/parts", repo_type="dataset")  # fmt: skip
    hub.lfs.clear()  # from here on, only what the push sends

    push_dataset(partitioned, f"{USER}/parts")

    files = hub.files("dataset", f"{USER}/parts")
    data = sorted(p for p in files if p.startswith("data/"))
    assert data == sorted(_parquet_files(partitioned, "data"))  # the stale file is gone
    ids = Counter()
    for path in data:
        table = pq.read_table(io.BytesIO(files[path]["data"]), columns=["image_id", "image"])
        ids.update(table["image_id"].to_pylist())
    expected = [i for split in local["default"].values() for i in split["image_id"]]
    assert sorted(ids) == sorted(expected) and set(ids.values()) == {1}
    # the LFS objects the push sent: every image among them exactly once (labels files carry none)
    sent = Counter()
    for blob in hub.lfs.values():
        schema = pq.read_schema(io.BytesIO(blob))
        if "image" in schema.names:
            sent.update(pq.read_table(io.BytesIO(blob), columns=["image_id"])["image_id"].to_pylist())
    assert sent == Counter(expected)
    for config, want in local.items():
        got = load_dataset(f"{USER}/parts", config)
        assert set(got) == set(want), config
        for split in want:
            assert as_rows(got[split]) == as_rows(want[split]), (config, split)


def test_join_labels_reports_missing_images(built, local):
    default = local("default")["train"]
    images = default.select_columns(["image_id", "image"]).select(range(2, len(default)))
    with pytest.raises(ValueError, match="2 of .* label rows have no image") as err:
        join_labels(local("labels")["train"], images)
    assert default[0]["image_id"] in str(err.value)


def test_push_model_round_trip(checkpoint, request):
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    before = listing(checkpoint)
    hub = request.getfixturevalue("fake_hub")

    push_model(checkpoint, f"{USER}/expert")

    files = hub.files("model", f"{USER}/expert")
    assert hub.repo("model", f"{USER}/expert")["private"]
    assert set(files) == {"model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                          "all_results.json", "training_config.json"}  # fmt: skip
    assert listing(checkpoint) == before
    assert files["model.safetensors"]["data"] == (checkpoint / "model.safetensors").read_bytes()
    # the saved run config names folders of this machine: published, they are reduced to their names
    assert json.loads(files["training_config.json"]["data"]) == {"data": "affectnet_plus",
                                                                 "train": {"output_dir": "happy-f0", "max_steps": 1}}
    assert _leaks(files, _local_paths(checkpoint.parent, checkpoint)) == {}
    # transformers 5 renames some keys on load: compare with the same checkpoint loaded from disk.
    remote = AutoModelForImageClassification.from_pretrained(f"{USER}/expert").state_dict()
    loaded = AutoModelForImageClassification.from_pretrained(checkpoint).state_dict()
    assert set(remote) == set(loaded) and len(remote) > 10
    for name, tensor in loaded.items():
        assert torch.equal(remote[name], tensor), name
    classify = pipeline("image-classification", model=f"{USER}/expert")
    out = classify(Image.new("RGB", (40, 50), (200, 120, 90)))
    assert {o["label"] for o in out} == {"happy", "not_happy"}


def _local_paths(tmp_path, *folders) -> list[str]:
    """The build machine's absolute paths that a published file must not name."""
    home = os.path.expanduser("~")
    paths = {str(tmp_path), *(str(f) for f in folders), *(str(Path(f).resolve()) for f in folders)}
    return sorted(p for p in paths | {home, os.getcwd()} if len(p) > 1)


def _leaks(files: dict[str, dict], needles: list[str]) -> dict[str, list[str]]:
    """``{pushed file: [paths found in its bytes]}`` for every pushed file that names one."""
    found = {path: [n for n in needles if n.encode() in f["data"]] for path, f in files.items()}
    return {path: names for path, names in found.items() if names}


def test_pushed_build_names_no_local_path(make_affectnet, tmp_path, request):
    """A build whose rows are rejected for every file-level reason publishes no path of the build machine."""
    from affectnet_plus import AffectNetPlusConfig
    from builder.export import BuildOptions, build
    from tests.conftest import affectnet_row, face_image

    outside = tmp_path / "outside.jpg"
    face_image(300, 280).save(outside)
    rows = [affectnet_row(f"0/ok{i}.jpg", label=i % 8, seed=i) for i in range(4)]
    rows += [affectnet_row(name) for name in ("0/missing.jpg", "0/truncated.jpg", "0/empty.jpg", "0/text.jpg",
                                               "0/link.jpg", "../../outside.jpg", str(outside))]  # fmt: skip
    root = make_affectnet({"train": rows}, root=tmp_path / "src" / "AffectNet")
    images = root / "Manually_Annotated_Images" / "0"
    (images / "missing.jpg").unlink()
    data = (images / "truncated.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    (images / "link.jpg").unlink()
    os.symlink(outside, images / "link.jpg")
    out = tmp_path / "site" / "affectnet_plus"
    report = build(root, out, AffectNetPlusConfig(), BuildOptions(progress=False, max_rejected_fraction=1.0))
    assert report["written"] == 4 and report["rejected"] == {
        "empty_file": 1, "missing_file": 1, "not_an_image": 1, "path_escapes_root": 3, "truncated_image": 1}  # fmt: skip
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    details = {r["image_id"] or r["row"]: r["detail"] for r in rejects}
    assert details["Manually_Annotated_Images/0/missing"] == "Manually_Annotated_Images/0/missing.jpg"
    assert details["Manually_Annotated_Images/0/truncated"].startswith("Manually_Annotated_Images/0/truncated.jpg: ")
    hub = request.getfixturevalue("fake_hub")

    push_dataset(out, f"{USER}/clean")

    files = hub.files("dataset", f"{USER}/clean")
    local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # what the folder holds and nothing else (no work folder, no temporary file), but the local build config
    assert set(files) == local - {"build_config.json"} and "build_config.json" in local
    assert {"README.md", "build_report.json", "rejects.jsonl"} <= local
    assert all(p in {"README.md", "build_report.json", "rejects.jsonl", "build_config.json"}
               or p.startswith(("data/", "labels/")) for p in local)  # fmt: skip
    needles = _local_paths(tmp_path, root, out, outside)
    assert _leaks(files, needles) == {}

    # Negative control: the same search finds a path once one is planted in a published file.
    with open(out / "rejects.jsonl", "a") as f:
        f.write(json.dumps({"detail": str(images / "missing.jpg")}) + "\n")
    push_dataset(out, f"{USER}/planted")
    assert set(_leaks(hub.files("dataset", f"{USER}/planted"), needles)) == {"rejects.jsonl"}


def test_fake_hub_answers_like_the_hub(built, request):
    """The error contracts the clients rely on: EntryNotFound for a missing folder, 401 without a token."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError

    hub = request.getfixturevalue("fake_hub")
    api = HfApi()
    api.create_repo(f"{USER}/x", repo_type="dataset", private=True)
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(f"{USER}/x", path_in_repo="data/train", repo_type="dataset"))
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).dataset_info(f"{USER}/x")
    assert api.whoami()["name"] == USER
    assert hub.repo("dataset", f"{USER}/x")["private"]


def test_push_without_token_fails_before_any_request(built, checkpoint, request, monkeypatch):
    hub = request.getfixturevalue("fake_hub")
    monkeypatch.delenv("HF_TOKEN")
    for push, folder in ((push_dataset, built), (push_model, checkpoint)):
        with pytest.raises(HubPushError, match="hf auth login.*HF_TOKEN"):
            push(folder, f"{USER}/x")
    assert hub.requests == []


def test_push_to_foreign_namespace_names_repo_not_token(built, checkpoint, request):
    hub = request.getfixturevalue("fake_hub")
    before = listing(built), listing(checkpoint)
    for push, folder, kwargs in ((push_dataset, built, {}), (push_dataset, built, {"labels_only": True}),
                                 (push_model, checkpoint, {})):  # fmt: skip
        with pytest.raises(HubPushError, match="someone-else/affectnet_plus") as err:
            push(folder, "someone-else/affectnet_plus", **kwargs)
        assert TOKEN not in str(err.value) and "403" in str(err.value)
        assert TOKEN not in repr(err.value.__cause__)
    assert hub.repos == {}
    assert (listing(built), listing(checkpoint)) == before


def test_push_with_refused_token(built, request, monkeypatch):
    request.getfixturevalue("fake_hub")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubPushError, match=f"{USER}/affectnet_plus.*401") as err:
        push_dataset(built, f"{USER}/affectnet_plus")
    assert "hf_wrong" not in str(err.value)


def test_refuses_unfinished_build(built, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(built, folder)
    (folder / ".build").mkdir()
    with pytest.raises(ValueError, match="unfinished build"):
        push_dataset(folder, f"{USER}/x", token=TOKEN)
    shutil.rmtree(folder / ".build")
    shutil.rmtree(folder / "labels")  # e.g. a folder of an older layout, whose labels lay under data/
    with pytest.raises(ValueError, match="no Parquet files under labels/"):
        push_dataset(folder, f"{USER}/x", token=TOKEN)
    with pytest.raises(ValueError, match="no Parquet files under labels/"):
        push_dataset(folder, f"{USER}/x", labels_only=True, token=TOKEN)
    (folder / "README.md").unlink()
    with pytest.raises(ValueError, match="no README.md"):
        push_dataset(folder, f"{USER}/x", token=TOKEN)


def test_refuses_pickles_and_missing_safetensors(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    (folder / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle files.*training_args.bin"):
        push_model(folder, f"{USER}/x", token=TOKEN)
    (folder / "training_args.bin").unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        push_model(folder, f"{USER}/x", token=TOKEN)


def test_cli_push_dataset_and_model(built, checkpoint, request, capsys):
    from scripts.cli import main as cli

    hub = request.getfixturevalue("fake_hub")
    assert cli(["push", "dataset", str(built), "--repo", f"{USER}/cli_labels", "--labels-only"]) == 0
    assert hub.repos[("dataset", f"{USER}/cli_labels")]["gated"] == "manual"
    assert cli(["push", "model", str(checkpoint), "--repo", f"{USER}/cli-model"]) == 0
    assert hub.repos[("model", f"{USER}/cli-model")]["private"] is True
    assert cli(["push", "model", str(built), "--repo", f"{USER}/nope"]) == 2  # not a checkpoint
    assert cli(["push", "dataset", str(built), "--repo", "someone-else/x"]) == 2  # not our namespace
    assert TOKEN not in capsys.readouterr().err
