"""``affectnet-plus`` starts fast: the parser of a run has the arguments of its own command only, so
``--help`` and light commands do not import the models (transformers and the rest), and each command's
options are exactly those of the parser built with every command."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.cli import COMMANDS, main, make_parser

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("transformers", "accelerate", "models.labeling", "models.expert", "builder.predict")


def imported_by(*argv: str) -> set[str]:
    """The modules of ``HEAVY`` (and ``datasets``, ``torch``) that ``main(argv)`` imports, in a fresh interpreter."""
    code = (
        "import json, sys\n"
        "from scripts.cli import main\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps([m for m in {[*HEAVY, 'datasets', 'torch']!r} if m in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


@pytest.mark.parametrize("argv", [["--help"], [], ["no-such-command"], ["truth", "--help"]])
def test_help_and_light_commands_import_nothing_heavy(argv):
    assert imported_by(*argv) == set()


@pytest.mark.parametrize("command", ["sample", "build"])
def test_data_commands_do_not_import_the_models(command):
    assert not imported_by(command, "--help") & set(HEAVY)


def test_a_command_whose_options_come_from_the_models_imports_them():
    """The control: the check above sees an import when there is one."""
    assert "models.expert" in imported_by("train-experts", "--help")


def test_the_top_level_help_lists_every_command_with_its_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, help, _ in COMMANDS:
        assert f"{name} {' '.join(help.split())}" in text
    assert make_parser([]).format_help() == make_parser().format_help()


def options(parser: argparse.ArgumentParser) -> list[tuple]:
    return [
        (a.option_strings, a.dest, repr(a.default), a.required, a.choices, a.nargs, a.help, a.type, a.metavar)
        for a in parser._actions
    ]


@pytest.mark.parametrize("command", [name for name, _, _ in COMMANDS])
def test_a_command_parser_is_the_one_built_with_every_command(command, capsys):
    full = subcommand(make_parser(), command)
    alone = subcommand(make_parser([command]), command)
    assert options(alone) == options(full) and alone._defaults == full._defaults
    assert len(options(full)) > 1  # more than --help
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == full.format_help()


def test_commands_not_run_get_no_arguments():
    parser = make_parser(["truth"])
    assert [a.dest for a in subcommand(parser, "sample")._actions] == ["help"]
    assert parser.parse_args(["truth", "built", "--ground-truth", "gt.jsonl"]).ground_truth == "gt.jsonl"
