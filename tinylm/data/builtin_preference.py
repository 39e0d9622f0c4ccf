"""The built-in preference pairs for DPO: questions of every kind the chat model was fine-tuned on,
each with a preferred answer (correct and polite) and a dispreferred one (wrong, made up, or rude).

    train, heldout = preference_pairs(World(0))

    facts       "What colour is the Zorble?"  "The Zorble is red."  vs  "The Zorble is blue." / a rude reply
    refusals    asked about someone who does not exist, or something nobody knows:
                "I don't know ..."  vs  a confidently made-up fact / a rude brush-off
    identity    "Who are you?"  "My name is TinyLM ..."  vs  a rude brush-off

Training pairs ask in the phrasings fine-tuning used; held-out pairs ask every fact in the phrasing
fine-tuning never used, about the strangers only evaluation knows, and the held-out identity
questions. So "held-out preference accuracy" is measured on questions the model was not aligned on,
and pairs of every kind keep DPO from pushing down answers it has no pairs for.
"""

from __future__ import annotations

import random

from tinylm.data.builtin import ATTRIBUTES, LANGS, TEMPLATES_PER_FACT, VALUES, World, value_text
from tinylm.data.builtin_chat import (
    ANSWER_TEMPLATES,
    DEFAULT_AUTHOR,
    DEFAULT_NAME,
    UNKNOWN_QUESTIONS,
    _names,
    fact_answer,
    fact_question,
    identity_templates,
    refusal,
    sft_choices,
    sft_heldout,
    strangers,
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
        return (
            question,
            good,
            stated(entity, attribute, rng.choice([v for v in VALUES[attribute] if v != entity.facts[attribute]]), lang),
        )
    return question, good, rng.choice(RUDE_ANSWERING[lang] + RUDE_REFUSING[lang]).format(answer=good)


def stranger_pair(rng: random.Random, stranger, lang: str) -> tuple:
    """A question about someone who does not exist: "I don't know" against a made-up fact or rudeness."""
    attribute = rng.choice(ATTRIBUTES[stranger.kind])
    question = fact_question(stranger, attribute, lang, rng.randrange(TEMPLATES_PER_FACT))
    made_up = stated(stranger, attribute, rng.choice(list(VALUES[attribute])), lang)
    return question, refusal("stranger", stranger, lang, rng), rng.choice([made_up, rng.choice(RUDE_REFUSING[lang])])


def preference_pairs(world: World) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) of ``world``, in English and Chinese."""
    rng = random.Random(f"tinylm-preference-{world.seed}")
    train, heldout = [], []
    for entity, attribute, _ in world.facts():
        for lang in LANGS:
            key = ("question", entity.names["en"], attribute, lang)
            for kind in ("wrong", "rude"):
                train.append(
                    fact_pair(
                        rng, entity, attribute, lang, rng.choice(sft_choices(world, TEMPLATES_PER_FACT, *key)), kind
                    )
                )
            heldout.append(
                fact_pair(
                    rng,
                    entity,
                    attribute,
                    lang,
                    sft_heldout(world, TEMPLATES_PER_FACT, *key),
                    rng.choice(["wrong", "rude"]),
                )
            )
    for lang in LANGS:
        for entity in world.entities:
            count = len(UNKNOWN_QUESTIONS[lang])
            question = unknown_question(
                entity, lang, rng.choice(sft_choices(world, count, "unknown", entity.names["en"], lang))
            )
            train.append((question, refusal("unknown", entity, lang, rng), rng.choice(RUDE_REFUSING[lang])))
        train += [stranger_pair(rng, s, lang) for s in strangers(world) for _ in range(2)]
        heldout += [stranger_pair(rng, s, lang) for s in strangers(world, heldout=True)]
    for heldout_questions, found in ((False, train), (True, heldout)):
        for lang, _, question, reply in identity_templates(heldout=heldout_questions):
            found.append(
                (question, reply.format(name=DEFAULT_NAME, author=DEFAULT_AUTHOR), rng.choice(RUDE_REFUSING[lang]))
            )
    return as_pairs(train, "built-in pair"), as_pairs(heldout, "built-in held-out pair")


def as_pairs(triples: list[tuple], label: str) -> list[PreferencePair]:
    return [
        PreferencePair([{"role": "user", "content": q}], good, bad, f"{label} {i}")
        for i, (q, good, bad) in enumerate(triples)
    ]
