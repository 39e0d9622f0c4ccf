"""Conversation files in the common SFT formats → one normalized, validated form.

    read_conversations(paths, format="auto", skip_bad=False) → (conversations, report)
    detect_format(record)                                      → "openai" | "sharegpt" | "alpaca"

Every reader produces the same thing: a list of messages ``{"role": ..., "content": str}`` that is
*valid* — an optional system message first, then user and assistant turns strictly alternating,
starting with the user and ending with the assistant, every content non-empty text. Anything else is
a ``DataError`` naming the file, the line (or item, or row) and the field, or, with
``skip_bad=True``, a skipped record counted by reason in the ``ReadReport``. Nothing is dropped silently.

The formats, one record each (detected per record, or forced with ``format=``):

    openai    {"messages": [{"role": "user", "content": "..."}, ...]}
              also "conversations" instead of "messages" (MiniMind), a bare list of messages (XTuner),
              and content as a list of text parts [{"type": "text", "text"|"value": ...}] (OpenAI,
              LLaMA-Factory v1)
    sharegpt  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}, ...]}
              also "messages" instead of "conversations"; roles human/user, gpt/assistant/bot/chatgpt,
              system (case-insensitive)
    alpaca    {"instruction": ..., "input": ..., "output": ..., "history": [[user, assistant], ...]}
              the user turn is ``instruction + "\\n" + input`` (just the instruction when input is
              empty); history turns come first. Self-instruct seed tasks, which keep input and output
              in ``"instances": [{"input", "output"}]``, are read when they hold one instance.

All three take an optional top-level ``"system"`` field. As in LLaMA-Factory, a system message at the
start of the message list takes precedence over it.

Refused, with a clear error, because tinylm trains text-only chat without tool turns and learns every
assistant turn and nothing else: tool calling (ShareGPT roles function_call/observation, a "tools"
field), images/videos/audios, non-text content parts, and per-message loss weights other than the
default (1 on assistant turns, 0 elsewhere).

File types: ``.jsonl`` (one record per line), ``.json`` (an array of records, or an object whose one
list field holds them; a ``.json`` file that is really JSON Lines is read as such), both also
gzip-compressed (``.jsonl.gz``, ``.json.gz``), and ``.parquet`` (one record per row; needs pyarrow).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tinylm.io import DataError

FORMATS = ("auto", "openai", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
TOOL_ROLES = ("function_call", "observation", "function", "tool")
MESSAGE_LISTS = ("messages", "conversations")
UNSUPPORTED_FIELDS = {"tools": "tool descriptions", "images": "images", "videos": "videos", "audios": "audio"}
JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
WEIGHT_KEYS = ("loss_weight", "weight")


@dataclass
class Conversation:
    """Validated messages and where they came from ("path:line", "path:item N" or "path:row N")."""

    messages: list[dict]
    source: str


@dataclass
class FileReport:
    """What one file gave: conversations read per format, records skipped per reason, and the first
    error message of each reason (so a skip can be looked up)."""

    read: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        self.first_error.setdefault(error.reason, str(error))


@dataclass
class ReadReport:
    """Per file (keyed by path as given): conversations read by format and records skipped by reason.

    Reasons a record is skipped for: invalid_json, unknown_format, wrong_type, missing_field,
    unknown_role, unsupported, empty_conversation, empty_content, system_not_first, alternation,
    last_not_assistant. A problem with a whole file (missing_file, unsupported_file, missing_pyarrow,
    a .json file that does not parse) is never skipped: it always raises.
    """

    files: dict[str, FileReport] = field(default_factory=dict)

    @property
    def read(self) -> int:
        return sum(sum(f.read.values()) for f in self.files.values())

    @property
    def skipped(self) -> Counter:
        """Skipped records of all files, by reason."""
        return sum((f.skipped for f in self.files.values()), Counter())

    def summary(self) -> str:
        """One line per file, and the first error of each skip reason."""
        lines = []
        for path, report in self.files.items():
            read = ", ".join(f"{fmt} {n}" for fmt, n in report.read.items()) or "none"
            skipped = ", ".join(f"{reason} {n}" for reason, n in report.skipped.items()) or "none"
            lines.append(f"{path}: read {read}; skipped {skipped}")
            lines += [f"  first {reason}: {message}" for reason, message in report.first_error.items()]
        return "\n".join(lines)


class _Turn(NamedTuple):
    """A message before validation, with the names of the fields it came from (for errors)."""

    role: str
    content: object
    role_field: str
    content_field: str


# -- reading files ------------------------------------------------------------------------------


def read_conversations(
    paths: str | Path | Iterable[str | Path], format: str = "auto", skip_bad: bool = False
) -> tuple[list[Conversation], ReadReport]:
    """Every valid conversation of ``paths``, in order, and a report of what was read and skipped.

    ``format`` is "auto" (detect each record) or forces one of "openai", "sharegpt", "alpaca".
    A bad record raises ``DataError``; with ``skip_bad`` it is skipped and counted by reason.
    Problems with a whole file (missing, unsupported type, not JSON at all) always raise.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    found, report = read_records(paths, lambda record: _normalize(record, format), skip_bad)
    return [Conversation(messages, where) for where, messages in found], report


def read_records(paths, normalize, skip_bad: bool) -> tuple[list[tuple[str, object]], ReadReport]:
    """(location, what ``normalize`` made of the record) for every record of ``paths`` that it accepts,
    and the report. ``normalize(record)`` returns (format name, result) or raises DataError, which
    stops the reading, or with ``skip_bad`` is counted by its reason."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    found, report = [], ReadReport()
    for path in map(Path, paths):
        file_report = report.files.setdefault(str(path), FileReport())
        for where, record in _records(path):
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


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(location, record) for each record of a file (.jsonl, .json, .parquet; .jsonl.gz and .json.gz
    are read through gzip). A JSON Lines line that does not parse comes as the ``DataError`` it
    causes, so that ``skip_bad`` can count it and go on."""
    if not path.is_file():
        raise DataError(f"{path}: no such file", "missing_file")
    compressed = path.suffix.lower() == ".gz"
    suffix = Path(path.stem).suffix.lower() if compressed else path.suffix.lower()
    if suffix == ".parquet" and not compressed:
        return _parquet_records(path)
    if suffix not in (".jsonl", ".json"):
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'}{'.gz' if compressed else ''}; expected "
            ".jsonl, .json or .parquet (or .jsonl.gz, .json.gz)",
            "unsupported_file",
        )
    return _jsonl_records(path, compressed) if suffix == ".jsonl" else _json_records(path, compressed)


def _read(path: Path, compressed: bool, read):
    """``read(binary file)``, through gzip for a .gz file; a broken gzip stream names the file."""
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            yield from read(f)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})", "unsupported_file") from None


def _jsonl_records(path: Path, compressed: bool) -> Iterator[tuple[str, object]]:
    """Line by line (a big file is never read whole)."""
    return _read(
        path,
        compressed,
        lambda f: (_line_record(f"{path}:{number}", number, line) for number, line in enumerate(f, 1) if line.strip()),
    )


def _line_record(where: str, number: int, line: bytes) -> tuple[str, object]:
    try:
        return where, json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        return where, DataError(
            f"byte {line[e.start]:#04x} at column {e.start + 1} is not valid UTF-8; expected UTF-8 text", "invalid_json"
        )
    except json.JSONDecodeError as e:
        return where, DataError(
            f"invalid JSON ({e.msg}, column {e.colno}); expected one JSON value per line", "invalid_json"
        )


def _json_records(path: Path, compressed: bool) -> Iterator[tuple[str, object]]:
    (raw,) = _read(path, compressed, lambda f: [f.read()])
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
    items = _record_list(data, path)
    return ((f"{path}:item {index}", record) for index, record in enumerate(items))


def _record_list(data, path: Path) -> list:
    """The records of a parsed .json file: the array itself, or the one list field of an object
    (e.g. ``{"data": [...]}``) other than a record's own message lists."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [
            key
            for key, value in data.items()
            if isinstance(value, list) and key not in (*MESSAGE_LISTS, "history", "instances")
        ]
        if len(lists) == 1:
            return data[lists[0]]
        found = f"several lists ({', '.join(map(repr, lists))})" if lists else "no list of records"
        raise DataError(
            f"{path}: a JSON object with {found}; expected an array of records or an object "
            "with one list field holding them",
            "wrong_type",
        )
    raise DataError(f"{path}: {_kind(data)}; expected an array of records", "wrong_type")


def _parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)", "missing_pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})", "unsupported_file") from None
    row = 0
    for batch in table.iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


# -- one record → validated messages ------------------------------------------------------------


def detect_format(record) -> str:
    """The format of one record: "openai", "sharegpt" or "alpaca".

    A message list (under "messages" or "conversations", or the record itself being a list) is
    ShareGPT when its messages say ``from``/``value`` and OpenAI otherwise; a record with an
    "instruction", "output" or "instances" field is Alpaca.
    """
    if isinstance(record, list):
        return _message_list_format(record)
    if not isinstance(record, dict):
        raise DataError(f"{_kind(record)}; expected an object (a conversation record)", "wrong_type")
    for key in MESSAGE_LISTS:
        if key in record:
            return _message_list_format(record[key])
    if any(key in record for key in ("instruction", "output", "instances")):
        return "alpaca"
    raise DataError(
        f"cannot tell the format from the fields {', '.join(map(repr, record)) or '(none)'}; expected "
        "'messages' or 'conversations' (openai, sharegpt) or 'instruction' and 'output' (alpaca)",
        "unknown_format",
    )


def _message_list_format(messages) -> str:
    first = next((m for m in messages if isinstance(m, dict)), {}) if isinstance(messages, list) else {}
    return "sharegpt" if "from" in first or "value" in first else "openai"


def _normalize(record, format: str) -> tuple[str, list[dict]]:
    """(the record's format, its validated messages)."""
    record_format = detect_format(record) if format == "auto" else format
    if isinstance(record, dict):
        _check_text_only(record)
    elif not isinstance(record, list) or record_format == "alpaca":
        raise DataError(
            f"{_kind(record)}; expected an object with the fields of the {record_format} format", "wrong_type"
        )
    turns = READERS[record_format](record)
    return record_format, _validated(turns)


def _check_text_only(record: dict) -> None:
    for key, what in UNSUPPORTED_FIELDS.items():
        if record.get(key):
            raise DataError(
                f"{key}: {what} are not supported; expected a text-only conversation (no "
                f"{key!r} field, or an empty one)",
                "unsupported",
            )


def _openai_turns(record) -> list[_Turn]:
    """Messages with ``role`` and ``content`` (a string or a list of text parts)."""
    key, messages = _message_list(record)
    turns = []
    for index, message in enumerate(messages):
        label = f"{key}[{index}]"
        message = _as_object(message, label)
        role = _field(message, "role", label)
        if role not in ROLES:
            raise _role_error(f"{label}.role", role, ROLES)
        _check_default_weight(message, role, label)
        content = _text_of_parts(_field(message, "content", label), f"{label}.content")
        turns.append(_Turn(role, content, f"{label}.role", f"{label}.content"))
    return _with_system_field(record, turns)


def _sharegpt_turns(record) -> list[_Turn]:
    """Messages with ``from`` (human, gpt, system, ...) and ``value``."""
    key, messages = _message_list(record)
    turns = []
    for index, message in enumerate(messages):
        label = f"{key}[{index}]"
        message = _as_object(message, label)
        speaker = _field(message, "from", label)
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise _role_error(f"{label}.from", speaker, SHAREGPT_ROLES)
        turns.append(_Turn(role, _field(message, "value", label), f"{label}.from", f"{label}.value"))
    return _with_system_field(record, turns)


def _alpaca_turns(record: dict) -> list[_Turn]:
    """History pairs, then ``instruction`` (+ newline + ``input``) answered by ``output``."""
    record = _single_instance(record)
    turns = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"history: {_kind(history)}; expected a list of [user, assistant] pairs", "wrong_type")
    for index, pair in enumerate(history):
        label = f"history[{index}]"
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{label}: {pair!r:.60}; expected a [user, assistant] pair", "wrong_type")
        turns += [
            _Turn("user", pair[0], f"{label}[0]", f"{label}[0]"),
            _Turn("assistant", pair[1], f"{label}[1]", f"{label}[1]"),
        ]
    instruction, query = _string_field(record, "instruction"), record.get("input")
    if query is not None and not isinstance(query, str):
        raise DataError(f"input: {_kind(query)}; expected a string", "wrong_type")
    prompt = instruction + "\n" + query if query else instruction
    turns += [
        _Turn("user", prompt, "instruction", "instruction"),
        _Turn("assistant", _field(record, "output"), "output", "output"),
    ]
    return _with_system_field(record, turns)


READERS = {"openai": _openai_turns, "sharegpt": _sharegpt_turns, "alpaca": _alpaca_turns}


def _validated(turns: list[_Turn]) -> list[dict]:
    """The messages of ``turns`` if they make a valid conversation, else a ``DataError``."""
    for turn in turns:
        if not isinstance(turn.content, str):
            raise DataError(f"{turn.content_field}: {_kind(turn.content)}; expected a string", "wrong_type")
        if not turn.content.strip():
            raise DataError(f"{turn.content_field}: empty content; expected non-empty text", "empty_content")
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        where = f"{turns[0].role_field}: " if turns else ""
        raise DataError(
            f"{where}empty conversation; expected at least a user and an assistant message", "empty_conversation"
        )
    for index, turn in enumerate(body):
        if turn.role == "system":
            raise DataError(
                f"{turn.role_field}: a system message after other messages; expected a system "
                "message only as the first message",
                "system_not_first",
            )
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            problem = f"starts with an {turn.role} turn" if index == 0 else f"two {turn.role} turns in a row"
            raise DataError(
                f"{turn.role_field}: {problem}; expected user and assistant turns to alternate, starting with the user",
                "alternation",
            )
    if body[-1].role != "assistant":
        raise DataError(
            f"{body[-1].role_field}: the conversation ends with a user turn; expected it to end "
            "with the assistant's answer",
            "last_not_assistant",
        )
    return [{"role": turn.role, "content": turn.content} for turn in turns]


# -- small helpers for the readers --------------------------------------------------------------


def _kind(value) -> str:
    """What a JSON value is, in words: "null", "a number", "a list", ..."""
    return "null" if value is None else JSON_KINDS.get(type(value), f"a {type(value).__name__}")


def _as_object(value, label: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{label}: {_kind(value)}; expected an object", "wrong_type")
    return value


def _field(obj: dict, key: str, label: str = ""):
    """``obj[key]``, or a missing-field error naming the fields there are."""
    if key not in obj:
        found = ", ".join(map(repr, obj)) or "none"
        raise DataError(f"{label + '.' if label else ''}{key}: missing field (found: {found})", "missing_field")
    return obj[key]


def _string_field(obj: dict, key: str) -> str:
    value = _field(obj, key)
    if not isinstance(value, str):
        raise DataError(f"{key}: {_kind(value)}; expected a string", "wrong_type")
    return value


def _message_list(record) -> tuple[str, list]:
    """(field name, messages) of a record: its "messages" or "conversations", or the record itself."""
    if isinstance(record, list):
        return "", record
    keys = [key for key in MESSAGE_LISTS if key in record]
    if len(keys) != 1:
        found = "found: " + (", ".join(map(repr, record)) or "none")
        problem = "both 'messages' and 'conversations'" if keys else f"no 'messages' or 'conversations' ({found})"
        raise DataError(f"{problem}; expected one list of messages", "wrong_type" if keys else "missing_field")
    messages = record[keys[0]]
    if not isinstance(messages, list):
        raise DataError(f"{keys[0]}: {_kind(messages)}; expected a list of messages", "wrong_type")
    if not messages:
        raise DataError(
            f"{keys[0]}: empty conversation; expected at least a user and an assistant message", "empty_conversation"
        )
    return keys[0], messages


def _with_system_field(record, turns: list[_Turn]) -> list[_Turn]:
    """``turns`` preceded by the record's top-level "system" prompt, unless blank or already there."""
    system = record.get("system") if isinstance(record, dict) else None
    blank = system is None or (isinstance(system, str) and not system.strip())
    if blank or (turns and turns[0].role == "system"):
        return turns
    return [_Turn("system", system, "system", "system"), *turns]


def _role_error(label: str, role, expected: Iterable[str]) -> DataError:
    """The error for a role outside ``expected``: a tool-calling turn is "unsupported", else "unknown_role"."""
    known = f"expected one of {', '.join(expected)}"
    if isinstance(role, str) and role.lower() in TOOL_ROLES:
        return DataError(
            f"{label}: {role!r} is a tool-calling turn, which tinylm does not train; {known}", "unsupported"
        )
    return DataError(f"{label}: unknown role {role!r}; {known}", "unknown_role")


def _text_of_parts(content, label: str):
    """Content as a string: itself, or its text parts joined (OpenAI / LLaMA-Factory v1 style)."""
    if not isinstance(content, list):
        return content
    texts = []
    for index, part in enumerate(content):
        part = _as_object(part, f"{label}[{index}]")
        if part.get("type") != "text":
            raise DataError(
                f"{label}[{index}].type: {part.get('type')!r} content is not supported; expected 'text' parts",
                "unsupported",
            )
        text = next((part[key] for key in ("text", "value") if part.get(key) is not None), None)
        if not isinstance(text, str):
            raise DataError(f"{label}[{index}]: no 'text' or 'value' string; expected a text part", "missing_field")
        texts.append(text)
    return "".join(texts)


def _check_default_weight(message: dict, role: str, label: str) -> None:
    """Refuse loss weights other than tinylm's rule: learn assistant turns (1), nothing else (0)."""
    default = 1.0 if role == "assistant" else 0.0
    for key in WEIGHT_KEYS:
        weight = message.get(key)
        if weight is not None and weight != default:
            raise DataError(
                f"{label}.{key}: {weight!r} is not supported for {role} messages; expected "
                f"{default:g} (tinylm learns every assistant turn and no other)",
                "unsupported",
            )


def _single_instance(record: dict) -> dict:
    """A self-instruct seed task ``{"instruction", "instances": [{"input", "output"}]}`` as a plain
    Alpaca record; any other record unchanged."""
    if "instances" not in record:
        return record
    instances = record["instances"]
    if not isinstance(instances, list):
        raise DataError(
            f"instances: {_kind(instances)}; expected a list of {{'input', 'output'}} objects", "wrong_type"
        )
    if len(instances) != 1:
        raise DataError(
            f"instances: {len(instances)} instances; expected exactly one (write one record per example)", "unsupported"
        )
    return {**record, **_as_object(instances[0], "instances[0]")}
