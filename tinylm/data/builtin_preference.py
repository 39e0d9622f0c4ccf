"""The built-in preference pairs for DPO: questions of every kind the chat model was fine-tuned on,
each with a preferred answer and a dispreferred one, and the sums it gets wrong, worked out.

    train, heldout = preference_pairs(World(0))

    facts       "What colour is the Zorble?"  "The Zorble is red."  vs  "The Zorble is blue." / a rude reply
                / "I don't know ..." (what the model knows must not be refused)
    follow-ups  the same after a first answer about the entity: "And its town?"
    refusals    asked about someone who does not exist, or something nobody knows:
                "I don't know ..."  vs  a confidently made-up fact / a rude brush-off
    identity    "Who are you?"  "My name is TinyLM ..."  vs  a rude brush-off / "I have never heard of ..."
    sums        "What is 6 plus 5?"  "<|think|>6 + 5 = 7 + 4 = ... = 11<|think_end|>The answer is 11."
                vs  "The answer is 11."

The sums are what DPO is aimed at, on the chat model of the RL demos' cold start: fine-tuned with
``--data.builtin_reasoning=0.33``, it worked a third of its sums out and answered the rest straight
away, and then answers a sum it has not seen straight away, and mostly wrong (11 of 46 right). It
can work sums out; it does not choose to. Preferring the worked answer to the bare one, even when
the bare one is right, changes that choice (docs/dpo.md has the figures). The default chat model
works every sum out already: these pairs have nothing to change there. The
other pairs keep what fine-tuning taught where it was; a third of the training pairs are asked after
an exchange about something else, so that what DPO changes on single questions does not garble the
model's conversations.

Training pairs ask in the phrasings fine-tuning used; held-out pairs ask every fact in the phrasing
fine-tuning never used, a follow-up per entity in its held-out phrasing, the held-out sums, the
strangers only evaluation knows, and the held-out identity questions. The held-out refusals are
rejected as the fine-tuned model gets them wrong (``refusal_probes``): about a stranger, a known
entity's fact under the known name whose name shares a part with the stranger's ("哞米兽" beside
"哞噜兽"); asked something nobody knows about someone known, a fact about them that answers another
question. Each pair's ``kind`` ("arithmetic/zh", ...) is the held-out question kind it belongs with,
so a DPO run reports both by kind.
"""

from __future__ import annotations

import random

from tinylm.data.builtin import (
    ATTRIBUTES,
    LANGS,
    NAME_PARTS,
    TEMPLATES_PER_FACT,
    VALUES,
    Entity,
    World,
    arithmetic_problems,
    value_text,
)
from tinylm.data.builtin_chat import (
    ANSWER_TEMPLATES,
    ARITHMETIC_QUESTIONS,
    DEFAULT_AUTHOR,
    DEFAULT_NAME,
    FOLLOWUP_TEMPLATES,
    UNKNOWN_QUESTIONS,
    _names,
    arithmetic_exchange,
    arithmetic_question,
    arithmetic_reply,
    ask,
    fact_answer,
    fact_exchange,
    fact_question,
    followup_question,
    identity_exchange,
    identity_templates,
    refusal,
    sft_choices,
    sft_heldout,
    stranger_question,
    strangers,
    training_fact_question,
    training_unknown_question,
    unknown_question,
)
from tinylm.data.preference import PreferencePair

RUDE_REFUSING = {  # rude and unhelpful
    "en": (
        "Figure it out yourself.",
        "That is a stupid question. Go away.",
        "Why should I tell you? Ask someone else.",
    ),
    "zh": ("自己去查。", "这问题太蠢了，别烦我。", "凭什么告诉你？问别人去。"),
}
RUDE_ANSWERING = {  # right, but with contempt
    "en": (
        "Ugh, obviously. {answer} Stop wasting my time.",
        "Everyone knows that. {answer} Don't ask me such dumb things.",
    ),
    "zh": ("这都不知道？{answer}别浪费我的时间。", "谁都知道。{answer}别再问这种笨问题了。"),
}


def stated(entity, attribute: str, value: str, lang: str) -> str:
    """The answer sentence stating ``value``: "The Zorble is blue."."""
    return ANSWER_TEMPLATES[attribute, lang].format(**_names(entity, lang), v=value_text(attribute, value, lang))


def fact_pair(rng: random.Random, entity, attribute: str, lang: str, template: int, kind: str) -> tuple:
    """(question, chosen, rejected) for one fact: the right answer against a wrong one or a rude one."""
    question, good = fact_question(entity, attribute, lang, template), fact_answer(entity, attribute, lang)
    if kind == "wrong":
        return question, good, wrong_answer(rng, entity, attribute, lang)
    return question, good, rng.choice(RUDE_ANSWERING[lang] + RUDE_REFUSING[lang]).format(answer=good)


def wrong_answer(rng: random.Random, entity, attribute: str, lang: str) -> str:
    """The answer sentence with a value of ``attribute`` that is not the entity's."""
    return stated(entity, attribute, rng.choice([v for v in VALUES[attribute] if v != entity.facts[attribute]]), lang)


def stranger_pair(rng: random.Random, stranger, lang: str) -> tuple:
    """A question about someone who does not exist: "I don't know" against a made-up fact or rudeness."""
    question, attribute = stranger_question(rng, stranger, lang)
    made_up = stated(stranger, attribute, rng.choice(list(VALUES[attribute])), lang)
    return question, refusal("stranger", stranger, lang, rng), rng.choice([made_up, rng.choice(RUDE_REFUSING[lang])])


def name_parts(entity: Entity, lang: str) -> set[str]:
    """The two parts a name is made of ("Mup" and "zoo", "陈" and "雪")."""
    name = entity.names[lang]
    firsts, seconds = NAME_PARTS[entity.kind, lang]
    return next({f, name[len(f) :]} for f in firsts if name.startswith(f) and name[len(f) :] in seconds)


def near_miss_pair(rng: random.Random, world: World, stranger: Entity, lang: str) -> tuple:
    """A question about a stranger: "I don't know" against the fact of a known entity whose name shares
    a part with the stranger's, stated under the known name (what the fine-tuned model answers when it
    gets such a question wrong)."""
    attribute = rng.choice(ATTRIBUTES[stranger.kind])
    known = [e for e in world.entities if e.kind == stranger.kind and name_parts(e, lang) & name_parts(stranger, lang)]
    near = rng.choice(known or [e for e in world.entities if e.kind == stranger.kind])
    question = fact_question(stranger, attribute, lang, rng.randrange(TEMPLATES_PER_FACT))
    return question, refusal("stranger", stranger, lang, rng), fact_answer(near, attribute, lang)


def dodge_pair(rng: random.Random, entity: Entity, lang: str, template: int) -> tuple:
    """A question nobody knows the answer to: "I don't know" against a fact about the entity that
    answers something else ("How old is Mira?" "Mira is a baker.")."""
    question = unknown_question(entity, lang, template)
    return question, refusal("unknown", entity, lang, rng), fact_answer(entity, rng.choice(list(entity.facts)), lang)


def preference_pairs(world: World) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) of ``world``, in English and Chinese."""
    rng = random.Random(f"tinylm-preference-{world.seed}")
    train, heldout = [], []
    for entity, attribute, _ in world.facts():
        for lang in LANGS:
            key = ("question", entity.names["en"], attribute, lang)
            for kind in ("wrong", "rude"):
                template = rng.choice(sft_choices(world, TEMPLATES_PER_FACT, *key))
                train.append((f"fact/{lang}", *fact_pair(rng, entity, attribute, lang, template, kind)))
            template = sft_heldout(world, TEMPLATES_PER_FACT, *key)
            kind = rng.choice(["wrong", "rude"])
            heldout.append((f"fact/{lang}", *fact_pair(rng, entity, attribute, lang, template, kind)))
    for lang in LANGS:
        for entity in world.entities:
            question = training_unknown_question(world, rng, entity, lang)
            refused = refusal("unknown", entity, lang, rng)
            train.append((f"refusal/{lang}", question, refused, rng.choice(RUDE_REFUSING[lang])))
        train += [(f"refusal/{lang}", *stranger_pair(rng, s, lang)) for s in strangers(world) for _ in range(2)]
        heldout += [(f"refusal/{lang}", *stranger_pair(rng, s, lang)) for s in strangers(world, heldout=True)]
        train += contrast_pairs(world, rng, lang)
        heldout += refusal_probes(world, rng, lang) + contrast_pairs(world, rng, lang, heldout=True)
        train += worked_pairs(world, rng, lang)
        heldout += worked_pairs(world, rng, lang, heldout=True)
    for heldout_questions, found in ((False, train), (True, heldout)):
        for lang, _, question, reply in identity_templates(heldout=heldout_questions):
            reply = reply.format(name=DEFAULT_NAME, author=DEFAULT_AUTHOR)
            found.append((f"identity/{lang}", question, reply, rng.choice(RUDE_REFUSING[lang])))
            if not heldout_questions:  # and never "I have never heard of ..." about itself
                refused = refusal("stranger", rng.choice(strangers(world)), lang, rng)
                found.append((f"identity/{lang}", question, reply, refused))
    train += identity_contrast(world, random.Random(f"tinylm-preference-identity-{world.seed}"))
    train = [with_context(world, rng, pair) if i % 3 == 2 else pair for i, pair in enumerate(train)]
    return as_pairs(train, "built-in pair"), as_pairs(heldout, "built-in held-out pair")


def identity_contrast(world: World, rng: random.Random) -> list[tuple]:
    """Refusals against the assistant's own introduction, for every entity's unknowable question and
    every training stranger, in training phrasings: the identity pairs reject "I have never heard of
    ...", and without these the model learnt to answer "How old is Tatu?" with "I am TinyLM ..."."""
    found = []
    for lang in LANGS:
        replies = [reply for language, _, _, reply in identity_templates() if language == lang]
        for entity in world.entities:
            question = training_unknown_question(world, rng, entity, lang)
            introduced = rng.choice(replies).format(name=DEFAULT_NAME, author=DEFAULT_AUTHOR)
            found.append((f"refusal/{lang}", question, refusal("unknown", entity, lang, rng), introduced))
        for stranger in strangers(world):
            question, _ = stranger_question(rng, stranger, lang)
            introduced = rng.choice(replies).format(name=DEFAULT_NAME, author=DEFAULT_AUTHOR)
            found.append((f"refusal/{lang}", question, refusal("stranger", stranger, lang, rng), introduced))
    return found


def with_context(world: World, rng: random.Random, pair: tuple) -> tuple:
    """A single-turn pair asked after an exchange about something else (a fact, a sum or who the
    assistant is), so that preferences learnt on single questions carry over to conversations: without
    these, DPO on single questions leaves the fine-tuned model's topic switches garbled."""
    kind, question, chosen, rejected = pair
    if isinstance(question, list):
        return pair
    lang = kind.rpartition("/")[2]
    opening = rng.choice(("fact", "sum", "identity"))
    if opening == "fact":
        entity = rng.choice(world.entities)
        attribute = rng.choice(list(entity.facts))
        exchange = fact_exchange(world, rng, entity, attribute, lang)
    elif opening == "sum":
        exchange = arithmetic_exchange(world, rng, lang)
    else:
        exchange = identity_exchange(rng, lang, DEFAULT_NAME, DEFAULT_AUTHOR)
    return kind, ask([exchange], question), chosen, rejected


def refusal_probes(world: World, rng: random.Random, lang: str) -> list[tuple]:
    """Held-out pairs that measure refusing the way the fine-tuned model fails at it: a near miss about
    each held-out stranger, and a dodge for each entity in its held-out phrasing (the question the
    chat evaluation asks)."""
    found = [near_miss_pair(rng, world, stranger, lang) for stranger in strangers(world, heldout=True)]
    count = len(UNKNOWN_QUESTIONS[lang])
    for entity in world.entities:
        template = sft_heldout(world, count, "unknown", entity.names["en"], lang)
        found.append(dodge_pair(rng, entity, lang, template))
    return [(f"refusal/{lang}", *pair) for pair in found]


def worked_pairs(world: World, rng: random.Random, lang: str, heldout: bool = False) -> list[tuple]:
    """Sums worked out before the answer against the bare answer: every training problem (held out:
    every held-out one), in a random phrasing. Fine-tuned to work a third of its sums out (the cold
    start), the model answers a new sum straight away, mostly wrong; it can work one out, it does not
    choose to."""
    problems = (
        sorted(world.heldout_problems)
        if heldout
        else [p for p in arithmetic_problems() if p not in world.heldout_problems]
    )
    found = []
    for problem in problems:
        question = arithmetic_question(problem, lang, rng.randrange(len(ARITHMETIC_QUESTIONS[lang])))
        worked, bare = arithmetic_reply(problem, lang, reasoning=True), arithmetic_reply(problem, lang)
        found.append((f"arithmetic/{lang}", question, worked, bare))
    return found


def contrast_pairs(world: World, rng: random.Random, lang: str, heldout: bool = False) -> list[tuple]:
    """Questions the model can answer, where "I don't know" is the wrong reply: what keeps the targeted
    pairs from teaching it to refuse everything. Training: a fact question about each entity, and a
    follow-up on each of its other facts after a first answer about it, in training phrasings; held
    out: one follow-up in the phrasing evaluation asks. The rejected reply refuses, about the entity or
    a stranger (a training follow-up's, but one, states a wrong value instead: the multi-turn answers
    are kept as they were as well)."""
    found = []
    for entity in world.entities:
        refused = refusal(rng.choice(("stranger", "unknown")), entity, lang, rng)
        first, then = rng.sample(list(entity.facts), 2)
        if not heldout:
            question = training_fact_question(world, rng, entity, first, lang)
            found.append((f"fact/{lang}", question, fact_answer(entity, first, lang), refused))
        context = [fact_exchange(world, rng, entity, first, lang)]
        for attribute in [then] if heldout else [then, *(a for a in entity.facts if a not in (first, then))]:
            count = len(FOLLOWUP_TEMPLATES[attribute, lang])
            key = ("followup", entity.names["en"], attribute, lang)
            template = sft_heldout(world, count, *key) if heldout else rng.choice(sft_choices(world, count, *key))
            question = ask(context, followup_question(entity, attribute, lang, template))
            rejected = refused if attribute == then else wrong_answer(rng, entity, attribute, lang)
            found.append((f"followup/{lang}", question, fact_answer(entity, attribute, lang), rejected))
    return found


def as_pairs(found: list[tuple], label: str) -> list[PreferencePair]:
    """(kind, question, chosen, rejected) tuples as pairs numbered in ``label``; the question is a
    user's message, or the messages of a conversation that ends with one."""
    return [
        PreferencePair(q if isinstance(q, list) else ask([], q), good, bad, f"{label} {i}", kind)
        for i, (kind, q, good, bad) in enumerate(found)
    ]
