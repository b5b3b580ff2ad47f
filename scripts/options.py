"""Command-line options generated from the project's config dataclasses, so that every default and every
help text lives in one place: the dataclass and its docstring's ``Args:`` section.

A field ``learning_rate: float = 1e-4`` becomes ``--learning-rate`` (type float, default 1e-4, help from
the docstring); a ``bool`` field becomes ``--flag`` / ``--no-flag``; a nested dataclass field (``train:
TrainConfig``) contributes its own fields, unprefixed. ``--config FILE`` (YAML or JSON, e.g. the
``training_config.json`` saved next to a checkpoint) sets the defaults of a run, and options given on
the command line override it, so any run can be repeated from its saved resolved config.

Example:
    >>> import argparse
    >>> from models.training import TrainConfig
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser, TrainConfig)
    >>> config = from_args(TrainConfig, parser.parse_args(["--output-dir", "run", "--seed", "3"]))
    >>> config.seed, config.learning_rate
    (3, 0.0001)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path

CONFIG_OPTION = "config"


def field_help(cls) -> dict[str, str]:
    """``{field: help}`` from the ``Args:`` sections of ``cls``'s docstring and its bases' (first wins).

    An entry may name several fields (``learning_rate, weight_decay: AdamW ...``).
    """
    helps: dict[str, str] = {}
    for klass in cls.__mro__:
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        lines = doc.splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
        except StopIteration:
            continue
        indent, names, text = None, [], []
        for line in [*lines[start + 1 :], ""]:
            if line.strip() and indent is None:
                indent = len(line) - len(line.lstrip())
            depth = len(line) - len(line.lstrip())
            entry = re.match(r"^([\w, ]+):\s*(.*)$", line.strip()) if line.strip() and depth == indent else None
            if entry or not line.strip() or (line.strip() and depth < (indent or 0)):
                for name in names:
                    helps.setdefault(name, " ".join(text))
                names, text = [], []
            if entry:
                names = [n.strip() for n in entry.group(1).split(",")]
                text = [entry.group(2)]
            elif line.strip() and names:
                text.append(line.strip())
            if line.strip() and depth < (indent or 0):
                break
    return helps


def _fields(cls, exclude=()) -> list[tuple[dataclasses.Field, object]]:
    """(field, resolved type) of ``cls``'s own init fields, ``exclude`` left out (nested dataclasses included)."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and f.name not in exclude]


def _base_type(kind):
    """``int | None`` -> ``int``; the element type of ``tuple[str, ...]`` / ``list[str]`` with nargs."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, None)
    if origin in (tuple, list):
        return typing.get_args(kind)[0], "+"
    return kind, None


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def add_arguments(parser, cls, exclude=(), title: str | None = None, helps: dict | None = None) -> None:
    """Adds one option per field of ``cls`` (see the module docstring) to ``parser`` or a new group ``title``.

    A nested dataclass gets a group of its own, titled by its docstring's first line. Fields whose type
    has no command-line form (dicts) are skipped: they keep their defaults. ``helps`` overrides
    docstring help texts.
    """
    target = parser.add_argument_group(title) if title else parser
    texts = {**field_help(cls), **(helps or {})}
    nested = []
    for field, kind in _fields(cls, exclude):
        if dataclasses.is_dataclass(kind):
            nested.append(kind)
            continue
        base, nargs = _base_type(kind)
        if base not in (int, float, str, bool, Path):
            continue
        default = _default(field)
        option = "--" + field.name.replace("_", "-")
        kwargs = dict(dest=field.name, help=texts.get(field.name, "").replace("%", "%%"))  # argparse formats help
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if nargs:
                kwargs["nargs"] = nargs
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = list(default) if nargs and default is not None else default
        target.add_argument(option, **kwargs)
    for kind in nested:
        heading = inspect.cleandoc(kind.__doc__ or kind.__name__).splitlines()[0].rstrip(".")
        add_arguments(parser, kind, exclude, title=heading, helps=helps)


def from_args(cls, args, **fixed):
    """An instance of ``cls`` from parsed ``args`` (a Namespace or dict); nested dataclasses are rebuilt.

    ``fixed`` sets fields directly (e.g. a nested config built another way).
    """
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.name in fixed:
            kwargs[field.name] = fixed[field.name]
        elif dataclasses.is_dataclass(hints[field.name]):
            kwargs[field.name] = from_args(hints[field.name], values)
        elif field.name in values:
            value = values[field.name]
            base, nargs = _base_type(hints[field.name])
            if nargs and value is not None and typing.get_origin(hints[field.name]) is not list:
                value = tuple(value)
            if isinstance(value, Path) and base is str:
                value = str(value)
            kwargs[field.name] = value
    return cls(**kwargs)


def flatten(config: dict) -> dict:
    """A nested config (as ``dataclasses.asdict`` writes it) -> one flat ``{field: value}`` dict."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and key not in ("full_scale",):
            flat.update(flatten(value))
        else:
            flat[key] = value
    return flat


def add_config_argument(parser) -> None:
    """``--config FILE``: a YAML/JSON file of option values (a saved resolved config) used as defaults."""
    parser.add_argument(
        "--" + CONFIG_OPTION,
        default=None,
        metavar="FILE",
        help="YAML or JSON file of option values (e.g. a run's saved training_config.json); options given on "
        "the command line override it",
    )


def parse_args(parser, argv=None):
    """``parser.parse_args`` after applying the ``--config`` file, if one is given, as defaults.

    Unknown keys in the file are an error (a typo would otherwise be silently ignored).
    """
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--" + CONFIG_OPTION, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            parser.error(f"--config {path}: expected a mapping of option names to values")
        values = flatten(loaded)
        dests = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(dests))
        if unknown:
            parser.error(f"--config {path}: unknown options {', '.join(unknown)}")
        for name, value in values.items():
            choices = dests[name].choices
            many = dests[name].nargs in ("+", "*") and isinstance(value, (list, tuple))  # e.g. emotions: [...]
            bad = [v for v in (value if many else [value]) if v is not None and choices is not None and v not in choices]
            if bad:
                parser.error(f"--config {path}: {name} must be one of {', '.join(map(str, choices))}, got {bad[0]!r}")
            dests[name].required = False
        parser.set_defaults(**values)
    return parser.parse_args(argv)


class ConfigFileParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``--config FILE`` (``add_config_argument``) sets its defaults, as
    ``parse_args`` does; made for subcommands: ``add_subparsers(parser_class=ConfigFileParser)``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> commands = parser.add_subparsers(dest="command", parser_class=ConfigFileParser)
        >>> run = commands.add_parser("run")
        >>> add_config_argument(run); _ = run.add_argument("--seed", type=int, default=0)
        >>> parser.parse_args(["run", "--seed", "3"]).seed
        3
    """

    _applying = False

    def parse_known_args(self, args=None, namespace=None):
        if self._applying or not any(a.dest == CONFIG_OPTION for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._applying = True  # parse_args parses with this parser again, without the file step
        try:
            return parse_args(self, args), []
        finally:
            self._applying = False

