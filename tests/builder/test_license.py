"""Which license a built folder's card carries: it follows the source, never the presence of a file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import DatasetCard

from affectnet_plus import AffectNetPlusConfig
from builder.card import render_card
from builder.export import BuildOptions, build
from builder.sample import SampleConfig, is_bundled_sample, write_sample
from builder.sources import open_source
from models.cards import dataset_license
from tests.conftest import face_image

QUIET = BuildOptions(progress=False)
SMALL = {"min_image_size": 128, "max_image_size": 192}
AFFECTNET_TERMS = {"license": "other", "license_name": "affectnet-research"}


def _license(card: DatasetCard) -> dict:
    return {k: card.data.get(k) for k in ("license", "license_name") if card.data.get(k) is not None}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("license") / "raw"
    write_sample(root, SampleConfig(n=16, seed=2, **SMALL))
    return root


@pytest.fixture(scope="module")
def built(sample, tmp_path_factory) -> tuple[Path, dict]:
    """The sample built once; its cards are re-rendered for other sources and licenses below."""
    out = tmp_path_factory.mktemp("license_out") / "affectnet_plus"
    return out, build(sample, out, AffectNetPlusConfig(), QUIET)


def _card(built, source: Path, **config) -> DatasetCard:
    out, report = built
    config = AffectNetPlusConfig(**config)
    return render_card(out, open_source(source, config), config, report)


def test_the_sample_is_recognised_and_its_card_is_apache(sample, built):
    out, _ = built
    assert is_bundled_sample(sample) and is_bundled_sample(sample, "affectnet")
    assert not is_bundled_sample(sample, "affectnet-plus")  # read in another format, it is not the sample
    card = DatasetCard.load(out / "README.md")
    assert _license(card) == {"license": "apache-2.0"}
    assert "These faces are synthetic" in card.text and "(synthetic sample)" in card.text
    assert dataset_license(out) == ({"license": "apache-2.0"}, "Inherited from the training data: `apache-2.0`.")


def test_the_release_layout_sample_is_recognised_too(tmp_path):
    write_sample(tmp_path, SampleConfig(n=6, seed=1, layout="affectnet-plus", **SMALL))
    assert is_bundled_sample(tmp_path, "affectnet-plus") and not is_bundled_sample(tmp_path, "affectnet")


def test_a_real_source_with_a_ground_truth_file_is_affectnet_licensed(sample, built, small_affectnet):
    # Negative control: the old rule (a file named ground_truth.jsonl) would have called this the sample.
    shutil.copy(sample / "ground_truth.jsonl", small_affectnet / "ground_truth.jsonl")
    assert not is_bundled_sample(small_affectnet)
    card = _card(built, small_affectnet)
    assert _license(card) == AFFECTNET_TERMS
    assert "non-commercial academic research only" in card.text and "synthetic" not in card.text
    out = built[0].parent / "real"
    shutil.copytree(built[0], out)
    card.save(out / "README.md")
    fields, text = dataset_license(out)  # the experts trained on it inherit the terms
    assert {k: fields[k] for k in AFFECTNET_TERMS} == AFFECTNET_TERMS and "non-commercial" in text


def test_a_copied_or_edited_manifest_does_not_make_a_sample(sample, built, small_affectnet, tmp_path):
    # Copied next to real data: the files it lists are not there.
    shutil.copy(sample / "sample_manifest.json", small_affectnet / "sample_manifest.json")
    shutil.copy(sample / "ground_truth.jsonl", small_affectnet / "ground_truth.jsonl")
    assert not is_bundled_sample(small_affectnet)
    assert _license(_card(built, small_affectnet)) == AFFECTNET_TERMS

    def edited(change) -> bool:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(sample, copy)
        assert is_bundled_sample(copy)  # the untouched copy is still the sample (the control)
        change(copy)
        return is_bundled_sample(copy)

    def manifest_edit(edit):
        def change(root):
            manifest = json.loads((root / "sample_manifest.json").read_text())
            edit(manifest)
            (root / "sample_manifest.json").write_text(json.dumps(manifest))

        return change

    an_image = next(p for p in sorted(sample.rglob("*.jpg")))
    relative = an_image.relative_to(sample).as_posix()
    real_photo = lambda root: face_image(200, 200, seed=9).save(root / relative, "JPEG")  # noqa: E731
    assert not edited(real_photo)  # an image swapped for another one
    assert not edited(lambda root: (root / relative).unlink())
    assert not edited(lambda root: face_image(64, 64).save(root / Path(relative).with_name("extra.jpg"), "JPEG"))
    assert not edited(lambda root: (root / "ground_truth.jsonl").write_text("{}\n"))
    assert not edited(manifest_edit(lambda m: m["config"].update(n=17)))  # content edited, signature kept
    assert not edited(manifest_edit(lambda m: m["files"].pop(relative)))
    assert not edited(manifest_edit(lambda m: m.update(signature="0" * 64)))
    assert not edited(manifest_edit(lambda m: m.pop("signature")))
    assert not edited(lambda root: (root / "sample_manifest.json").write_text("not json"))
    assert not edited(lambda root: (root / "sample_manifest.json").unlink())
    # The manifest re-serialised (key order, spacing) is the same manifest: the signature is over its content.
    assert edited(manifest_edit(lambda m: None))


def test_other_formats_are_unknown_and_an_explicit_license_wins(sample, built, small_affectnet, tmp_path):
    folder = tmp_path / "fer"
    (folder / "train" / "happy").mkdir(parents=True)
    face_image(48, 48).save(folder / "train" / "happy" / "a.png")
    shutil.copy(sample / "ground_truth.jsonl", folder / "ground_truth.jsonl")
    card = _card(built, folder, source_format="imagefolder")
    assert _license(card) == {"license": "unknown"} and "State it here before publishing" in card.text

    for source, fmt in ((small_affectnet, "affectnet"), (folder, "imagefolder"), (sample, "affectnet")):
        card = _card(built, source, source_format=fmt, license="CC-BY-4.0 ")
        assert _license(card) == {"license": "cc-by-4.0"}, fmt
        assert "the license given to the build" in card.text and "affectnet-research" not in card.data.to_yaml()
    assert _license(_card(built, sample, license="affectnet-research")) == AFFECTNET_TERMS
    assert _license(_card(built, folder, source_format="imagefolder", license="affectnet-research")) == AFFECTNET_TERMS
    with pytest.raises(ValueError, match="Hub license id"):
        _card(built, small_affectnet, license="my licence, v2")


def test_dataset_license_without_a_card_is_unknown(tmp_path):
    fields, text = dataset_license(tmp_path)
    assert fields == {"license": "unknown"} and "state it" in text
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: lab-terms\nlicense_link: https://x.org\n---\n"
    )
    fields, text = dataset_license(tmp_path)
    assert fields == {"license": "other", "license_name": "lab-terms", "license_link": "https://x.org"}
    assert "`lab-terms`" in text and "AffectNet" not in text
