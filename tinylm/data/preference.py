"""Preference-pair files (for DPO and the like) in the common formats → one validated form.

    read_preferences(paths, format="auto", skip_bad=False) → (pairs, report)
    detect_preference_format(record)                        → "minimind" | "llamafactory" | "hh-rlhf"

Every reader produces ``PreferencePair(prompt, chosen, rejected, source)``: ``prompt`` is a list of
valid messages by the rules of ``tinylm.data.chat`` (an optional system message, then user and
assistant turns alternating) that ends with a user turn, and ``chosen`` and ``rejected`` are the
preferred and the dispreferred assistant replies to it, two different non-empty texts. Anything else
is a ``DataError`` naming the file, the line (or item, or row) and the field, or, with
``skip_bad=True``, a skipped record counted by reason in the ``ReadReport``.

The formats, one record each (detected per record, or forced with ``format=``):

    minimind      {"chosen": [{"role": "user", "content": ...}, {"role": "assistant", ...}],
                   "rejected": [...]}
                  two whole conversations that end with an assistant reply and agree on every message
                  before it (the prompt); ShareGPT-style from/value messages are read too
    llamafactory  {"conversations": [{"from": "human", "value": ...}, ...],
                   "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}
                  also "messages" with role/content messages, and the replies as {"role", "content"}
                  or plain strings (MedicalGPT); the conversation is the prompt and ends with the user
    hh-rlhf       {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
                  Anthropic HH transcripts, split at the "Human:" and "Assistant:" markers that start a
                  paragraph; each turn's text is stripped. A marker inside a paragraph stays text, so
                  such a record usually fails as two turns of one speaker in a row ("alternation").

All take an optional top-level ``"system"`` field, as chat.py does. Files as in chat.py: .jsonl,
.json, .parquet, and gzip-compressed .jsonl.gz and .json.gz.

Skip reasons beyond chat.py's (see ``ReadReport``): prompt_mismatch (chosen and rejected answer
different prompts), identical_pair (the two replies are the same text), last_not_user (the prompt
does not end with a user turn), bad_transcript (an hh-rlhf text that is not a Human/Assistant
transcript). A KTO record (a "kto_tag" or "label" instead of chosen and rejected) is refused as
"unsupported".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tinylm.data.chat import (
    MESSAGE_LISTS,
    RECORD_FILES,
    ROLES,
    SHAREGPT_ROLES,
    Turn,
    check_text_only,
    get_field,
    kind_of,
    message_list_format,
    openai_turns,
    role_error,
    sharegpt_turns,
    text_of_parts,
    validate_turns,
    with_system_field,
)
from tinylm.io import DataError, Paths, ReadReport, check_choice, read_records

PREFERENCE_FORMATS = ("auto", "minimind", "llamafactory", "hh-rlhf")
SIDES = ("chosen", "rejected")
KTO_TAGS = ("kto_tag", "label")
HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass
class PreferencePair:
    """A prompt (validated messages ending with a user turn), the preferred and the dispreferred
    assistant reply, and where the pair came from ("path:line", "path:item N" or "path:row N")."""

    prompt: list[dict]
    chosen: str
    rejected: str
    source: str
    kind: str = ""  # what the pair is about, for reports by kind (the built-in pairs: "refusal/zh", ...)


def read_preferences(
    paths: Paths, format: str = "auto", skip_bad: bool = False
) -> tuple[list[PreferencePair], ReadReport]:
    """Every valid preference pair of ``paths``, in order, and the read report: the files and errors
    as ``read_conversations`` has them; ``format`` "auto" or one of "minimind", "llamafactory", "hh-rlhf"."""
    check_choice("format", format, PREFERENCE_FORMATS)

    def normalize(record):
        record_format, prompt, chosen, rejected = _normalize(record, format)
        return record_format, (prompt, chosen, rejected)

    found, report = read_records(paths, normalize, skip_bad, **RECORD_FILES)
    return [PreferencePair(*pair, where) for where, pair in found], report


def detect_preference_format(record) -> str:
    """The format of one record: "llamafactory" when it has a message list ("conversations" or
    "messages"), else "minimind" when its "chosen" is a list of messages, "hh-rlhf" when a string."""
    if not isinstance(record, dict):
        raise DataError(f"{kind_of(record)}; expected an object (a preference record)", "wrong_type")
    _check_not_kto(record)
    if any(key in record for key in MESSAGE_LISTS):
        return "llamafactory"
    if isinstance(record.get("chosen"), list):
        return "minimind"
    if isinstance(record.get("chosen"), str):
        return "hh-rlhf"
    raise DataError(
        f"cannot tell the format from the fields {', '.join(map(repr, record)) or '(none)'}; expected 'chosen' and "
        "'rejected' as message lists (minimind) or transcripts (hh-rlhf), or 'conversations' or 'messages' with "
        "them as replies (llamafactory)",
        "unknown_format",
    )


def _normalize(record, format: str) -> tuple[str, list[dict], str, str]:
    """(the record's format, its prompt, the chosen reply, the rejected reply), all validated."""
    record_format = detect_preference_format(record) if format == "auto" else format
    if not isinstance(record, dict):
        raise DataError(
            f"{kind_of(record)}; expected an object with the fields of the {record_format} format", "wrong_type"
        )
    _check_not_kto(record)
    check_text_only(record)
    chosen, rejected = READERS[record_format](record)
    chosen_messages, rejected_messages = validate_turns(chosen), validate_turns(rejected)
    _check_same_prompt(chosen[:-1], rejected[:-1])
    chosen_reply, rejected_reply = chosen_messages[-1]["content"], rejected_messages[-1]["content"]
    if chosen_reply.strip() == rejected_reply.strip():
        raise DataError(
            f"{chosen[-1].content_field} and {rejected[-1].content_field}: the two replies are "
            "identical; expected a preferred and a dispreferred reply that differ",
            "identical_pair",
        )
    return record_format, chosen_messages[:-1], chosen_reply, rejected_reply


def _check_not_kto(record: dict) -> None:
    """Refuse a KTO record (LLaMA-Factory's "kto_tag", stored as "label" in its demo): one reply marked good
    or bad is not a pair."""
    tag = next((key for key in KTO_TAGS if key in record), None)
    if tag and not any(side in record for side in SIDES):
        raise DataError(
            f"{tag}: a KTO record (one reply marked good or bad, no 'chosen' and 'rejected'); "
            "expected a preference pair with a chosen and a rejected reply",
            "unsupported",
        )


def _minimind_sides(record: dict) -> tuple[list[Turn], list[Turn]]:
    """Two whole conversations, under "chosen" and "rejected"."""
    sides = []
    for side in SIDES:
        messages = get_field(record, side)
        if not isinstance(messages, list):
            raise DataError(f"{side}: {kind_of(messages)}; expected a list of messages", "wrong_type")
        if not messages:
            raise DataError(
                f"{side}: empty conversation; expected at least a user and an assistant message", "empty_conversation"
            )
        reader = sharegpt_turns if message_list_format(messages) == "sharegpt" else openai_turns
        try:
            turns = reader(messages)  # a bare list: fields are labelled "[0].role", ...
        except DataError as e:
            raise DataError(f"{side}{e}", e.reason) from None
        turns = [Turn(t.role, t.content, side + t.role_field, side + t.content_field) for t in turns]
        sides.append(with_system_field(record, turns))
    return sides[0], sides[1]


def _llamafactory_sides(record: dict) -> tuple[list[Turn], list[Turn]]:
    """The conversation (the prompt) followed by the "chosen" reply, and by the "rejected" one."""
    key = next((key for key in MESSAGE_LISTS if key in record), None)
    sharegpt = key is not None and message_list_format(record[key]) == "sharegpt"
    prompt = (sharegpt_turns if sharegpt else openai_turns)(record)
    if prompt[-1].role != "user":
        raise DataError(
            f"{prompt[-1].role_field}: the prompt ends with a {prompt[-1].role!r} message; expected it "
            "to end with the user turn that 'chosen' and 'rejected' answer",
            "last_not_user",
        )
    return [*prompt, _reply(record, "chosen")], [*prompt, _reply(record, "rejected")]


def _reply(record: dict, side: str) -> Turn:
    """A reply given as a string, a ShareGPT message {from, value} or an OpenAI one {role, content}."""
    reply = get_field(record, side)
    if not isinstance(reply, dict):
        return Turn("assistant", reply, side, side)
    if "from" in reply or "value" in reply:
        speaker, content = get_field(reply, "from", side), get_field(reply, "value", side)
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        role_field, content_field = f"{side}.from", f"{side}.value"
    else:
        speaker = get_field(reply, "role", side)
        role = speaker if speaker in ROLES else None
        role_field, content_field = f"{side}.role", f"{side}.content"
        content = text_of_parts(get_field(reply, "content", side), content_field)
    if role is None:
        raise role_error(role_field, speaker, ("assistant",))
    if role != "assistant":
        raise DataError(f"{role_field}: {speaker!r}; expected the assistant's reply", "alternation")
    return Turn(role, content, role_field, content_field)


def _hh_sides(record: dict) -> tuple[list[Turn], list[Turn]]:
    """Two transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...", under "chosen" and "rejected"."""
    sides = []
    for side in SIDES:
        text = get_field(record, side)
        if not isinstance(text, str):
            raise DataError(f"{side}: {kind_of(text)}; expected a string (a Human/Assistant transcript)", "wrong_type")
        parts = HH_MARKER.split(text.lstrip())
        if len(parts) < 3 or parts[0].strip():
            raise DataError(
                f"{side}: {text.strip()[:40]!r} does not start with 'Human:'; expected a transcript "
                "'\\n\\nHuman: ...\\n\\nAssistant: ...'",
                "bad_transcript",
            )
        sides.append(
            [
                Turn(
                    "user" if speaker == "Human" else "assistant",
                    content.strip(),
                    f"{side} turn {number} ({speaker})",
                    f"{side} turn {number} ({speaker})",
                )
                for number, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), 1)
            ]
        )
    return sides[0], sides[1]


READERS = {"minimind": _minimind_sides, "llamafactory": _llamafactory_sides, "hh-rlhf": _hh_sides}


def _check_same_prompt(chosen: list[Turn], rejected: list[Turn]) -> None:
    """A "prompt_mismatch" error naming the first prompt message where chosen and rejected differ."""
    for index in range(max(len(chosen), len(rejected))):
        a, b = (turns[index] if index < len(turns) else None for turns in (chosen, rejected))
        if a is None or b is None or a.role != b.role or a.content.strip() != b.content.strip():
            show = [
                f"{t.content_field} {t.content.strip()[:40]!r}" if t else f"{side}: no such message"
                for t, side in ((a, "chosen"), (b, "rejected"))
            ]
            raise DataError(
                f"prompt message {index} differs ({show[0]} vs {show[1]}); expected chosen and "
                "rejected to share every message before their final reply",
                "prompt_mismatch",
            )
