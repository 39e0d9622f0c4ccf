"""Answering from your documents: retrieve, put the passages in the prompt, answer, cite.

The user's turn becomes the template below (the Chinese one when the question has Chinese in it),
with the passages numbered best first. As many passages as fit go in: the model's context must hold
the whole conversation, the passages and room for the reply, so passages are dropped from the end
(the weakest) until it does. ``--prompt-template`` replaces the template; it must contain
``{passages}`` and ``{question}``.
"""

from __future__ import annotations

import re

from tinylm.rag.chunks import CJK
from tinylm.rag.search import Hit

TEMPLATES = {
    "en": (
        "Answer the question using the passages below, and cite the passage you used like [1]. "
        "If the passages do not contain the answer, say that they do not.\n\n{passages}\n\nQuestion: {question}"
    ),
    "zh": (
        "请根据下面的资料回答问题，并注明所用资料的编号，如 [1]。如果资料中没有答案，请说明资料中没有。"
        "\n\n{passages}\n\n问题：{question}"
    ),
}


def template_for(question: str, template: str | None = None) -> str:
    if template is not None:
        missing = [field for field in ("{passages}", "{question}") if field not in template]
        if missing:
            raise ValueError(f"--prompt-template must contain {' and '.join(missing)}")
        return template
    return TEMPLATES["zh" if re.search(f"[{CJK}]", question) else "en"]


def numbered(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{i}] {hit.text}" for i, hit in enumerate(hits, 1))


def with_passages(question: str, hits: list[Hit], template: str | None = None) -> str:
    """The user's turn: the template filled with the numbered passages and the question."""
    return template_for(question, template).replace("{passages}", numbered(hits)).replace("{question}", question)


def fit_passages(question: str, hits: list[Hit], fits, template: str | None = None) -> tuple[str, list[Hit]]:
    """(the user's turn, the passages in it): the best passages for which ``fits(turn)`` holds."""
    for count in range(len(hits), -1, -1):
        turn = with_passages(question, hits[:count], template)
        if fits(turn):
            return turn, hits[:count]
    raise ValueError("the question alone does not fit in the model's context")


def sources(hits: list[Hit]) -> str:
    """One line per cited passage: its number, where it is from, and its score."""
    return "\n".join(f"[{i}] {hit.where()} (score {hit.score:.3f})" for i, hit in enumerate(hits, 1))


class Asker:
    """Turns questions into prompts with passages for one engine and index: what ``rag ask`` answers once
    and ``chat --rag`` does every turn."""

    def __init__(self, engine, searcher, k: int = 5, settings=None, template: str | None = None, system=None):
        from tinylm.infer.chat import chat_format_for

        if engine.tokenizer is None:
            raise ValueError("answering needs the model's tokenizer, and this model has none")
        self.engine, self.searcher, self.k, self.template, self.system = engine, searcher, k, template, system
        self.chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
        self.settings = self.chat_format.settings(settings or engine.defaults, engine.tokenizer)
        template_for("", template)  # a template without its fields fails here, before any work

    def prompt(self, turn: str) -> str:
        from tinylm.infer.chat import with_system

        return self.chat_format.render(with_system(self.system, [{"role": "user", "content": turn}]))

    def fits(self, turn: str) -> bool:
        """Whether a conversation of this one turn leaves room for the reply in the model's context."""
        room = min(self.settings.max_new_tokens, self.engine.context_length // 2)
        return len(self.engine.encode(self.prompt(turn))) + room <= self.engine.context_length

    def turn(self, question: str) -> tuple[str, list[Hit]]:
        """(the user's turn with the passages that fit, those passages)."""
        return fit_passages(question, self.searcher.search(question, self.k), self.fits, self.template)

    def answer(self, question: str) -> tuple[str, list[Hit]]:
        """(the model's answer, the passages it was given)."""
        turn, used = self.turn(question)
        return self.engine.run([self.prompt(turn)], self.settings)[0].text.strip(), used
