"""Held-out questions with exact answers: how often a model's greedy reply is right.

Each item is a conversation ending with a user's question, the answer a right reply states, and the
values a right reply never states (``tinylm.data.builtin_chat.ChatEvalItem``). The conversation is rendered
in the model's chat format — its own template for a chat model, labelled lines for a base model — and
answered greedily, in batches; ``score_reply`` decides.
"""

from __future__ import annotations

from collections import defaultdict

from tinylm.data.builtin_chat import score_reply
from tinylm.infer.sampling import SamplingSettings

BATCH = 64  # questions answered together: one left-padded batch through the engine


def chat_accuracy(engine, items, chat_format, max_new_tokens: int = 32, examples: int = 6) -> dict:
    """{"accuracy", "correct", "total", "by_kind": {"fact/en": share, ...}, "examples": [...]}."""
    replies = answer(engine, items, chat_format, max_new_tokens)
    verdicts = [score_reply(item, reply) for item, reply in zip(items, replies)]
    shown = [
        {"question": item.messages[-1]["content"], "answer": item.answer, "reply": reply, "correct": ok}
        for item, reply, ok in zip(items[:examples], replies, verdicts)
    ]
    return tally(items, verdicts, shown)


def answer(engine, items, chat_format, max_new_tokens: int = 32) -> list[str]:
    """Each item's conversation rendered in ``chat_format`` and answered greedily, in batches."""
    settings = chat_format.settings(SamplingSettings(max_new_tokens=max_new_tokens, temperature=0), engine.tokenizer)
    replies = []
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        replies += [c.text.strip() for c in engine.run([chat_format.render(item.messages) for item in chunk], settings)]
    return replies


def tally(items, verdicts: list[bool], examples: list[dict]) -> dict:
    """Overall and per kind/language shares of right answers (items have ``kind`` and ``lang``)."""
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for item, ok in zip(items, verdicts):
        by_kind[f"{item.kind}/{item.lang}"].append(ok)
    correct = sum(verdicts)
    return {
        "accuracy": correct / max(len(items), 1),
        "correct": correct,
        "total": len(items),
        "by_kind": {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())},
        "examples": examples,
    }
