"""What every build stage shares: fingerprints, completion markers, atomic writes, a fault-injection hook.

A build (``builder.export.build``) runs its stages in order: crop, metadata, score, fit, fuse, export.
Stage ``<name>`` keeps its state and outputs in ``OUT/.build/<name>/``::

    FINGERPRINT.json   the stage's fingerprint; written (atomically) before its first output
    DONE.json          the completion marker: the fingerprint's digest and a small result; written last
    ...                its outputs, keyed by shard name (``<split>-NNNNN-of-NNNNN``), each written once,
                       atomically (a temporary file in ``OUT/.build/`` renamed into place)

A fingerprint is a JSON-able dict of everything that changes the stage's output, upstream stages'
digests included, so a change anywhere redoes that stage and every stage after it. ``Stage.start``
decides: a marker with the current digest means the stage is done (skipped); a ``FINGERPRINT.json``
with the current digest means it was interrupted (resumed: the outputs on disk are complete, since
each was renamed into place whole, and are kept); anything else means its outputs belong to other
inputs, and the folder is deleted before the stage starts again, so stale outputs are never mixed in.

Fault injection, for tests: with ``AFFECTNET_PLUS_KILL_AFTER=<stage>:<n>`` in the environment, the process
kills itself with SIGKILL right after the n-th output of that stage is in place (``Stage.wrote``).

Example:
    >>> stage = Stage(work, "score", {"crop": "1f2e...", "experts": {...}})  # doctest: +SKIP
    >>> if stage.start():  # doctest: +SKIP
    ...     write_atomic(stage.dir / "train-00000-of-00001.parquet", data, work); stage.wrote()
    ...     stage.finish({"rows": 10})
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

from datasets.arrow_writer import ParquetWriter

from core import files

FINGERPRINT_FILE = "FINGERPRINT.json"
DONE_FILE = "DONE.json"
KILL_ENV = "AFFECTNET_PLUS_KILL_AFTER"


def digest(value) -> str:
    """A short sha256 of a JSON-able value (keys sorted): equal values, equal digests."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_sha256(path) -> str:
    """The first 16 hex digits of a file's sha256, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def write_atomic(path: Path, data: bytes | str, work: Path) -> None:
    """Writes ``data`` through a temporary file in ``work`` (the build's own file system), renamed to ``path``."""
    files.write_atomic(path, data, work)


def write_json_atomic(path: Path, value, work: Path, indent: int | None = 2, sort_keys: bool = True) -> None:
    files.write_json_atomic(path, value, work, indent, sort_keys)


def write_parquet_atomic(path: Path, features, work: Path, rows: dict | None = None, table=None) -> None:
    """Writes ``rows`` (a column dict) or an Arrow ``table`` as Parquet with the ``datasets`` schema
    metadata of ``features``, atomically."""
    tmp = work / f".tmp-{os.getpid()}-{path.name}"
    writer = ParquetWriter(path=str(tmp), features=features)
    if table is not None:
        writer.write_table(table)
    else:
        writer.write_batch(rows)
    writer.finalize()
    writer.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Stage:
    """One stage of a build: its folder ``work/<name>``, its fingerprint, its marker.

    Args:
        work: the build's work folder (``OUT/.build``).
        name: the stage's name, also its folder's.
        fingerprint: everything that changes the stage's output (JSON-able).
    """

    def __init__(self, work: Path, name: str, fingerprint: dict):
        self.work, self.name, self.fingerprint = work, name, fingerprint
        self.dir = work / name
        self.digest = digest(fingerprint)
        self.fresh = False  # set by start(): the folder was (re)created, nothing of it is kept
        self._written = 0

    def result(self) -> dict | None:
        """The result saved by ``finish`` when the marker matches this fingerprint, else None."""
        marker = _read_json(self.dir / DONE_FILE)
        if isinstance(marker, dict) and marker.get("digest") == self.digest:
            return marker.get("result", {})
        return None

    def started(self) -> bool:
        """Whether the folder holds (possibly unfinished) work of this very fingerprint."""
        saved = _read_json(self.dir / FINGERPRINT_FILE)
        return isinstance(saved, dict) and saved.get("digest") == self.digest

    def start(self) -> bool:
        """False if the stage is done; otherwise prepares its folder (kept when ``started``, recreated
        empty when it holds other inputs' work) and returns True."""
        if self.result() is not None:
            return False
        if not self.started():
            self.reset()
        return True

    def reset(self) -> None:
        """Deletes the stage's folder and starts it afresh under the current fingerprint."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        write_json_atomic(self.dir / FINGERPRINT_FILE, {"digest": self.digest, "fingerprint": self.fingerprint},
                          self.work)  # fmt: skip
        self.fresh = True

    def finish(self, result: dict | None = None) -> dict:
        """Writes the completion marker (last, atomically) with a small JSON-able ``result``."""
        result = result or {}
        # keys in their order: a resumed build must see the splits in the order a fresh one does
        write_json_atomic(self.dir / DONE_FILE, {"digest": self.digest, "result": result}, self.work, sort_keys=False)
        return result

    def wrote(self) -> None:
        """Call after each output is in place: counts it for the fault-injection hook (module docstring)."""
        self._written += 1
        if os.environ.get(KILL_ENV) == f"{self.name}:{self._written}":
            os.kill(os.getpid(), signal.SIGKILL)


def read_columns(name: str, dirs: list[Path], columns: list[str]):
    """Columns of the shard ``name``, each taken from the first of ``dirs`` (stage folders, the later
    stages first) whose shard of that name holds it; the shards must list the same ``image_id``s.

    Returns a ``pyarrow.Table`` with the columns found, in the order of ``columns``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, ids = {}, None
    for folder in dirs:
        path = folder / name
        if not path.is_file():
            continue
        have = [c for c in columns if c not in arrays and c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=list(dict.fromkeys(["image_id", *have])))
        if ids is None:
            ids = table["image_id"]
        elif not table["image_id"].equals(ids):
            raise RuntimeError(f"{path} does not list the same rows as the other stages' {name}")
        for column in have:
            arrays[column] = table[column]
    return pa.table({c: arrays[c] for c in columns if c in arrays})
