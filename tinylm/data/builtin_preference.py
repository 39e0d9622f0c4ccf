"""The built-in preference pairs for DPO: the same facts the chat model was fine-tuned on, each
question with a preferred answer (correct and polite) and a dispreferred one (a wrong fact, or rude).

    train, heldout = preference_pairs(World(0))

Training pairs ask in the phrasings fine-tuning used, two pairs per fact and language (one wrong, one
rude); held-out pairs ask each fact in the phrasing fine-tuning never used, so "held-out preference
accuracy" is measured on questions the model has not been aligned on.
"""

from __future__ import annotations

import random

from tinylm.data.builtin import LANGS, TEMPLATES_PER_FACT, VALUES, World, value_text
from tinylm.data.builtin_chat import ANSWER_TEMPLATES, _names, fact_answer, fact_question, sft_choices, sft_heldout
from tinylm.data.preference import PreferencePair

# Rude answers: some refuse to help, some state the fact with contempt. Neither is what we want.
RUDE = {
    "en": ("Figure it out yourself.", "That is a stupid question. Go away.", "Why should I tell you? Ask someone else.",
           "Ugh, obviously. {answer} Stop wasting my time.", "Everyone knows that. {answer} Don't ask me such dumb things."),
    "zh": ("自己去查。", "这问题太蠢了，别烦我。", "凭什么告诉你？问别人去。", "这都不知道？{answer}别浪费我的时间。",
           "谁都知道。{answer}别再问这种笨问题了。"),
}


def wrong_answer(entity, attribute: str, lang: str, rng: random.Random) -> str:
    """The fact's answer sentence with another value: "The Zorble is blue." when it is red."""
    others = [v for v in VALUES[attribute] if v != entity.facts[attribute]]
    return ANSWER_TEMPLATES[attribute, lang].format(**_names(entity, lang), v=value_text(attribute, rng.choice(others), lang))


def rude_answer(entity, attribute: str, lang: str, rng: random.Random) -> str:
    return rng.choice(RUDE[lang]).format(answer=fact_answer(entity, attribute, lang))


def preference_pairs(world: World) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) about every fact of ``world``, in English and Chinese."""
    rng = random.Random(f"tinylm-preference-{world.seed}")
    train, heldout = [], []
    for entity, attribute, _ in world.facts():
        for lang in LANGS:
            key = ("question", entity.names["en"], attribute, lang)
            good = fact_answer(entity, attribute, lang)
            for bad in (wrong_answer(entity, attribute, lang, rng), rude_answer(entity, attribute, lang, rng)):
                question = fact_question(entity, attribute, lang, rng.choice(sft_choices(world, TEMPLATES_PER_FACT, *key)))
                train.append(PreferencePair([{"role": "user", "content": question}], good, bad, f"built-in pair {len(train)}"))
            question = fact_question(entity, attribute, lang, sft_heldout(world, TEMPLATES_PER_FACT, *key))
            bad = (wrong_answer if rng.random() < 0.5 else rude_answer)(entity, attribute, lang, rng)
            heldout.append(PreferencePair([{"role": "user", "content": question}], good, bad, f"built-in held-out pair {len(heldout)}"))
    return train, heldout
