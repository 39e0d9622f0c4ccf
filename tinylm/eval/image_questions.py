"""How well a vision-language model sees: the built-in held-out questions, answered greedily.

Each held-out question (``heldout.jsonl`` of the built-in pictures) has one exact answer among its
``choices`` (every answer of its kind), so 1 / len(choices) is the chance rate. A reply is right when
the answer is the only choice it names (a choice inside a longer named one, "at the top" inside "at the
top left", does not count separately). The same questions asked about a blank picture are the control:
what the model gets right without seeing anything (from the question's wording alone).

A follow-up (kind "follow-up", its own kind named by ``asks``) is a later question of a conversation
about one picture: it is asked after the questions in ``before``, each followed by the model's own
greedy reply, as in a chat. The replies to a conversation's first questions are those of the same
questions asked on their own, so follow-ups cost only their own answers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tinylm.data.builtin_images import BACKGROUND
from tinylm.infer.chat import IMAGE_PREFIX, chat_format_for
from tinylm.infer.sampling import SamplingSettings

KINDS = ("colour", "shape", "count", "position", "follow-up")


def read_heldout(path: str | Path) -> list[dict]:
    path = Path(path)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record in records:
        record["image_path"] = path.parent / record["image"]
    return records


def named_choices(reply: str, choices) -> list[str]:
    """The choices a reply names, leaving out any that is only part of a longer named one."""
    found = [c for c in choices if c in reply]
    return [c for c in found if not any(c != other and c in other for other in found)]


def is_right(reply: str, record: dict) -> bool:
    return named_choices(reply, record["choices"]) == [record["answer"]]


def answer_questions(engine, records: list[dict], images: list, batch_size: int = 32) -> list[str]:
    """Greedy replies to each record's question about its image (``images[i]`` for record i, the picture
    its "image" names), after the questions of its ``before`` and the model's replies to them.
    Conversations are answered a turn at a time, every first question, then every second one, ...; a
    reply is computed once per picture and questions so far, and serves every record that begins so."""
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    settings = chat_format.settings(SamplingSettings(max_new_tokens=16, temperature=0), engine.tokenizer)
    chains = [(r["image"], (*r.get("before", ()), r["question"])) for r in records]
    replies = {}  # (picture, the questions so far) → the reply to the last one
    for turns in range(1, max((len(questions) for _, questions in chains), default=0) + 1):
        pending = {}  # (picture, its first ``turns`` questions) → a record index that shows that picture
        for index, (picture, questions) in enumerate(chains):
            key = (picture, questions[:turns])
            if len(questions) >= turns and key not in replies:
                pending.setdefault(key, index)
        keys = list(pending)
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            prompts = [chat_format.render(_messages(picture, questions, replies)) for picture, questions in chunk]
            completions = engine.run(prompts, settings, images=[[images[pending[key]]] for key in chunk])
            replies.update({key: c.text.strip() for key, c in zip(chunk, completions)})
    return [replies[chain] for chain in chains]


def _messages(picture: str, questions: tuple[str, ...], replies: dict) -> list[dict]:
    """The conversation so far: the picture with the first question, each earlier question followed by
    the model's reply to it."""
    messages = []
    for turn, question in enumerate(questions):
        messages.append({"role": "user", "content": (IMAGE_PREFIX if turn == 0 else "") + question})
        if turn < len(questions) - 1:
            messages.append({"role": "assistant", "content": replies[picture, questions[: turn + 1]]})
    return messages


def tally(records: list[dict], replies: list[str]) -> dict:
    """Accuracy per kind (with its chance rate and count) and overall."""
    right, total, chance = defaultdict(int), defaultdict(int), defaultdict(float)
    for record, reply in zip(records, replies):
        kind = record["kind"]
        total[kind] += 1
        right[kind] += is_right(reply, record)
        chance[kind] += 1 / len(record["choices"])  # a follow-up's chance is its own question's
    by_kind = {
        k: {"accuracy": right[k] / total[k], "chance": chance[k] / total[k], "questions": total[k]}
        for k in KINDS
        if total[k]
    }
    return {
        "accuracy": sum(right.values()) / max(sum(total.values()), 1),
        "questions": sum(total.values()),
        "by_kind": by_kind,
    }


def heldout_report(engine, heldout_path: str | Path, limit: int | None = None) -> dict:
    """Held-out accuracy per kind against chance, the blank-picture control, and a few examples."""
    from PIL import Image  # Pillow, loaded only for the blank picture

    records = read_heldout(heldout_path)[:limit]
    replies = answer_questions(engine, records, [r["image_path"] for r in records])
    blank = Image.new("RGB", (64, 64), BACKGROUND)
    blank_replies = answer_questions(engine, records, [blank] * len(records))
    report = tally(records, replies)
    report["blank_picture"] = tally(records, blank_replies)
    answered = list(zip(records, replies))
    singles = [(r, reply) for r, reply in answered if "before" not in r]
    follow_ups = [(r, reply) for r, reply in answered if "before" in r]
    if follow_ups:  # the follow-ups again, by the kind of question each one asks
        by_asked = [{**r, "kind": r["asks"]} for r, _ in follow_ups]
        report["follow_up_by_kind"] = tally(by_asked, [reply for _, reply in follow_ups])["by_kind"]
    shown = min(2, len(follow_ups))
    report["examples"] = [  # a dozen, spread out: ten single questions and two follow-ups when there are any
        {
            "image": r["image"],
            **({"before": r["before"]} if "before" in r else {}),
            "question": r["question"],
            "answer": r["answer"],
            "reply": reply,
            "right": is_right(reply, r),
        }
        for group, count in ((singles, 12 - shown), (follow_ups, shown))
        for r, reply in group[:: max(1, len(group) // 12)][:count]
    ]
    return report


def render_heldout(report: dict) -> str:
    """The report as a few lines: per kind, accuracy vs chance, and with a blank picture."""
    lines = [
        f"held-out questions: {report['accuracy']:.1%} right of {report['questions']} "
        f"(with a blank picture instead: {report['blank_picture']['accuracy']:.1%})"
    ]
    for kind, row in report["by_kind"].items():
        blank = report["blank_picture"]["by_kind"][kind]["accuracy"]
        lines.append(
            f"  {kind:<9} {row['accuracy']:6.1%}   chance {row['chance']:5.1%}   blank picture {blank:6.1%}   "
            f"({row['questions']} questions)"
        )
    if "follow_up_by_kind" in report:
        lines.append(f"  follow-ups by what they ask: {follow_up_line(report)}")
    return "\n".join(lines)


def follow_up_line(report: dict) -> str:
    """The follow-ups' accuracy by the kind of question they ask: "colour 90.0% (100), shape ..."."""
    return ", ".join(
        f"{kind} {row['accuracy']:.1%} ({row['questions']})" for kind, row in report["follow_up_by_kind"].items()
    )
