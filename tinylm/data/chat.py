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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from tinylm.io import DataError, Paths, ReadReport, check_choice, read_records

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
NOT_RECORD_LISTS = (*MESSAGE_LISTS, "history", "instances")  # list fields of one record, not lists of records
RECORD_FILES = {"types": (".jsonl", ".json", ".parquet"), "not_record_lists": NOT_RECORD_LISTS}  # iter_records'
UNSUPPORTED_FIELDS = {"tools": "tool descriptions", "images": "images", "videos": "videos", "audios": "audio"}
JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
WEIGHT_KEYS = ("loss_weight", "weight")


@dataclass
class Conversation:
    """Validated messages and where they came from ("path:line", "path:item N" or "path:row N")."""

    messages: list[dict]
    source: str


# -- reading files ------------------------------------------------------------------------------


def read_conversations(
    paths: Paths, format: str = "auto", skip_bad: bool = False
) -> tuple[list[Conversation], ReadReport]:
    """Every valid conversation of ``paths``, in order, and a report of what was read and skipped.

    ``format`` is "auto" (detect each record) or forces one of "openai", "sharegpt", "alpaca".
    A bad record raises ``DataError``; with ``skip_bad`` it is skipped and counted by reason.
    Problems with a whole file (missing, unsupported type, not JSON at all) always raise.
    """
    check_choice("format", format, FORMATS)
    found, report = read_records(paths, lambda record: _normalize(record, format), skip_bad, **RECORD_FILES)
    return [Conversation(messages, where) for where, messages in found], report


# -- one record → validated messages ------------------------------------------------------------


def detect_format(record) -> str:
    """The format of one record: "openai", "sharegpt" or "alpaca".

    A message list (under "messages" or "conversations", or the record itself being a list) is
    ShareGPT when its messages say ``from``/``value`` and OpenAI otherwise; a record with an
    "instruction", "output" or "instances" field is Alpaca.
    """
    if isinstance(record, list):
        return message_list_format(record)
    if not isinstance(record, dict):
        raise DataError(f"{kind_of(record)}; expected an object (a conversation record)", "wrong_type")
    for key in MESSAGE_LISTS:
        if key in record:
            return message_list_format(record[key])
    if any(key in record for key in ("instruction", "output", "instances")):
        return "alpaca"
    raise DataError(
        f"cannot tell the format from the fields {', '.join(map(repr, record)) or '(none)'}; expected "
        "'messages' or 'conversations' (openai, sharegpt) or 'instruction' and 'output' (alpaca)",
        "unknown_format",
    )


def message_list_format(messages) -> str:
    first = next((m for m in messages if isinstance(m, dict)), {}) if isinstance(messages, list) else {}
    return "sharegpt" if "from" in first or "value" in first else "openai"


def _normalize(record, format: str) -> tuple[str, list[dict]]:
    """(the record's format, its validated messages)."""
    record_format = detect_format(record) if format == "auto" else format
    if isinstance(record, dict):
        check_text_only(record)
    elif not isinstance(record, list) or record_format == "alpaca":
        raise DataError(
            f"{kind_of(record)}; expected an object with the fields of the {record_format} format", "wrong_type"
        )
    turns = READERS[record_format](record)
    return record_format, validate_turns(turns)


def check_text_only(record: dict) -> None:
    for key, what in UNSUPPORTED_FIELDS.items():
        if record.get(key):
            raise DataError(
                f"{key}: {what} are not supported; expected a text-only conversation (no "
                f"{key!r} field, or an empty one)",
                "unsupported",
            )


class Turn(NamedTuple):
    """A message before validation, with the names of the fields it came from (for errors)."""

    role: str
    content: object
    role_field: str
    content_field: str


def openai_turns(record) -> list[Turn]:
    """Messages with ``role`` and ``content`` (a string or a list of text parts)."""
    return with_system_field(record, [_openai_turn(message, label) for label, message in labelled_messages(record)])


def _openai_turn(message: dict, label: str) -> Turn:
    role = get_field(message, "role", label)
    if role not in ROLES:
        raise role_error(f"{label}.role", role, ROLES)
    _check_default_weight(message, role, label)
    content = text_of_parts(get_field(message, "content", label), f"{label}.content")
    return Turn(role, content, f"{label}.role", f"{label}.content")


def sharegpt_turns(record) -> list[Turn]:
    """Messages with ``from`` (human, gpt, system, ...) and ``value``."""
    return with_system_field(record, [_sharegpt_turn(message, label) for label, message in labelled_messages(record)])


def _sharegpt_turn(message: dict, label: str) -> Turn:
    speaker = get_field(message, "from", label)
    role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise role_error(f"{label}.from", speaker, SHAREGPT_ROLES)
    return Turn(role, get_field(message, "value", label), f"{label}.from", f"{label}.value")


def _alpaca_turns(record: dict) -> list[Turn]:
    """History pairs, then ``instruction`` (+ newline + ``input``) answered by ``output``."""
    record = _single_instance(record)
    turns = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"history: {kind_of(history)}; expected a list of [user, assistant] pairs", "wrong_type")
    for index, pair in enumerate(history):
        label = f"history[{index}]"
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{label}: {pair!r:.60}; expected a [user, assistant] pair", "wrong_type")
        turns += [
            Turn("user", pair[0], f"{label}[0]", f"{label}[0]"),
            Turn("assistant", pair[1], f"{label}[1]", f"{label}[1]"),
        ]
    instruction, query = _string_field(record, "instruction"), record.get("input")
    if query is not None and not isinstance(query, str):
        raise DataError(f"input: {kind_of(query)}; expected a string", "wrong_type")
    prompt = instruction + "\n" + query if query else instruction
    turns += [
        Turn("user", prompt, "instruction", "instruction"),
        Turn("assistant", get_field(record, "output"), "output", "output"),
    ]
    return with_system_field(record, turns)


READERS = {"openai": openai_turns, "sharegpt": sharegpt_turns, "alpaca": _alpaca_turns}


def validate_turns(turns: list[Turn]) -> list[dict]:
    """The messages of ``turns`` if they make a valid conversation, else a ``DataError``."""
    for turn in turns:
        if not isinstance(turn.content, str):
            raise DataError(f"{turn.content_field}: {kind_of(turn.content)}; expected a string", "wrong_type")
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


def kind_of(value) -> str:
    """What a JSON value is, in words: "null", "a number", "a list", ..."""
    return "null" if value is None else JSON_KINDS.get(type(value), f"a {type(value).__name__}")


def as_object(value, label: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{label}: {kind_of(value)}; expected an object", "wrong_type")
    return value


def get_field(obj: dict, key: str, label: str = ""):
    """``obj[key]``, or a missing-field error naming the fields there are."""
    if key not in obj:
        found = ", ".join(map(repr, obj)) or "none"
        raise DataError(f"{label + '.' if label else ''}{key}: missing field (found: {found})", "missing_field")
    return obj[key]


def _string_field(obj: dict, key: str) -> str:
    value = get_field(obj, key)
    if not isinstance(value, str):
        raise DataError(f"{key}: {kind_of(value)}; expected a string", "wrong_type")
    return value


def message_list(record) -> tuple[str, list]:
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
        raise DataError(f"{keys[0]}: {kind_of(messages)}; expected a list of messages", "wrong_type")
    if not messages:
        raise DataError(
            f"{keys[0]}: empty conversation; expected at least a user and an assistant message", "empty_conversation"
        )
    return keys[0], messages


def labelled_messages(record) -> list[tuple[str, dict]]:
    """(label, message) for each message of a record, the label naming it in errors ("messages[2]"),
    each checked to be an object."""
    key, messages = message_list(record)
    return [(f"{key}[{i}]", as_object(message, f"{key}[{i}]")) for i, message in enumerate(messages)]


def with_system_field(record, turns: list[Turn]) -> list[Turn]:
    """``turns`` preceded by the record's top-level "system" prompt, unless blank or already there."""
    system = record.get("system") if isinstance(record, dict) else None
    blank = system is None or (isinstance(system, str) and not system.strip())
    if blank or (turns and turns[0].role == "system"):
        return turns
    return [Turn("system", system, "system", "system"), *turns]


def role_error(label: str, role, expected: Iterable[str]) -> DataError:
    """The error for a role outside ``expected``: a tool-calling turn is "unsupported", else "unknown_role"."""
    known = f"expected one of {', '.join(expected)}"
    if isinstance(role, str) and role.lower() in TOOL_ROLES:
        return DataError(
            f"{label}: {role!r} is a tool-calling turn, which tinylm does not train; {known}", "unsupported"
        )
    return DataError(f"{label}: unknown role {role!r}; {known}", "unknown_role")


def text_of_parts(content, label: str):
    """Content as a string: itself, or its text parts joined (OpenAI / LLaMA-Factory v1 style)."""
    if not isinstance(content, list):
        return content
    texts = []
    for index, part in enumerate(content):
        part = as_object(part, f"{label}[{index}]")
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
            f"instances: {kind_of(instances)}; expected a list of {{'input', 'output'}} objects", "wrong_type"
        )
    if len(instances) != 1:
        raise DataError(
            f"instances: {len(instances)} instances; expected exactly one (write one record per example)", "unsupported"
        )
    return {**record, **as_object(instances[0], "instances[0]")}
