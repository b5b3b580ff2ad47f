"""The staged build: markers and fingerprints, kills inside every stage, changed inputs after a kill.

Kills are deterministic: a build runs as ``affectnet-plus build`` in a subprocess with
``AFFECTNET_PLUS_KILL_AFTER=<stage>:<n>`` (``builder.stage``), and SIGKILLs itself right after the n-th
output of that stage is in place.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from affectnet_plus import AffectNetPlusConfig
from builder.export import AUModelConfig, BuildOptions, FusionConfig, build
from builder.stage import DONE_FILE, FINGERPRINT_FILE, KILL_ENV, Stage, write_atomic
from core.schema import PARTITIONS
from tests.builder.test_fold_plan import planned_manifest

ROOT = Path(__file__).parents[2]
STAGES = ("crop", "metadata", "score", "fit", "fuse", "export")
# The export writes at most one data/ and one labels/ file per partition of a crop shard: its output
# number 2 * len(PARTITIONS) + 1 comes after the first crop shard was consumed.
PAST_FIRST_SHARD = 2 * len(PARTITIONS) + 1


def _files(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _cli_build(source, out, *args, kill: str | None = None) -> subprocess.CompletedProcess:
    """``affectnet-plus build`` in a subprocess (from the repository root); ``kill`` = ``"<stage>:<n>"``."""
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill:
        env[KILL_ENV] = kill
    command = [sys.executable, "-m", "scripts.cli", "build", str(source), "--out", str(out), "--quiet", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    """40 rendered faces in the raw AffectNet layout: 28 train, 4 validation, 8 unlabeled rows."""
    from builder.sample import SampleConfig, write_sample

    root = tmp_path_factory.mktemp("small_sample") / "raw"
    write_sample(root, SampleConfig(n=40, seed=0))
    return root


def test_a_stage_is_skipped_when_done_resumed_when_started_and_reset_when_its_inputs_change(tmp_path):
    work = tmp_path / ".build"
    work.mkdir()
    stage = Stage(work, "score", {"crop": "abc", "experts": 1})
    assert stage.start() and stage.fresh and (stage.dir / FINGERPRINT_FILE).is_file()
    write_atomic(stage.dir / "train-00000-of-00002.parquet", b"one", work)
    # interrupted, then started again with the same inputs: what it wrote is kept
    again = Stage(work, "score", {"crop": "abc", "experts": 1})
    assert again.started() and again.start() and not again.fresh
    assert (stage.dir / "train-00000-of-00002.parquet").read_bytes() == b"one"
    assert again.finish({"rows": 3}) == {"rows": 3} and (stage.dir / DONE_FILE).is_file()
    done = Stage(work, "score", {"crop": "abc", "experts": 1})
    assert not done.start() and done.result() == {"rows": 3}
    # other inputs: the stage's outputs are stale and deleted before it runs again
    changed = Stage(work, "score", {"crop": "abc", "experts": 2})
    assert changed.result() is None and not changed.started()
    assert changed.start() and changed.fresh
    assert sorted(p.name for p in changed.dir.iterdir()) == [FINGERPRINT_FILE]
    assert changed.digest != done.digest and len(changed.digest) == 16


@pytest.mark.slow
def test_a_full_build_killed_inside_every_stage_resumes_to_identical_bytes(small_sample, experts, tmp_path,
                                                                          needs_gear, monkeypatch):  # fmt: skip
    """Metadata annotators, experts, fitted λ and T and a calibrated AU model: the build is killed inside
    each stage in turn, each run resuming the previous one, and the last run's folder is byte for byte
    the uninterrupted build's."""
    monkeypatch.chdir(ROOT)  # build_config.json names the experts relative to the working directory
    experts = planned_manifest(experts, tmp_path / "experts", small_sample)  # as if trained on this sample
    reference = tmp_path / "reference" / "affectnet_plus"
    build(small_sample, reference, AffectNetPlusConfig(), BuildOptions(shard_rows=20, progress=False),
          experts=str(experts), fusion=FusionConfig(fit=True), metadata=True,
          au_model=AUModelConfig(shape_components=2, calibrate_au=True))  # fmt: skip
    report = json.loads((reference / "build_report.json").read_text())
    assert set(report["fingerprint"]["stages"]) == set(STAGES)
    assert set(report["fingerprint"]["metadata"]) == {"head_pose", "age_gender", "ethnicity"}
    assert report["fusion"]["au_model"]["calibration"] and report["fusion"]["fitted_on"]["split"] == "train"

    args = ["--experts", str(experts), "--fit-fusion", "--calibrate-au", "--shape-components", "2",
            "--shard-rows", "20"]  # fmt: skip
    out = tmp_path / "resumed" / "affectnet_plus"
    work = out / ".build"
    for i, stage in enumerate(STAGES):
        run = _cli_build(small_sample, out, *args, kill=f"{stage}:1")
        assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
        assert all((work / done / DONE_FILE).is_file() for done in STAGES[:i])  # the stages before it finished
        assert (work / stage / FINGERPRINT_FILE).is_file() and not (work / stage / DONE_FILE).is_file()
    # Killed again inside the export, once it has consumed a crop shard: the resumed export skips that
    # shard (its files are in place) and writes the rest.
    crops = len(list((work / "crop").glob("*.parquet")))
    run = _cli_build(small_sample, out, *args, kill=f"export:{PAST_FIRST_SHARD}")
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert len(list((work / "crop").glob("*.parquet"))) < crops
    assert not (out / "build_report.json").exists()
    run = _cli_build(small_sample, out, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(out) == _files(reference)
    assert not work.exists() and not any(p.name.startswith(".tmp-") for p in out.rglob("*"))


@pytest.mark.slow
def test_a_crop_killed_after_a_shard_still_rejects_the_copies_of_its_images(small_sample, tmp_path):
    """A copy of the first train image under other ids, at the end of the train and validation rows: a crop
    stage killed after the first shard, and again later, reads back the image hashes of the shards it
    skips, and rejects both copies as an uninterrupted build does, in parallel or not."""
    raw = tmp_path / "raw"
    shutil.copytree(small_sample, raw)
    lists, images = raw / "Manually_Annotated_file_lists", raw / "Manually_Annotated_Images"
    path, annotations = (lists / "training.csv").read_text().splitlines()[1].split(",", 1)
    (images / "copies").mkdir()
    for name, csv_file in (("train_copy", "training.csv"), ("validation_copy", "validation.csv")):
        shutil.copyfile(images / path, images / "copies" / f"{name}.jpg")
        with open(lists / csv_file, "a") as f:
            f.write(f"copies/{name}.jpg,{annotations}\n")
    options = ["--no-metadata", "--shard-rows", "4", "--max-rejected-fraction", "1"]
    reference = tmp_path / "reference" / "affectnet_plus"
    build(raw, reference, AffectNetPlusConfig(), BuildOptions(shard_rows=4, progress=False, max_rejected_fraction=1))
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    first = "Manually_Annotated_Images/" + Path(path).with_suffix("").as_posix()
    assert [(r["split"], r["image_id"], r["reason"], r["detail"]) for r in rejects] == [
        ("train", "Manually_Annotated_Images/copies/train_copy", "duplicate_image", first),
        ("validation", "Manually_Annotated_Images/copies/validation_copy", "duplicate_image", first),
    ]

    out = tmp_path / "resumed" / "affectnet_plus"
    crop = out / ".build" / "crop"
    for kill, num_proc in (("crop:1", "2"), ("crop:3", "1")):
        run = _cli_build(raw, out, *options, "--num-proc", num_proc, kill=kill)
        assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
        shards = sorted(p.stem for p in crop.glob("*.parquet"))
        assert shards and sorted(p.stem for p in (crop / "hashes").glob("*.jsonl")) == shards
    assert "train-00000-of-00008" in shards and "train-00007-of-00008" not in shards  # the copy is still to crop
    run = _cli_build(raw, out, *options, "--num-proc", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert _files(out) == _files(reference)


def _perturb(weights: Path) -> None:
    """Changes one expert's classifier head: the same files, other scores."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if k.endswith("classifier.bias"))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.slow
def test_a_changed_input_after_a_kill_redoes_that_stage_and_the_ones_after_it(small_sample, experts, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    monkeypatch.chdir(ROOT)
    mine = tmp_path / "experts"
    shutil.copytree(experts.parent, mine, ignore=shutil.ignore_patterns("checkpoints"))
    manifest = planned_manifest(mine / "manifest.json", mine, small_sample)  # as if trained on this sample
    ran = []  # (stage, started afresh) of every stage that did work, in order
    start = Stage.start

    def spy(self):
        if result := start(self):
            ran.append((self.name, self.fresh))
        return result

    monkeypatch.setattr(Stage, "start", spy)

    def resume_or_build(out, weight=0.5):
        ran.clear()
        build(small_sample, out, AffectNetPlusConfig(), BuildOptions(shard_rows=20, progress=False),
              experts=str(manifest), fusion=FusionConfig(expert_weight=weight))  # fmt: skip
        return _files(out)

    args = ["--experts", str(manifest), "--no-metadata", "--shard-rows", "20"]
    out = tmp_path / "out" / "affectnet_plus"
    # Killed inside fuse; then one expert's weights change. The scores are redone and fuse and export after
    # them; the crops are kept, and so is the fit (λ and T are given: the AU model reads no expert score).
    assert _cli_build(small_sample, out, *args, kill="fuse:1").returncode == -signal.SIGKILL
    _perturb(mine / "happy-f0" / "model.safetensors")
    resumed = resume_or_build(out)
    assert ran == [("score", True), ("fuse", True), ("export", True)]
    assert resume_or_build(tmp_path / "fresh" / "affectnet_plus") == resumed
    assert len(ran) == len(STAGES) - 1  # the fresh build ran every stage (no metadata)

    # Built again with λ = 0.8 (--overwrite) and killed inside export, after it replaced a crop shard by
    # its final files; then resumed with λ = 0.5. The crops are redone (that export consumed one), the
    # scores and the fit kept, fuse and export redone: the folder is the fresh build's again.
    killed = _cli_build(small_sample, out, *args, "--expert-weight", "0.8", "--overwrite",
                        kill=f"export:{PAST_FIRST_SHARD}")  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(list((out / ".build" / "crop").glob("*.parquet"))) < 4  # of 4 crop shards
    assert resume_or_build(out) == resumed
    assert ran == [("crop", True), ("fuse", True), ("export", True)]
