"""The built-in conversations for supervised fine-tuning, made from the same invented world as the
pretraining corpus (``tinylm.data.builtin``), in English and Chinese.

    world = World(0)
    chats = sft_conversations(world)        # questions and answers about the facts, sums, identity, refusals
    questions = heldout_questions(world)    # chat questions in phrasings the conversations never use
    identity_conversations("Nova", "Ada Lab")   # the identity recipe's templates, filled in
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tinylm.chat_template import split_thinking
from tinylm.data.builtin import (  # the world these conversations talk about
    ATTRIBUTES,
    LANGS,
    NAME_PARTS,
    PRONOUNS,
    TEMPLATES_PER_FACT,
    VALUES,
    Entity,
    World,
    _invent_names,
    arithmetic_answer,
    arithmetic_problems,
    mention,
    value_text,
)
from tinylm.data.builtin_phrasings import (  # what the questions and answers say
    ANSWER_TEMPLATES,
    ARITHMETIC_ANSWERS,
    ARITHMETIC_QUESTIONS,
    FOLLOWUP_TEMPLATES,
    IDENTITY_QUESTIONS,
    IDENTITY_REPLIES,
    IDENTITY_TRAINING_QUESTIONS,
    OPERATION_WORDS,
    QUESTION_TEMPLATES,
    REFUSAL_MARKERS,
    REFUSALS,
    SYSTEM_PROMPTS,
    UNKNOWN_QUESTIONS,
)
from tinylm.io import atomic_write_text
from tinylm.tokenizer import THINK, THINK_END

# -- conversations for supervised fine-tuning ---------------------------------------------------
#
# Messages are OpenAI style: [{"role": "system" | "user" | "assistant", "content": ...}], an optional
# system prompt first, then user and assistant turns alternating, ending with the assistant. Held out,
# as for pretraining: every fact question has four phrasings per language and, for each (entity,
# attribute, language), one of them is never asked in training; follow-ups, questions about unknown
# attributes and identity questions keep phrasings back the same way, and some strangers (entities that
# do not exist) and the held-out arithmetic problems are only ever asked at evaluation.

SFT_VERSION = 5  # bump whenever generated conversations change, so cached files are rewritten
DEFAULT_CONVERSATIONS = 4032  # six rounds of 672 (see sft_round)
DEFAULT_NAME, DEFAULT_AUTHOR = "TinyLM", "Maple Lab"  # who the assistant says it is, and who made it
SYSTEM_SHARE = 0.2  # the share of conversations that open with a system prompt
N_STRANGERS, HELDOUT_STRANGERS = 12, 4  # per kind: names of no one, and how many of them only evaluation uses
MORE_STRANGERS = 32  # per kind: names of no one that only training uses, besides the first N_STRANGERS
IDENTITY_HELDOUT_EVERY = 4  # every fourth identity question (indices 3, 7, ...) is kept for evaluation

# The share of arithmetic answers that work the problem out first, between <|think|> and <|think_end|>.
# All of them by default: answering in one token, this 1M-parameter model gets about one held-out sum
# in six right; working them out, 42 of 46 (docs/sft.md). The RL demos fine-tune on a third
# (COLD_START_REASONING, `--data.builtin_reasoning`): that chat model can reason but mostly answers
# straight away, which is what DPO and GRPO then change (docs/dpo.md, docs/rl.md).
REASONING_SHARE = 1.0
COLD_START_REASONING = 1 / 3


@dataclass(frozen=True)
class ChatEvalItem:
    """A conversation whose next assistant reply should state ``answer`` and none of ``wrong``."""

    messages: list[dict[str, str]]  # ends with the user's question
    answer: str  # a fact's value, a number, REFUSAL_MARKERS[lang], or the assistant's name or author
    lang: str  # "en" or "zh"
    kind: str  # "fact", "followup", "arithmetic", "refusal" or "identity"
    wrong: tuple[str, ...] = ()  # what a right reply never says: the other values, other numbers, any value


def chat(exchanges: list[tuple[str, str]], system: str | None = None) -> list[dict[str, str]]:
    """(question, answer) pairs as messages, after an optional system prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in exchanges:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def ask(context: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    """Messages that end with a question for the model: ``context`` exchanges, then ``question``."""
    return [*chat(context), {"role": "user", "content": question}]


def sft_heldout(world: World, count: int, *key: str) -> int:
    """Which of ``count`` phrasings training never uses for ``key`` (what is asked, about whom, in which
    language): a seeded draw, the same for the same world and key. Evaluation asks in that phrasing."""
    return random.Random("/".join(("tinylm-sft", str(world.seed), *key))).randrange(count)


def sft_choices(world: World, count: int, *key: str) -> list[int]:
    """The phrasings training may use for ``key``: all but the held-out one."""
    heldout = sft_heldout(world, count, *key)
    return [i for i in range(count) if i != heldout]


def strangers(world: World, heldout: bool = False) -> list[Entity]:
    """Creatures and people that do not exist, named in the world's style, with no facts: what the
    refusals are about. The last ``HELDOUT_STRANGERS`` of the first ``N_STRANGERS`` of each kind are
    only asked about in evaluation; ``MORE_STRANGERS`` more of each kind, named after them, are only
    asked about in training (a model that has refused few names answers about a new one as if it knew
    it, in Chinese above all)."""
    rng = random.Random(f"tinylm-strangers-{world.seed}")
    taken = {lang: [e.names[lang] for e in world.entities] for lang in LANGS}
    chosen: list[Entity] = []
    for count, keep in ((N_STRANGERS, "split"), (MORE_STRANGERS, "train")):
        for kind in ("creature", "person"):
            names = {lang: _invent_names(rng, *NAME_PARTS[kind, lang], count, taken[lang]) for lang in LANGS}
            entities = [Entity(kind, {lang: names[lang][i] for lang in LANGS}, {}) for i in range(count)]
            if keep == "split":
                chosen += entities[-HELDOUT_STRANGERS:] if heldout else entities[:-HELDOUT_STRANGERS]
            elif not heldout:
                chosen += entities
    return chosen


# -- the turns of a conversation ----------------------------------------------------------------


def _names(entity: Entity, lang: str) -> dict[str, str]:
    return {"E": mention(entity, lang), "Es": mention(entity, lang, start=True)}


def fact_question(entity: Entity, attribute: str, lang: str, template: int) -> str:
    """ "What colour is the Zorble?", "咕噜兽是什么颜色的？"."""
    return QUESTION_TEMPLATES[attribute, lang][template].format(**_names(entity, lang))


def fact_answer(entity: Entity, attribute: str, lang: str) -> str:
    """ "The Zorble is red.", "咕噜兽的毛色是红色。"."""
    value = value_text(attribute, entity.facts[attribute], lang)
    return ANSWER_TEMPLATES[attribute, lang].format(**_names(entity, lang), v=value)


def followup_question(entity: Entity, attribute: str, lang: str, template: int) -> str:
    """A question about the entity just talked about, by pronoun: "And its colour?", "她的工作呢？"."""
    if lang == "zh":
        it = "它" if entity.kind == "creature" else PRONOUNS[entity.pronoun]["zh"]
        its = it + "的"
    else:
        it, its = ("it", "its") if entity.kind == "creature" else PRONOUNS[entity.pronoun]["en"]
    return FOLLOWUP_TEMPLATES[attribute, lang][template].format(it=it, its=its)


def unknown_question(entity: Entity, lang: str, template: int) -> str:
    """A question about something the world never says: "How old is Mira?"."""
    return UNKNOWN_QUESTIONS[lang][template].format(**_names(entity, lang))


def refusal(reason: str, entity: Entity, lang: str, rng: random.Random) -> str:
    """A polite "I don't know" about ``entity``; ``reason`` is "stranger" or "unknown" (attribute)."""
    return rng.choice(REFUSALS[reason, lang]).format(**_names(entity, lang))


def arithmetic_question(problem: tuple[int, str, int], lang: str, template: int) -> str:
    a, op, b = problem
    return ARITHMETIC_QUESTIONS[lang][template].format(a=a, op=op, b=b, word=OPERATION_WORDS[op, lang])


def arithmetic_reply(problem: tuple[int, str, int], lang: str, reasoning: bool = False) -> str:
    """ "The answer is 7."; with ``reasoning``, the worked steps first, between the reasoning markers."""
    answer = ARITHMETIC_ANSWERS[lang].format(v=arithmetic_answer(problem))
    return f"{THINK}{arithmetic_steps(problem)}{THINK_END}{answer}" if reasoning else answer


def arithmetic_steps(problem: tuple[int, str, int]) -> str:
    """A problem worked out one step at a time, each step the same small move that any problem takes:
    one goes from the second number to the first (a sum) or off both (a difference) until the second
    is 0. "8 + 3 = 9 + 2 = 10 + 1 = 11 + 0 = 11", "7 - 2 = 6 - 1 = 5 - 0 = 5". A held-out problem is
    worked with the same moves as the training ones (and appears inside longer ones' steps)."""
    a, op, b = problem
    steps = [f"{a} {op} {b}"]
    while b > 0:
        a, b = (a + 1 if op == "+" else a - 1), b - 1
        steps.append(f"{a} {op} {b}")
    return " = ".join(steps) + f" = {a}"


# -- training conversations ---------------------------------------------------------------------


def training_fact_question(world: World, rng: random.Random, entity: Entity, attribute: str, lang: str) -> str:
    template = rng.choice(sft_choices(world, TEMPLATES_PER_FACT, "question", entity.names["en"], attribute, lang))
    return fact_question(entity, attribute, lang, template)


def fact_exchange(world: World, rng: random.Random, entity: Entity, attribute: str, lang: str) -> tuple[str, str]:
    """A fact asked in a training phrasing, and its answer."""
    return training_fact_question(world, rng, entity, attribute, lang), fact_answer(entity, attribute, lang)


def training_unknown_question(world: World, rng: random.Random, entity: Entity, lang: str) -> str:
    """Something nobody knows about ``entity``, asked in a training phrasing: "How old is Mira?"."""
    count = len(UNKNOWN_QUESTIONS[lang])
    return unknown_question(entity, lang, rng.choice(sft_choices(world, count, "unknown", entity.names["en"], lang)))


def stranger_question(rng: random.Random, stranger: Entity, lang: str) -> tuple[str, str]:
    """(a fact question about ``stranger`` in any phrasing, the attribute it asks)."""
    attribute = rng.choice(ATTRIBUTES[stranger.kind])
    return fact_question(stranger, attribute, lang, rng.randrange(TEMPLATES_PER_FACT)), attribute


def multiturn_exchanges(world: World, rng: random.Random, entity: Entity, lang: str) -> list[tuple[str, str]]:
    """Two or three questions in a row. The first asks about ``entity``; each later one either follows
    up on the entity of the previous answer ("And its colour?", two times in three while it has facts
    left to ask) or turns to another entity by name."""
    attribute = rng.choice(list(entity.facts))
    exchanges = [fact_exchange(world, rng, entity, attribute, lang)]
    asked = {attribute}
    for _ in range(rng.choice((1, 2))):
        left = [a for a in entity.facts if a not in asked]
        if left and rng.random() < 2 / 3:
            attribute = rng.choice(left)
            count = len(FOLLOWUP_TEMPLATES[attribute, lang])
            template = rng.choice(sft_choices(world, count, "followup", entity.names["en"], attribute, lang))
            question = followup_question(entity, attribute, lang, template)
        else:
            entity = rng.choice([e for e in world.entities if e is not entity])
            attribute = rng.choice(list(entity.facts))
            question = training_fact_question(world, rng, entity, attribute, lang)
            asked = set()
        asked.add(attribute)
        exchanges.append((question, fact_answer(entity, attribute, lang)))
    return exchanges


def arithmetic_exchange(world: World, rng: random.Random, lang: str, reasoning: bool = False) -> tuple[str, str]:
    """A problem that is not held out, in any phrasing, answered "The answer is 7.", with ``reasoning``
    worked out first (``arithmetic_steps``)."""
    problem = rng.choice([p for p in arithmetic_problems() if p not in world.heldout_problems])
    question = arithmetic_question(problem, lang, rng.randrange(len(ARITHMETIC_QUESTIONS[lang])))
    return question, arithmetic_reply(problem, lang, reasoning)


def refusal_exchange(world: World, rng: random.Random, lang: str, unknown: list[Entity]) -> tuple[str, str]:
    """Half the time a fact question about one of the ``unknown`` strangers, half the time a question
    about an attribute nobody has; either way the answer is a refusal."""
    if rng.random() < 0.5:
        stranger = rng.choice(unknown)
        question, _ = stranger_question(rng, stranger, lang)
        return question, refusal("stranger", stranger, lang, rng)
    entity = rng.choice(world.entities)
    return training_unknown_question(world, rng, entity, lang), refusal("unknown", entity, lang, rng)


SWITCHES = ("identity", "entity", "refusal", "arithmetic", "back")  # what a topic switch turns to (see below)


def other_lang(lang: str) -> str:
    return next(other for other in LANGS if other != lang)


def switch_exchanges(
    world: World,
    rng: random.Random,
    entity: Entity,
    lang: str,
    name: str,
    author: str,
    reasoning_share: float = REASONING_SHARE,
) -> list[tuple[str, str]]:
    """A conversation that changes topic: one or two questions about ``entity``, then a question of
    another kind: who the assistant is, another entity, someone nobody knows or something nobody
    knows, a sum, or ("back") a sum or an identity question first and only then ``entity``. One
    switch in four also changes language; a sum is worked out first with probability
    ``reasoning_share``. Without these, a model that only ever saw follow-ups answers "Who are you?"
    about the creature it was just asked about."""
    switch = rng.choice(SWITCHES)
    attribute = rng.choice(list(entity.facts))
    to = other_lang(lang) if rng.random() < 0.25 else lang
    if switch == "back":
        if rng.random() < 0.5:
            opening = arithmetic_exchange(world, rng, lang, rng.random() < reasoning_share)
        else:
            opening = identity_exchange(rng, lang, name, author)
        question = training_fact_question(world, rng, entity, attribute, to)
        return [opening, (question, fact_answer(entity, attribute, to))]
    exchanges = [fact_exchange(world, rng, entity, attribute, lang)]
    left = [a for a in entity.facts if a != attribute]
    if rng.random() < 0.5:
        then = rng.choice(left)
        count = len(FOLLOWUP_TEMPLATES[then, lang])
        template = rng.choice(sft_choices(world, count, "followup", entity.names["en"], then, lang))
        exchanges.append((followup_question(entity, then, lang, template), fact_answer(entity, then, lang)))
    if switch == "identity":
        exchanges.append(identity_exchange(rng, to, name, author))
    elif switch == "entity":
        other = rng.choice([e for e in world.entities if e is not entity])
        then = rng.choice(list(other.facts))
        exchanges.append(fact_exchange(world, rng, other, then, to))
    elif switch == "refusal":
        exchanges.append(refusal_exchange(world, rng, to, strangers(world)))
    else:
        exchanges.append(arithmetic_exchange(world, rng, to, rng.random() < reasoning_share))
    return exchanges


def identity_exchange(rng: random.Random, lang: str, name: str, author: str) -> tuple[str, str]:
    """An identity question in a training phrasing, answered with ``name`` and ``author``."""
    _, _, question, reply = rng.choice([t for t in identity_templates() if t[0] == lang])
    return question, reply.format(name=name, author=author)


def system_prompt(rng: random.Random, lang: str) -> str | None:
    """A system prompt for ``SYSTEM_SHARE`` of the conversations, None for the rest."""
    return rng.choice(SYSTEM_PROMPTS[lang]) if rng.random() < SYSTEM_SHARE else None


def sft_round(
    world: World,
    rng: random.Random,
    name: str,
    author: str,
    reasoning: random.Random | None = None,
    switching: random.Random | None = None,
    reasoning_share: float = REASONING_SHARE,
) -> list[list[dict[str, str]]]:
    """One round of 672 conversations (with the default world), shuffled:

    - 288 (44%) single-turn fact questions: every fact, in both languages, in a training phrasing;
    - 80 (12%) multi-turn conversations: one starting at each entity, in both languages;
    - 80 (12%) conversations that switch topic (``switch_exchanges``), one starting at each entity;
    - 96 (14%) arithmetic questions and 80 (12%) refusals, alternating between the languages;
    - 48 (7%) identity questions in either language, answered with ``name`` and ``author``.

    A fifth of them, whatever their kind, open with a system prompt. A sum is worked out first with
    probability ``reasoning_share`` (every one by default). Half of the arithmetic questions, and which
    answers reason first, are drawn from ``reasoning``, a stream of its own (without it: 48 arithmetic
    questions, none reasoned), and the topic switches from ``switching`` (without it: none), so that
    every other conversation is what it was before these were added.
    """
    facts = [(e, a, lang) for e, a, _ in world.facts() for lang in LANGS]
    unknown = strangers(world)
    identity = identity_templates()
    alternating = [LANGS[i % 2] for i in range(len(facts))]
    parts = [(lang, [fact_exchange(world, rng, e, a, lang)]) for e, a, lang in facts]
    parts += [(lang, multiturn_exchanges(world, rng, e, lang)) for e in world.entities for lang in LANGS]
    parts += [
        (lang, [arithmetic_exchange(world, rng, lang, reasoning is not None and reasoning.random() < reasoning_share)])
        for lang in alternating[: len(facts) // 6]
    ]
    parts += [(lang, [refusal_exchange(world, rng, lang, unknown)]) for lang in alternating[: 2 * len(world.entities)]]
    for lang, _, question, reply in rng.sample(identity, len(facts) // 6):
        parts.append((lang, [(question, reply.format(name=name, author=author))]))
    rng.shuffle(parts)
    conversations = [chat(exchanges, system_prompt(rng, lang)) for lang, exchanges in parts]
    if reasoning is not None:
        for lang in alternating[: len(facts) // 6]:
            exchange = arithmetic_exchange(world, reasoning, lang, reasoning.random() < reasoning_share)
            conversation = chat([exchange], system_prompt(reasoning, lang))
            conversations.insert(reasoning.randrange(len(conversations) + 1), conversation)
    if switching is not None:
        for entity in world.entities:
            for lang in LANGS:
                exchanges = switch_exchanges(world, switching, entity, lang, name, author, reasoning_share)
                conversation = chat(exchanges, system_prompt(switching, lang))
                conversations.insert(switching.randrange(len(conversations) + 1), conversation)
    return conversations


def sft_conversations(
    world: World,
    n: int | None = None,
    name: str = DEFAULT_NAME,
    author: str = DEFAULT_AUTHOR,
    reasoning_share: float = REASONING_SHARE,
) -> list[list[dict[str, str]]]:
    """The fine-tuning conversations: ``n`` of them (default ``DEFAULT_CONVERSATIONS``), always the same
    for the same world, name, author and ``reasoning_share`` (the share of sums worked out first).
    They come in rounds (see ``sft_round`` for the mix): every fact is asked again in every round, in a
    freshly chosen training phrasing."""
    if not 0.0 <= reasoning_share <= 1.0:
        raise ValueError(f"reasoning_share: expected a share between 0 and 1, got {reasoning_share}")
    n = DEFAULT_CONVERSATIONS if n is None else n
    rng = random.Random(f"tinylm-sft-{world.seed}")
    reasoning = random.Random(f"tinylm-sft-reasoning-{world.seed}")
    switching = random.Random(f"tinylm-sft-switching-{world.seed}")
    conversations: list[list[dict[str, str]]] = []
    while len(conversations) < n:
        conversations += sft_round(world, rng, name, author, reasoning, switching, reasoning_share)
    return conversations[:n]


# -- identity -----------------------------------------------------------------------------------


def identity_templates(heldout: bool = False) -> list[tuple[str, str, str, str]]:
    """(lang, topic, question, reply) for every identity question paired with every reply on its topic
    ("name" or "author"); replies hold ``{name}`` and ``{author}`` placeholders. ``heldout=True`` gives
    the questions training never uses (every ``IDENTITY_HELDOUT_EVERY``-th of ``IDENTITY_QUESTIONS``);
    training also asks ``IDENTITY_TRAINING_QUESTIONS``."""
    found = [
        (lang, topic, question, reply)
        for (topic, lang), questions in IDENTITY_QUESTIONS.items()
        for i, question in enumerate(questions)
        if (i % IDENTITY_HELDOUT_EVERY == IDENTITY_HELDOUT_EVERY - 1) == heldout
        for reply in IDENTITY_REPLIES[topic, lang]
    ]
    if not heldout:
        found += [
            (lang, topic, question, reply)
            for (topic, lang), questions in IDENTITY_TRAINING_QUESTIONS.items()
            for question in questions
            for reply in IDENTITY_REPLIES[topic, lang]
        ]
    return found


def identity_conversations(
    name: str, author: str, n: int | None = None, heldout: bool = False
) -> list[list[dict[str, str]]]:
    """Identity templates filled with ``name`` and ``author``: every one of them once, or ``n`` drawn
    at random (always the same ``n``)."""
    templates = identity_templates(heldout)
    if n is not None:
        rng = random.Random("tinylm-identity")
        templates = [rng.choice(templates) for _ in range(n)]
    return [chat([(question, reply.format(name=name, author=author))]) for _, _, question, reply in templates]


def identity_questions(name: str = DEFAULT_NAME, author: str = DEFAULT_AUTHOR) -> list[ChatEvalItem]:
    """Each held-out identity question once; a right reply names ``name`` (asked who it is) or
    ``author`` (asked who made it)."""
    asked = dict.fromkeys((lang, topic, question) for lang, topic, question, _ in identity_templates(heldout=True))
    return [
        ChatEvalItem(ask([], question), name if topic == "name" else author, lang, "identity")
        for lang, topic, question in asked
    ]


# -- evaluation of a chat model -----------------------------------------------------------------


def heldout_questions(world: World, name: str = DEFAULT_NAME, author: str = DEFAULT_AUTHOR) -> list[ChatEvalItem]:
    """Questions in phrasings training never pairs with them, with exact answers, in both languages:
    every fact in its held-out phrasing (288 with the default world), a held-out follow-up for each
    entity (80), every held-out arithmetic problem (46), refusals (96), identity questions (16) and a
    topic switch after a question about each entity (80)."""
    rng = random.Random(f"tinylm-sft-eval-{world.seed}")
    items = _fact_items(world) + _followup_items(world, rng) + _arithmetic_items(world, rng)
    items += _refusal_items(world, rng) + identity_questions(name, author)
    return items + _switch_items(world, random.Random(f"tinylm-sft-eval-switch-{world.seed}"), name, author)


def _fact_item(context, question: str, attribute: str, value: str, lang: str, kind: str) -> ChatEvalItem:
    """A question whose answer is a fact's value; every other value of that attribute is wrong."""
    others = tuple(value_text(attribute, v, lang) for v in VALUES[attribute] if v != value)
    return ChatEvalItem(ask(context, question), value_text(attribute, value, lang), lang, kind, others)


def _fact_items(world: World) -> list[ChatEvalItem]:
    """Every fact, asked in the phrasing training never uses for it."""
    items = []
    for entity, attribute, value in world.facts():
        for lang in LANGS:
            template = sft_heldout(world, TEMPLATES_PER_FACT, "question", entity.names["en"], attribute, lang)
            question = fact_question(entity, attribute, lang, template)
            items.append(_fact_item([], question, attribute, value, lang, "fact"))
    return items


def _followup_items(world: World, rng: random.Random) -> list[ChatEvalItem]:
    """For each entity and language: a first question and its answer, then a follow-up about another
    attribute in the phrasing training never uses for it."""
    items = []
    for entity in world.entities:
        for lang in LANGS:
            first, then = rng.sample(list(entity.facts), 2)
            context = [fact_exchange(world, rng, entity, first, lang)]
            count = len(FOLLOWUP_TEMPLATES[then, lang])
            template = sft_heldout(world, count, "followup", entity.names["en"], then, lang)
            question = followup_question(entity, then, lang, template)
            items.append(_fact_item(context, question, then, entity.facts[then], lang, "followup"))
    return items


def _arithmetic_items(world: World, rng: random.Random) -> list[ChatEvalItem]:
    """Every held-out problem (never seen in pretraining or fine-tuning); any other number is wrong."""
    items = []
    for problem in sorted(world.heldout_problems):
        answer = arithmetic_answer(problem)
        others = tuple(str(v) for v in range(19) if str(v) != answer)
        for lang in LANGS:
            question = arithmetic_question(problem, lang, rng.randrange(len(ARITHMETIC_QUESTIONS[lang])))
            items.append(ChatEvalItem(ask([], question), answer, lang, "arithmetic", others))
    return items


def _refusal_items(world: World, rng: random.Random) -> list[ChatEvalItem]:
    """A fact question about each held-out stranger, and for each entity its held-out question about an
    attribute nobody has. A right reply says "I don't know" and names no value of any attribute."""
    items = []
    for lang in LANGS:
        any_value = tuple(value_text(a, v, lang) for a in VALUES for v in VALUES[a])
        questions = [stranger_question(rng, s, lang)[0] for s in strangers(world, heldout=True)]
        count = len(UNKNOWN_QUESTIONS[lang])
        questions += [
            unknown_question(e, lang, sft_heldout(world, count, "unknown", e.names["en"], lang)) for e in world.entities
        ]
        items += [ChatEvalItem(ask([], q), REFUSAL_MARKERS[lang], lang, "refusal", any_value) for q in questions]
    return items


def _switch_items(world: World, rng: random.Random, name: str, author: str) -> list[ChatEvalItem]:
    """For each entity and language, a conversation that changes topic, in turn: after a first answer
    about the entity, a held-out identity question, another entity's fact in its held-out phrasing, or
    a held-out stranger; or after a sum, the entity's fact in its held-out phrasing. The right reply
    is about the new topic: the name or author, the other fact, "I don't know"."""
    items = []
    for lang in LANGS:
        identity = [item for item in identity_questions(name, author) if item.lang == lang]
        unknown = strangers(world, heldout=True)
        any_value = tuple(value_text(a, v, lang) for a in VALUES for v in VALUES[a])
        for i, entity in enumerate(world.entities):
            first = rng.choice(list(entity.facts))
            context = [fact_exchange(world, rng, entity, first, lang)]
            variant = i % 4
            if variant == 0:
                asked = identity[(i // 4) % len(identity)]
                items.append(ChatEvalItem(ask(context, asked.messages[-1]["content"]), asked.answer, lang, "switch"))
            elif variant == 2:
                stranger = unknown[(i // 4) % len(unknown)]
                question, _ = stranger_question(rng, stranger, lang)
                items.append(ChatEvalItem(ask(context, question), REFUSAL_MARKERS[lang], lang, "switch", any_value))
            else:
                if variant == 3:
                    context, other = [arithmetic_exchange(world, rng, lang)], entity
                else:
                    other = rng.choice([e for e in world.entities if e is not entity])
                attribute = rng.choice(list(other.facts))
                template = sft_heldout(world, TEMPLATES_PER_FACT, "question", other.names["en"], attribute, lang)
                question = fact_question(other, attribute, lang, template)
                items.append(_fact_item(context, question, attribute, other.facts[attribute], lang, "switch"))
    return items


def general_questions(world: World) -> list[ChatEvalItem]:
    """Held-out questions that are not about the assistant (facts, follow-ups, arithmetic): a model
    fine-tuned on its identity must still answer these, without mentioning its own name."""
    return [item for item in heldout_questions(world) if item.kind in ("fact", "followup", "arithmetic")]


def says(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words: "8" is not in "18", "red" not in "reddish"."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(phrase)}(?![0-9A-Za-z])", text) is not None


def score_reply(item: ChatEvalItem, reply: str) -> bool:
    """True when the assistant's reply states the answer and nothing in ``item.wrong``. Asked the
    Zorble's colour, "The Zorble is red." is right, "The Zorble is red or blue." is not; asked about a
    stranger, "I don't know." is right, "I don't know, maybe red." is not. A reply that works its answer
    out first is judged by what follows its reasoning (``chat_template.split_thinking``)."""
    answer = split_thinking(reply)[1]
    return says(answer, item.answer) and not any(says(answer, w) for w in item.wrong)


def write_sft_corpus(out_dir: str | Path, seed: int = 0, reasoning_share: float = REASONING_SHARE) -> list[Path]:
    """Write the default conversations of ``World(seed)`` as JSON lines ({"messages": [...]}); reuse
    them if present. A ``reasoning_share`` other than the default is part of the file's name."""
    share = "" if reasoning_share == REASONING_SHARE else f"-reasoning{reasoning_share:g}"
    path = Path(out_dir) / f"sft-seed{seed}-v{SFT_VERSION}{share}.jsonl"
    if not path.is_file():
        conversations = sft_conversations(World(seed), reasoning_share=reasoning_share)
        lines = [json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations]
        atomic_write_text(path, "".join(lines))
    return [path]
