"""Held-out questions with exact answers: how often a model's greedy reply is right.

Each item is a conversation ending with a user's question, the answer a right reply states, and the
values a right reply never states (``tinylm.data.builtin_chat.ChatEvalItem``). The conversation is rendered
in the model's chat format — its own template for a chat model, labelled lines for a base model — and
answered greedily, in batches; ``score_reply`` decides.
"""

from __future__ import annotations

from collections import defaultdict

from tinylm.data import builtin, builtin_chat
from tinylm.data.builtin_chat import score_reply
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings

BATCH = 64  # questions answered together: one left-padded batch through the engine
REPLY_TOKENS = 96  # room for a reply that works its answer out first (a worked sum takes up to ~60 tokens)


def chat_accuracy(engine, items, chat_format, max_new_tokens: int = REPLY_TOKENS, examples: int = 6) -> dict:
    """{"accuracy", "correct", "total", "by_kind": {"fact/en": share, ...}, "examples": [...]}."""
    replies = answer(engine, items, chat_format, max_new_tokens)
    verdicts = [score_reply(item, reply) for item, reply in zip(items, replies)]
    shown = [
        {"question": item.messages[-1]["content"], "answer": item.answer, "reply": reply, "correct": ok}
        for item, reply, ok in zip(items[:examples], replies, verdicts)
    ]
    return tally(items, verdicts, shown)


def answer(engine, items, chat_format, max_new_tokens: int = REPLY_TOKENS) -> list[str]:
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


def identity_report(engine, name: str, author: str, seed: int = 0) -> dict:
    """How well the identity took: held-out paraphrased "who are you / who made you" questions answered
    with the new name or author, and how often replies to general questions mention the name (they
    should not: the model must not answer everything with its name)."""
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    asked = chat_accuracy(engine, builtin_chat.identity_questions(name, author), chat_format)
    questions = builtin_chat.general_questions(builtin.World(seed))
    replies = answer(engine, questions, chat_format)
    general = tally(questions, [builtin_chat.score_reply(q, r) for q, r in zip(questions, replies)], [])
    mentions = sum(name.lower() in reply.lower() for reply in replies)
    return {
        "name": name,
        "author": author,
        "identity_accuracy": asked["accuracy"],
        "identity_questions": asked["total"],
        "general_accuracy": general["accuracy"],
        "general_questions": general["total"],
        "general_mentioning_name": mentions / max(general["total"], 1),
        "examples": asked["examples"],
    }


def heldout_qa(model_dir, seed: int) -> dict:
    """The built-in held-out chat questions (of the world of ``seed``) answered by the model in
    ``model_dir``: {"accuracy", "correct", "total", "by_kind", "left_out"}, "left_out" counting the
    conversations too long for the model's context (none for the quickstart's). A later stage (DPO)
    must not cost the facts SFT taught, and shows by kind what it changed."""
    engine = Engine.from_dir(model_dir, device="cpu")
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    items = builtin_chat.heldout_questions(builtin.World(seed))
    # a model with a small context (a test's) leaves out the conversations it cannot read, and says so
    fits = [i for i in items if len(engine.encode(chat_format.render(i.messages))) < engine.context_length]
    found = chat_accuracy(engine, fits, chat_format)
    return {
        **{key: found[key] for key in ("accuracy", "correct", "total", "by_kind")},
        "left_out": len(items) - len(fits),
    }
