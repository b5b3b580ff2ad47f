"""Atomic file writes: a reader (or a process killed halfway) never sees half a file.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_json_atomic(folder / "report.json", {"b": 1, "a": 2}, sort_keys=True)
    >>> (folder / "report.json").read_text()
    '{\\n  "a": 2,\\n  "b": 1\\n}\\n'
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path, data: bytes | str, tmp_dir=None) -> None:
    """Writes ``data`` to a temporary file in ``tmp_dir`` (default: ``path``'s folder; it must be on the
    same file system) and renames it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp_dir or path.parent) / f".tmp-{os.getpid()}-{path.name}"
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path, value, tmp_dir=None, indent: int | None = 2, sort_keys: bool = False) -> None:
    """``value`` as JSON (plus a newline), written with ``write_atomic``."""
    write_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n", tmp_dir)
