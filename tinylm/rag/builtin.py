"""Reading practice for a small model, and a reading test on a world it has never seen.

A model that learned its facts in pretraining answers from memory; asked about something it never
read, it refuses or guesses. To answer from retrieved passages it must learn to *read*: find the
passage about the thing asked, and copy the fact from it. The built-in worlds make that measurable.

**Practice** (``reading_conversations``): conversations whose user turn is exactly what ``tinylm rag
ask`` sends (tinylm.rag.ask's template, numbered passages, the question), built from the encyclopedia
documents of *reading worlds* (seeds far from the training world's): the passage about the entity
asked after, among others about other entities, at a random rank; the reply states the fact and cites
its passage ("The Zorble is red. [2]"). In a quarter of them no passage is about the entity, and the
reply says the passages do not tell ("I don't know: the passages do not say that.").

**Test** (``ReadingTest``): the documents of a *test world* (the training world's seed + 1, which no
training data uses) indexed as files, and every one of its facts asked in both languages. It reports
retrieval (hit@1, hit@5: a passage about the entity that states the value is among the first k), the
answers with the passages, and the answers without them (the model has never heard of these entities,
so that is near nothing).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from tinylm.data import builtin, builtin_chat
from tinylm.data.builtin import LANGS, World, encyclopedia_document, value_text
from tinylm.data.builtin_chat import ChatEvalItem, fact_answer, fact_question, score_reply
from tinylm.rag.ask import with_passages
from tinylm.rag.chunks import passages
from tinylm.rag.search import Hit

CITATION = re.compile(r"\[\d+\]")
READING_SEEDS = range(10_000, 10_064)  # the worlds practice passages come from
NOT_IN_PASSAGES = {"en": "I don't know: the passages do not say that.", "zh": "我不知道，资料中没有提到。"}
NO_ANSWER_SHARE = 0.25
QUESTION_TEMPLATES = 3  # fact_question's phrasings per attribute and language that practice draws from


def reading_test_seed(seed: int) -> int:
    """The world of the reading test: the next seed, never used by training or reading practice."""
    return seed + 1


def documents(world: World, lang: str) -> dict[str, str]:
    """One encyclopedia document per entity of ``world`` in ``lang``: {the entity's name: its text}."""
    rng = random.Random(f"tinylm-reading-docs-{world.seed}-{lang}")
    return {e.names[lang]: encyclopedia_document(world, e, lang, rng) for e in world.entities}


def reading_conversations(n: int, exclude: set[str] = frozenset(), seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` practice conversations (one user turn with passages, one cited reply), half in each
    language; ``exclude``: entity names they must not mention (the training world's)."""
    rng = random.Random(f"tinylm-reading-{seed}")
    worlds = [World(s) for s in READING_SEEDS]
    quoted: dict[tuple[int, str], dict[str, str]] = {}  # (world, language) → each entity's passage, made once
    conversations = []
    while len(conversations) < n:
        world, lang = rng.choice(worlds), LANGS[len(conversations) % 2]
        entities = [e for e in world.entities if e.names[lang] not in exclude]
        if (world.seed, lang) not in quoted:
            quoted[world.seed, lang] = {name: passages(text)[0].text for name, text in documents(world, lang).items()}
        texts = quoted[world.seed, lang]
        entity = rng.choice(entities)
        attribute = rng.choice(list(entity.facts))
        question = fact_question(entity, attribute, lang, rng.randrange(QUESTION_TEMPLATES))
        count = rng.randint(1, 5)
        others = [e for e in entities if e is not entity]
        if rng.random() < NO_ANSWER_SHARE:
            shown, reply = rng.sample(others, count), NOT_IN_PASSAGES[lang]
        else:
            shown = [entity, *rng.sample(others, count - 1)]
            rng.shuffle(shown)
            reply = f"{fact_answer(entity, attribute, lang)} [{shown.index(entity) + 1}]"
        hits = [Hit(e.names[lang], "", 0, texts[e.names[lang]], 0.0) for e in shown]
        turn = with_passages(question, hits)
        conversations.append([{"role": "user", "content": turn}, {"role": "assistant", "content": reply}])
    return conversations


@dataclass
class Question:
    item: ChatEvalItem  # the question alone, with its answer
    name: str  # the entity's name in the question's language
    value: str  # the answer as the documents write it


class ReadingTest:
    """The test world's documents written as files (one per entity and language) and its questions."""

    def __init__(self, seed: int, folder: str | Path, exclude: set[str] = frozenset(), limit: int | None = None):
        self.world = World(reading_test_seed(seed))
        self.folder = Path(folder)
        self.questions: list[Question] = []
        rng = random.Random(f"tinylm-reading-test-{self.world.seed}")
        for lang in LANGS:
            (self.folder / lang).mkdir(parents=True, exist_ok=True)
            for name, text in documents(self.world, lang).items():
                (self.folder / lang / f"{name}.md").write_text(text + "\n", encoding="utf-8")
        for entity, attribute, value in self.world.facts():
            for lang in LANGS:
                if entity.names[lang] in exclude:
                    continue  # a name the training world also uses would test memory, not reading
                question = fact_question(entity, attribute, lang, rng.randrange(QUESTION_TEMPLATES))
                others = tuple(value_text(attribute, v, lang) for v in builtin.VALUES[attribute] if v != value)
                item = ChatEvalItem([{"role": "user", "content": question}], value_text(attribute, value, lang), lang,
                                    "reading", others)  # fmt: skip
                self.questions.append(Question(item, entity.names[lang], value_text(attribute, value, lang)))
        if limit is not None:  # the first ``limit`` of each language
            self.questions = [q for lang in LANGS for q in [x for x in self.questions if x.item.lang == lang][:limit]]

    def retrieval(self, searcher, ks=(1, 5)) -> dict:
        """hit@k per language: a passage about the entity that states the value is among the first k."""
        found = {lang: {k: 0 for k in ks} for lang in LANGS}
        totals = {lang: 0 for lang in LANGS}
        for q in self.questions:
            hits = searcher.search(q.item.messages[-1]["content"], max(ks))
            first = next((i for i, h in enumerate(hits) if q.name in h.text and q.value in h.text), None)
            totals[q.item.lang] += 1
            for k in ks:
                found[q.item.lang][k] += first is not None and first < k
        return {lang: {f"hit@{k}": found[lang][k] / max(totals[lang], 1) for k in ks} for lang in LANGS}

    def answers(self, asker=None, engine=None, chat_format=None, batch: int = 32) -> dict:
        """Accuracy per language of the replies with passages (``asker``) or without (``engine``)."""
        from tinylm.infer.sampling import SamplingSettings

        correct = {lang: 0 for lang in LANGS}
        totals = {lang: 0 for lang in LANGS}
        examples = []
        for start in range(0, len(self.questions), batch):
            chunk = self.questions[start : start + batch]
            questions = [q.item.messages[-1]["content"] for q in chunk]
            if asker is not None:
                prompts = [asker.prompt(asker.turn(question)[0]) for question in questions]
                runner, settings = asker.engine, asker.settings
            else:
                prompts = [chat_format.render([{"role": "user", "content": question}]) for question in questions]
                runner = engine
                settings = chat_format.settings(SamplingSettings(max_new_tokens=32, temperature=0), engine.tokenizer)
            replies = [c.text.strip() for c in runner.run(prompts, settings)]
            for q, question, reply in zip(chunk, questions, replies):
                ok = score_reply(q.item, CITATION.sub("", reply))  # "[2]" cites a passage; it is not "2 legs"
                correct[q.item.lang] += ok
                totals[q.item.lang] += 1
                if len(examples) < 6 and start % 64 == 0:
                    examples.append({"question": question, "answer": q.value, "reply": reply, "correct": ok})
        accuracy = {lang: correct[lang] / max(totals[lang], 1) for lang in LANGS}
        return {"accuracy": accuracy, "questions": totals, "examples": examples}


def training_names(seed: int) -> set[str]:
    """Every entity name of the training world, in both languages."""
    return {e.names[lang] for e in World(seed).entities for lang in LANGS}


def practice_mix(seed: int, reading: int, chat: int) -> list[list[dict[str, str]]]:
    """Reading practice mixed with the built-in chat conversations (so fine-tuning on it keeps the rest)."""
    mixed = reading_conversations(reading, training_names(seed), seed) + builtin_chat.sft_conversations(
        World(seed), n=chat
    )
    random.Random(f"tinylm-reading-mix-{seed}").shuffle(mixed)
    return mixed
