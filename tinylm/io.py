"""Files, the bottom layer: atomic writes, the SHA256SUMS manifest, reading JSON and data records.

Everything tinylm writes that a user would hate to lose half-written (model directories, checkpoints,
token shards' metadata, configs, reports) goes through ``atomic_write_text`` or ``atomic_directory``:
a reader sees the old content or the new, never a mix, and a crash leaves the last good state.

Every data file (pretraining text, conversations, preference pairs, image conversations) is read by
``iter_records``: .txt, .jsonl, .json and .parquet, the first three also gzip-compressed, with errors
that name the file and the line, item or row; ``read_records`` adds the per-file report of what was
read and what was skipped, and why. A dataset of the Hugging Face Hub, ``hf:NAME[:CONFIG][@SPLIT]``
(``tinylm.hub.data``), is read wherever a .parquet file is, row by row, so the same normalisers,
reports and errors apply to it; ``source_key``, ``source_name`` and ``source_size`` say what a cache,
a model card and a size estimate need to know of a file or of such a dataset.

This module imports nothing from tinylm but ``tinylm.hub``, the layer below it, so every other module
can use it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.hub import HubError
from tinylm.hub import data as hub_data
from tinylm.hub.data import is_hub_source

MANIFEST = "SHA256SUMS"
# A model directory's model card: documentation that people edit and tinylm updates after saving (an
# evaluation added), so the manifest, which guards what loading reads, leaves it out.
MODEL_CARD = "README.md"


class DataError(ValueError):
    """A file is missing, unreadable or not what was expected.

    The message names the file (and the line, item, row or field) and what was expected; ``reason`` is a
    short name for the kind of problem, the key under which readers with ``skip_bad`` count it."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


# -- atomic writes ------------------------------------------------------------------------------


Paths = str | Path | Iterable[str | Path]  # one data file, or several


def check_choice(what: str, value, choices) -> None:
    """A ValueError naming ``what`` and the choices when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{what} {value!r}: expected one of {', '.join(map(str, choices))}")


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


class DirectoryInUse(OSError):
    """Another process holds a directory's lock."""


LOCK_FILE = ".lock"


@contextmanager
def directory_lock(directory: str | Path):
    """Hold ``directory``'s lock (the file .lock in it, created if need be) for the block. When another
    process holds it, a ``DirectoryInUse`` error names that process. The operating system releases the
    lock when its holder exits in any way, kill -9 included, so a lock file left by a killed run is
    simply taken over. (Where ``fcntl`` does not exist, on Windows, nothing is locked.)"""
    try:  # optional: POSIX only
        import fcntl
    except ImportError:
        yield
        return
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise DirectoryInUse(
                f"{directory}: in use by process {holder} (another run writes there); wait for it to finish, "
                "or choose another output directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def missing_directory(path: str | Path, what: str = "directory") -> str:
    """The message for a directory that does not exist. (Model directories named by a Hub id never get
    here: ``tinylm.hub.models`` resolves them first, with its own message when that fails.)"""
    return f"{path}: no such {what}"


# -- the manifest -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record the SHA-256 of every file in the directory (recursively, sorted) in SHA256SUMS, in the
    format ``sha256sum -c`` checks; the model card (README.md at the top) is left out."""
    directory = Path(directory)
    unlisted = {directory / MANIFEST, directory / MODEL_CARD}
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p not in unlisted)
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


def read_json_lines(path: str | Path) -> list[dict]:
    """The JSON objects of a log written one line at a time (metrics.jsonl), in order; [] when the file
    does not exist. A line cut short by a crash mid-write is skipped: a log is read as it stands."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# -- records: every data file, one reader ---------------------------------------------------------

TXT_SPLITS = ("blank", "line", "file")
RECORD_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def record_file_type(path: Path, types: tuple[str, ...] = RECORD_SUFFIXES) -> tuple[str, bool]:
    """(one of ``types``, gzip-compressed?) of a data file, or a DataError naming the types expected."""
    compressed = path.suffix.lower() == ".gz"
    suffix = Path(path.stem).suffix.lower() if compressed else path.suffix.lower()
    if suffix not in types or (compressed and suffix == ".parquet"):
        plain = [t for t in types if t != ".parquet"]
        expected = f"{', '.join(types[:-1])} or {types[-1]}" if len(types) > 1 else types[0]
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'}{'.gz' if compressed else ''}; expected {expected} "
            f"(or gzip-compressed: {', '.join(t + '.gz' for t in plain)})",
            "unsupported_file",
        )
    return suffix, compressed


def iter_records(
    path: str | Path,
    *,
    types: tuple[str, ...] = RECORD_SUFFIXES,
    txt_split: str = "blank",
    columns: list[str] | None = None,
    not_record_lists: tuple = (),
    stream: bool = False,
) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of one data file, in order; ``where`` names the file and the line,
    item or row ("a.jsonl:3", "a.json:item 2", "a.parquet:row 7", "hf:org/name@train:row 17").

    - ``.txt``: each document is a string: blocks separated by blank lines (``txt_split`` "blank"),
      single lines ("line") or the whole file ("file")
    - ``.jsonl``: one JSON value per line; a line that does not parse comes as the ``DataError`` it
      causes (reason "invalid_json"), so that a reader that skips bad records can count it and go on
    - ``.json``: the items of an array, or of an object's one list field (``not_record_lists`` names
      list fields that belong to a record, not a file); JSON Lines under a .json name is read as such
    - ``.parquet``: each row as a dict (only ``columns``, when given); needs pyarrow
    - ``.txt.gz``, ``.jsonl.gz``, ``.json.gz``: the same, through gzip
    - ``hf:NAME[:CONFIG][@SPLIT]``: each row of a Hub dataset's split as a dict, wherever .parquet is
      read (``tinylm.hub.data``; rows count from 0, as ``dataset[i]`` does); ``stream`` reads rows as
      they arrive instead of downloading the split first, for corpora larger than the disk

    ``types`` are the file types the caller reads (conversations are not .txt). A problem with the whole
    file (missing, of another type, not UTF-8 text, not JSON at all) raises, at once for the first two,
    as does one with a whole Hub dataset (not there, offline and not cached, no such config or split).
    """
    if is_hub_source(path):
        if ".parquet" not in types:
            raise DataError(
                f"{path}: a Hub dataset is not read here; expected {' or '.join(types)}", "unsupported_file"
            )
        with _hub_errors():
            return _hub_records(hub_data.iter_rows(str(path), streaming=stream, columns=columns))
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", "missing_file")
    suffix, compressed = record_file_type(path, types)
    if suffix == ".txt":
        if txt_split not in TXT_SPLITS:
            raise DataError(f"txt_split {txt_split!r}: expected one of {', '.join(TXT_SPLITS)}")
        return _txt_records(path, compressed, txt_split)
    if suffix == ".parquet":
        return _parquet_records(path, columns)
    if suffix == ".jsonl":
        return _jsonl_records(path, compressed)
    return _json_records(path, compressed, not_record_lists)


def _open(path: Path, compressed: bool):
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_bytes(path: Path, compressed: bool) -> bytes:
    try:
        with _open(path, compressed) as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})", "unsupported_file") from None


def _binary_lines(path: Path, compressed: bool) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of a file, read line by line (a big file is never read whole)."""
    try:
        with _open(path, compressed) as f:
            yield from enumerate(f, 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})", "unsupported_file") from None


def _text_lines(path: Path, compressed: bool) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of a UTF-8 text file; bytes that are not UTF-8 are an error."""
    for number, raw in _binary_lines(path, compressed):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{number}: byte {raw[e.start]:#04x} at column {e.start + 1} is not valid UTF-8; "
                "expected UTF-8 text",
                "invalid_text",
            ) from None
        yield number, line.removeprefix("\ufeff") if number == 1 else line


def _chomp(line: str) -> str:
    return line.removesuffix("\n").removesuffix("\r")


def _txt_records(path: Path, compressed: bool, split: str) -> Iterator[tuple[str, str]]:
    lines = _text_lines(path, compressed)
    if split == "file":
        yield str(path), "".join(line for _, line in lines)
    elif split == "line":
        yield from ((f"{path}:{number}", _chomp(line)) for number, line in lines)
    else:
        block, first = [], 0
        for number, line in lines:
            if line.strip():
                first = first or number
                block.append(line)
            elif block:
                yield f"{path}:{first}", _chomp("".join(block))
                block, first = [], 0
        if block:
            yield f"{path}:{first}", _chomp("".join(block))


def _jsonl_records(path: Path, compressed: bool) -> Iterator[tuple[str, object]]:
    for number, line in _binary_lines(path, compressed):
        if line.strip():
            yield f"{path}:{number}", _parse_line(number, line)


def _parse_line(number: int, line: bytes):
    """The JSON value of one line, or the DataError (without the location) that says why not."""
    try:
        return json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        return DataError(
            f"byte {line[e.start]:#04x} at column {e.start + 1} is not valid UTF-8; expected UTF-8 text",
            "invalid_json",
        )
    except json.JSONDecodeError as e:
        return DataError(f"invalid JSON ({e.msg}, column {e.colno}); expected one JSON value per line", "invalid_json")


def _json_records(path: Path, compressed: bool, not_record_lists: tuple) -> Iterator[tuple[str, object]]:
    raw = _read_bytes(path, compressed)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: byte {raw[e.start]:#04x} is not valid UTF-8; expected UTF-8 text", "invalid_json"
        ) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a value followed by more values: JSON Lines under a .json name
            return _jsonl_records(path, compressed)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})", "invalid_json") from None
    items = _record_list(data, path, not_record_lists)
    return ((f"{path}:item {index}", record) for index, record in enumerate(items))


def _record_list(data, path: Path, not_record_lists: tuple) -> list:
    """The records of a parsed .json file: the array itself, or the one list field of an object
    (e.g. ``{"data": [...]}``) other than ``not_record_lists``."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list) and key not in not_record_lists]
        if len(lists) == 1:
            return data[lists[0]]
        found = f"several lists ({', '.join(map(repr, lists))})" if lists else "no list of records"
        raise DataError(
            f"{path}: a JSON object with {found}; expected an array of records or an object "
            "with one list field holding them",
            "wrong_type",
        )
    raise DataError(f"{path}: {type(data).__name__}; expected an array of records", "wrong_type")


def _parquet_records(path: Path, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    try:  # optional: only parquet files need pyarrow
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)", "missing_pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})", "unsupported_file") from None
    names = table.schema_arrow.names
    if missing := [column for column in columns or [] if column not in names]:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)})", "missing_field")
    return _parquet_rows(path, table, columns)


def _parquet_rows(path: Path, table, columns) -> Iterator[tuple[str, dict]]:
    row = 0
    for batch in table.iter_batches(columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


@contextmanager
def _hub_errors():
    """A Hub dataset's problems as this module's DataError, so that callers catch one kind of error."""
    try:
        yield
    except HubError as e:
        raise DataError(str(e), e.reason) from None


def _hub_records(rows: Iterator[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
    with _hub_errors():
        yield from rows


def source_key(path: str | Path) -> list:
    """What a data source's content is known by, for the key of anything built from it: a file's
    resolved path, size and modification time; a Hub dataset's name, config, split and revision (a
    saved one's fingerprint). A missing source is a DataError."""
    if is_hub_source(path):
        with _hub_errors():
            return ["hf", hub_data.revision(str(path))]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", "missing_file")
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def source_name(path: str | Path) -> str:
    """How a model card names a data source: a file's name, a Hub dataset's id (a local dataset folder's name)."""
    with _hub_errors():
        return hub_data.parse(str(path)).dataset_name if is_hub_source(path) else Path(path).name


def source_size(path: str | Path) -> int:
    """A data source's size in bytes: a file's, or a Hub dataset split's as datasets records it."""
    if not is_hub_source(path):
        return Path(path).stat().st_size
    with _hub_errors():
        size = hub_data.split_bytes(str(path))
    if size is None:
        raise DataError(
            f"{path}: the split's size is not recorded (the dataset's card has no dataset_info)", "unknown_size"
        )
    return size


@dataclass
class FileReport:
    """What one file gave: records read per format, records skipped per reason, and the first error
    message of each reason (so a skip can be looked up)."""

    read: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        self.first_error.setdefault(error.reason, str(error))


@dataclass
class ReadReport:
    """Per file (keyed by path as given): records read by format and records skipped by reason. A
    problem with a whole file (missing_file, unsupported_file, missing_pyarrow, a .json file that does
    not parse) is never skipped: it always raises."""

    files: dict[str, FileReport] = field(default_factory=dict)

    @property
    def read(self) -> int:
        return sum(sum(f.read.values()) for f in self.files.values())

    @property
    def skipped(self) -> Counter:
        """Skipped records of all files, by reason."""
        return sum((f.skipped for f in self.files.values()), Counter())

    def add(self, other: ReadReport) -> None:
        """Count ``other``'s files into this report (the same file twice adds up)."""
        for name, part in other.files.items():
            total = self.files.setdefault(name, FileReport())
            total.read.update(part.read)
            total.skipped.update(part.skipped)
            for reason, message in part.first_error.items():
                total.first_error.setdefault(reason, message)

    def summary(self) -> str:
        """One line per file, and the first error of each skip reason."""
        lines = []
        for path, report in self.files.items():
            read = ", ".join(f"{fmt} {n}" for fmt, n in report.read.items()) or "none"
            skipped = ", ".join(f"{reason} {n}" for reason, n in report.skipped.items()) or "none"
            lines.append(f"{path}: read {read}; skipped {skipped}")
            lines += [f"  first {reason}: {message}" for reason, message in report.first_error.items()]
        return "\n".join(lines)


def read_records(
    paths: Paths, normalize: Callable, skip_bad: bool, **options
) -> tuple[list[tuple[str, object]], ReadReport]:
    """(where, what ``normalize`` made of the record) for every record of ``paths`` that it accepts, and
    the report. ``normalize(record)`` returns (format name, result) or raises DataError, which stops the
    reading or, with ``skip_bad``, is counted by its reason. ``options`` go to ``iter_records``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found, report = [], ReadReport()
    for path in map(Path, paths):
        file_report = report.files.setdefault(str(path), FileReport())
        for where, record in iter_records(path, **options):
            try:
                if isinstance(record, DataError):
                    raise record
                record_format, result = normalize(record)
            except DataError as e:
                error = DataError(f"{where}: {e}", e.reason)
                if not skip_bad:
                    raise error from None
                file_report.skip(error)
                continue
            file_report.read[record_format] += 1
            found.append((where, result))
    return found, report
