"""Options generated from config dataclasses, and --config files for subcommands."""

import argparse
import json
from dataclasses import dataclass, field

import pytest

from scripts.options import ConfigFileParser, add_arguments, add_config_argument, field_help, from_args


@dataclass
class Inner:
    """Inner settings.

    Args:
        rate: how fast, per step.
        names: which ones,
            over two lines.
    """

    rate: float = 0.5
    names: tuple[str, ...] = ("a", "b")


@dataclass
class Outer:
    """Outer settings.

    Args:
        data: where the data is.
        mode: how to run.
        fast: skip the slow part.
    """

    data: str
    inner: Inner = field(default_factory=Inner)
    mode: str = field(default="x", metadata={"choices": ("x", "y")})
    fast: bool = False


def _parser():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", parser_class=ConfigFileParser)
    run = commands.add_parser("run")
    add_config_argument(run)
    add_arguments(run, Outer)
    return parser


def test_help_comes_from_the_docstring():
    assert field_help(Inner) == {"rate": "how fast, per step.", "names": "which ones, over two lines."}


def test_a_subcommand_takes_its_defaults_from_a_config_file_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": "d", "inner": {"rate": 0.25, "names": ["c"]}, "mode": "y"}))
    args = _parser().parse_args(["run", "--config", str(config), "--rate", "0.75", "--fast"])
    assert from_args(Outer, args) == Outer("d", Inner(0.75, ("c",)), "y", True)
    # without the file the required option is required, and the defaults are the dataclass's
    with pytest.raises(SystemExit):
        _parser().parse_args(["run"])
    assert from_args(Outer, _parser().parse_args(["run", "--data", "e"])) == Outer("e")


def test_a_config_file_with_an_unknown_key_or_a_bad_choice_is_an_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: d\nlerning_rate: 3\n")
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--config", str(config)])
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--data", "d", "--mode", "z"])
    config.write_text("data: d\nmode: z\n")  # a choice is checked in the file too
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--config", str(config)])


def test_a_percent_sign_in_a_docstring_does_not_break_help():
    @dataclass
    class Noisy:
        """Noise.

        Args:
            share: about 5 % of the rows.
        """

        share: float = 0.05

    parser = argparse.ArgumentParser()
    add_arguments(parser, Noisy)
    assert "about 5 % of the rows" in parser.format_help()


def test_a_list_option_in_a_config_file_is_checked_value_by_value(tmp_path):
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", parser_class=ConfigFileParser)
    run = commands.add_parser("run")
    add_config_argument(run)
    run.add_argument("--emotions", nargs="+", choices=("happy", "sad"), default=["happy", "sad"])
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"emotions": ["sad"]}))  # what a saved training_config.json holds
    assert parser.parse_args(["run", "--config", str(config)]).emotions == ["sad"]
    config.write_text(json.dumps({"emotions": ["sad", "angry"]}))
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--config", str(config)])
