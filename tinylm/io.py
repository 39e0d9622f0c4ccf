"""Files, the bottom layer: atomic writes, the SHA256SUMS manifest, and reading JSON.

Everything tinylm writes that a user would hate to lose half-written (model directories, checkpoints,
token shards' metadata, configs, reports) goes through ``atomic_write_text`` or ``atomic_directory``:
a reader sees the old content or the new, never a mix, and a crash leaves the last good state.

This module imports nothing from tinylm, so every other module can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "SHA256SUMS"


class DataError(ValueError):
    """A file is missing, unreadable or not what was expected.

    The message names the file (and the line, item, row or field) and what was expected; ``reason`` is a
    short name for the kind of problem, the key under which readers with ``skip_bad`` count it."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


# -- atomic writes ------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so readers see the old content or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the permissions of an ordinary file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_text(data, indent: int = 2) -> str:
    """``data`` as pretty JSON with a final newline; non-ASCII text (Chinese) stays readable."""
    return json.dumps(data, indent=indent, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, data, indent: int = 2) -> None:
    atomic_write_text(path, json_text(data, indent))


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a scratch directory that replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp makes it private; others may need to read the model
    try:
        yield scratch
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(scratch, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


# -- the manifest -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record the SHA-256 of every file in the directory (recursively, sorted) in SHA256SUMS, in the
    format ``sha256sum -c`` checks."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    atomic_write_text(directory / MANIFEST, "".join(lines))


def verify_manifest(directory: str | Path) -> bool:
    """Check every file listed in SHA256SUMS; return False when there is no manifest. A missing or
    changed file is a ``DataError`` (reason "checksum") that names it."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.exists():
        return False
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        expected, _, name = line.partition("  ")
        if len(expected) != 64 or not name:
            raise DataError(f"{manifest}:{number}: expected '<sha256>  <file>', got {line!r}", "checksum")
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path}: listed in {MANIFEST} but missing", "checksum")
        if sha256_file(path) != expected:
            raise DataError(
                f"{path}: failed its SHA-256 check (the file is corrupted or was changed after saving)", "checksum"
            )
    return True


# -- JSON ---------------------------------------------------------------------------------------

_REQUIRED = object()


def read_json(path: str | Path, default=_REQUIRED) -> dict:
    """The JSON object in ``path``; ``default`` when the file does not exist (if given), else an error.
    Errors name the file and the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if default is not _REQUIRED:
            return default
        raise DataError(f"{path}: missing", "missing_file") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: byte {raw[e.start]:#04x} is not valid UTF-8", "invalid_json") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})", "invalid_json") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}", "wrong_type")
    return data
