"""Every ``affectnet-plus`` subcommand explains itself: ``--help`` exits 0, with a description and help text
for every option. The subcommands are found in ``scripts.cli.make_parser``, not listed here."""

import argparse

import pytest

from scripts.cli import main, make_parser

MIN_DESCRIPTION = 60  # characters: a sentence, not a word


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{name: parser}`` of every subcommand registered on ``parser``."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub for action in actions for name, sub in action.choices.items()}


def unexplained(parser: argparse.ArgumentParser) -> list[str]:
    """What ``parser`` leaves unexplained: a missing or trivial description, options without help."""
    problems = []
    description = (parser.description or "").strip()
    if len(description) < MIN_DESCRIPTION or len(description.split()) < 8:
        problems.append(f"{parser.prog}: description {description!r} says too little")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help if action.help is not argparse.SUPPRESS else None
        if not (text and text.strip()):
            problems.append(f"{parser.prog}: {'/'.join(action.option_strings) or action.dest} has no help text")
    return problems


COMMANDS = sorted(subcommands(make_parser()))


def test_the_checker_finds_what_is_unexplained():
    parser = argparse.ArgumentParser(
        prog="demo", description="Do one thing to every file of a folder and report what was done."
    )
    parser.add_argument("--documented", help="this one says what it does")
    assert unexplained(parser) == []
    parser.add_argument("--silent")
    parser.add_argument("target")
    assert unexplained(parser) == ["demo: --silent has no help text", "demo: target has no help text"]
    assert unexplained(argparse.ArgumentParser(prog="terse", description="Builds.")) == [
        "terse: description 'Builds.' says too little"
    ]
    assert len(COMMANDS) >= 10 and {"build", "predict"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_explains_itself(command, capsys):
    parser = subcommands(make_parser())[command]
    assert unexplained(parser) == []
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: affectnet-plus {command}")
    assert " ".join(parser.description.split()[:6]) in " ".join(text.split())
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text, option
