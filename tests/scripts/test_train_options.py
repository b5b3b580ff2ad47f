"""Every training and labelling option is generated from a config dataclass: names, defaults, help, choices."""

import dataclasses
import json
import typing

import pytest

from models.expert import ExpertConfig
from models.fer import FERConfig
from models.labeling import LabelConfig
from models.training import TrainConfig, resolved_config
from models.transforms import AugmentConfig
from models.valence_arousal import RegressorConfig
from scripts.cli import make_parser as cli_parser
from scripts.label import make_parser as label_parser
from scripts.options import add_arguments, field_help, from_args, parse_args
from scripts.train import make_parser as train_parser

# The option names users and scripts rely on (README, reproduce_baselines.sh, the demo).
KEPT = ["--data", "--emotion", "--fold", "--num-folds", "--preset", "--init-from", "--image-size", "--output-dir",
        "--push-to-hub", "--num-train-epochs", "--max-steps", "--per-device-batch-size", "--eval-batch-size",
        "--learning-rate", "--weight-decay", "--warmup-ratio", "--gradient-accumulation-steps", "--max-grad-norm",
        "--checkpointing-steps", "--save-total-limit", "--resume-from-checkpoint", "--report-to", "--num-workers",
        "--seed", "--config"]  # fmt: skip


def leaf_fields(cls, exclude=()):
    """(field, owner class) of every non-dataclass field of ``cls``, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], exclude)
        else:
            yield f, cls


def check_generated(parser, cls, exclude=(), helps=()):
    actions = {a.dest: a for a in parser._actions}
    for f, owner in leaf_fields(cls, exclude):
        action = actions[f.name]
        option = "--" + f.name.replace("_", "-")
        flags = [option, "--no-" + option[2:]] if f.type in (bool, "bool") else [option]  # --flag / --no-flag
        assert action.option_strings == flags, f.name
        expected = field_help(owner).get(f.name) if f.name not in helps else action.help
        assert action.help and action.help == expected, f"{cls.__name__}.{f.name} has no help"
        if f.default is not dataclasses.MISSING:
            default = action.default
            assert (tuple(default) if isinstance(default, list) else default) == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert tuple(action.default) == tuple(f.default_factory()), f.name
        else:
            assert action.required, f.name
        if "choices" in f.metadata:
            assert list(action.choices) == list(f.metadata["choices"]), f.name


def subcommand(parser, name):
    return next(a for a in parser._actions if a.dest == "command").choices[name]


@pytest.mark.parametrize(("command", "cls"), [("expert", ExpertConfig), ("fer", FERConfig),
                                              ("valence-arousal", RegressorConfig)])  # fmt: skip
def test_training_options_come_from_the_configs(command, cls):
    _, commands = train_parser()
    check_generated(commands[command], cls)
    options = {s for a in commands[command]._actions for s in a.option_strings}
    assert set(KEPT) - {"--emotion", "--fold", "--num-folds"} <= options
    if command == "expert":
        assert {"--emotion", "--fold", "--num-folds"} <= options
    if command == "fer":
        assert {"--target", "--num-classes", "--summarise"} <= options


def test_fer_target_choices_include_the_multilabel_variant():
    _, commands = train_parser()
    target = next(a for a in commands["fer"]._actions if a.dest == "target")
    assert list(target.choices) == ["hard", "soft", "soft-multilabel"]
    assert "soft-multilabel" in target.help and "binary cross-entropy" in target.help
    args = parse_args(commands["fer"], ["--data", "d", "--output-dir", "o", "--target", "soft-multilabel"])
    assert from_args(FERConfig, args).target == "soft-multilabel"
    with pytest.raises(SystemExit):
        parse_args(commands["fer"], ["--data", "d", "--output-dir", "o", "--target", "multilabel"])


def test_train_experts_and_label_options_come_from_the_configs():
    experts = subcommand(cli_parser(), "train-experts")
    check_generated(experts, ExpertConfig, exclude=("emotion", "fold", "push_to_hub"),
                    helps=("output_dir", "feature_cache"))
    options = {s for a in experts._actions for s in a.option_strings}
    assert {"--freeze-backbone", "--no-freeze-backbone", "--overwrite", "--feature-cache", "--quiet"} <= options
    assert "--emotions" in {s for a in experts._actions for s in a.option_strings}
    check_generated(label_parser(), LabelConfig)


def test_an_undocumented_field_is_caught():
    @dataclasses.dataclass
    class Documented:
        """A config.

        Args:
            alpha: documented.
        """

        alpha: int = 1
        beta: int = 2

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, Documented)
    with pytest.raises(AssertionError, match="Documented.beta has no help"):
        check_generated(parser, Documented)


@pytest.mark.parametrize(("command", "config"), [
    ("expert", ExpertConfig(data="d", emotion="sad", fold=2, num_folds=3, train=TrainConfig("o", seed=3),
                            augment=AugmentConfig(scale=(0.5, 0.9), hflip=0.0))),
    ("fer", FERConfig(data="d", train=TrainConfig("o", max_steps=7), target="soft", num_classes=7)),
    ("fer", FERConfig(data="d", train=TrainConfig("o"), target="soft-multilabel")),
    ("valence-arousal", RegressorConfig(data="d", train=TrainConfig("o", save_total_limit=2), image_size=32)),
])  # fmt: skip
def test_a_saved_config_parses_back_to_the_same_config(command, config, tmp_path):
    saved = tmp_path / "training_config.json"
    saved.write_text(json.dumps(resolved_config(config)))
    _, commands = train_parser()
    assert from_args(type(config), parse_args(commands[command], ["--config", str(saved)])) == config
    # the command line wins over the file
    again = from_args(type(config), parse_args(commands[command], ["--config", str(saved), "--seed", "9"]))
    assert again.train.seed == 9 and again != config
    saved.write_text(json.dumps({**resolved_config(config), "sed": 1}))  # a typo is an error, not ignored
    with pytest.raises(SystemExit):
        parse_args(commands[command], ["--config", str(saved)])


def test_the_ensembles_saved_settings_parse_back_as_train_experts_options(tmp_path):
    """``train-experts --config OUT/training_config.json`` repeats a run, the frozen mode included."""
    from models.expert import train_experts

    settings = {"data": "d", "num_folds": 2, "preset": "tiny", "init_from": "backbone", "image_size": 224,
                "freeze_backbone": True, "feature_cache": None,
                "train": dataclasses.asdict(TrainConfig("experts")), "augment": dataclasses.asdict(AugmentConfig())}  # fmt: skip
    assert set(settings) <= set(train_experts.__code__.co_varnames)
    saved = tmp_path / "training_config.json"
    saved.write_text(json.dumps(settings))
    experts = subcommand(cli_parser(), "train-experts")
    args = parse_args(experts, ["--config", str(saved)])
    assert args.freeze_backbone is True and args.init_from == "backbone" and args.image_size == 224
