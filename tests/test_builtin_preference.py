"""The built-in preference pairs: every kind, held out honestly, and the targeted pairs reject what the
fine-tuned model gets wrong; DPO's report by kind."""

import json
from collections import Counter

import pytest
import torch

from tinylm.data import builtin, builtin_chat
from tinylm.data.builtin import World
from tinylm.data.builtin_preference import name_parts, preference_pairs, preference_strangers
from tinylm.tokenizer import THINK
from tinylm.train.dpo import card_evaluation, describe, preferred_by_kind
from tinylm.train.pairs import EncodedPair


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def pairs(world):
    return preference_pairs(world)


def asked(pair) -> str:
    return pair.prompt[-1]["content"]


def test_every_kind_in_both_languages_and_the_same_for_the_same_world(world, pairs):
    train, heldout = pairs
    kinds = {f"{k}/{lang}" for k in ("fact", "followup", "refusal", "identity", "arithmetic") for lang in builtin.LANGS}
    assert set(Counter(p.kind for p in train)) == set(Counter(p.kind for p in heldout)) == kinds
    assert preference_pairs(World(0)) == pairs
    for pair in train + heldout:
        assert pair.chosen != pair.rejected and pair.prompt[-1]["role"] == "user"


def test_heldout_pairs_ask_what_training_pairs_never_ask(world, pairs):
    train, heldout = pairs
    trained = {json.dumps(p.prompt, ensure_ascii=False) for p in train}
    assert not [p for p in heldout if json.dumps(p.prompt, ensure_ascii=False) in trained]
    # the held-out sums and strangers are only in held-out pairs
    text = json.dumps([[p.prompt, p.chosen, p.rejected] for p in train], ensure_ascii=False)
    for stranger in builtin_chat.strangers(world, heldout=True):
        assert not any(stranger.names[lang] in text for lang in builtin.LANGS)
    sums = [p for p in heldout if p.kind.startswith("arithmetic")]
    assert len(sums) == 2 * len(world.heldout_problems)
    questions = {
        builtin_chat.arithmetic_question(q, lang, t)
        for q in world.heldout_problems
        for lang in "en zh".split()
        for t in range(4)
    }
    assert not [p for p in train if asked(p) in questions]


def test_preference_strangers_are_new_names(world):
    found = preference_strangers(world)
    others = world.entities + builtin_chat.strangers(world) + builtin_chat.strangers(world, heldout=True)
    for lang in builtin.LANGS:
        taken = {e.names[lang] for e in others}
        names = [e.names[lang] for e in found]
        assert len(set(names)) == len(names) and not set(names) & taken
        assert all(len(name_parts(e, lang)) == 2 for e in found)


def test_targeted_pairs_reject_the_answers_the_chat_model_gives(world, pairs):
    train, heldout = pairs
    known = {e.names[lang]: e for e in world.entities for lang in builtin.LANGS}
    facts = {builtin_chat.fact_answer(e, a, lang) for e, a, _ in world.facts() for lang in builtin.LANGS}
    for lang in builtin.LANGS:
        marker = builtin_chat.REFUSAL_MARKERS[lang]
        refusals = [p for p in train + heldout if p.kind == f"refusal/{lang}"]
        assert all(marker in p.chosen for p in refusals)
        # near misses: a question about a stranger, rejected with the fact of a known one whose name shares a part
        near = [p for p in refusals if p.rejected in facts and not any(n in asked(p) for n in known)]
        assert len(near) > 40
        for pair in near:
            [name] = [n for n in known if n in pair.rejected and known[n].names[lang] == n]
            stranger = next(
                s
                for s in preference_strangers(world)
                + builtin_chat.strangers(world)
                + builtin_chat.strangers(world, heldout=True)
                if s.names[lang] in asked(pair)
            )
            alike = [
                e
                for e in world.entities
                if e.kind == stranger.kind and name_parts(e, lang) & name_parts(stranger, lang)
            ]
            assert known[name] in alike or not alike, pair
        # dodges: something nobody knows about someone known, rejected with a fact about them that answers another
        # question
        dodges = [p for p in refusals if p.rejected in facts and any(n in asked(p) for n in known)]
        assert len(dodges) >= 2 * len(world.entities)
        # and the contrast: what the model does know, asked, must not be refused
        refused = [p for p in train if p.kind in (f"fact/{lang}", f"followup/{lang}") and marker in p.rejected]
        assert len(refused) >= 2 * len(world.entities)
        assert all(p.chosen in facts for p in refused)
        # sums: worked out first, against the bare answer with the same number
        for pair in (p for p in train + heldout if p.kind == f"arithmetic/{lang}"):
            assert pair.chosen.startswith(THINK) and THINK not in pair.rejected
            assert pair.chosen.endswith(pair.rejected)


def test_the_chosen_answers_are_right_by_the_chat_evaluation(world, pairs):
    """Each held-out pair whose question the chat evaluation also asks chooses what it scores right; a
    rejected refusal answer is scored wrong (a rude right answer or a bare sum are right, but rejected)."""
    _, heldout = pairs
    items = {json.dumps(i.messages, ensure_ascii=False): i for i in builtin_chat.heldout_questions(world)}
    matched = [
        (items[json.dumps(p.prompt, ensure_ascii=False)], p)
        for p in heldout
        if json.dumps(p.prompt, ensure_ascii=False) in items
    ]
    assert len(matched) > 300
    for item, pair in matched:
        assert builtin_chat.score_reply(item, pair.chosen), pair
        if item.kind == "refusal":
            assert not builtin_chat.score_reply(item, pair.rejected), pair


def test_dpo_reports_preference_by_kind_and_on_the_pairs_it_got_wrong():
    pairs = [EncodedPair(None, None, f"p{i}", kind) for i, kind in enumerate(["a", "a", "b", "b", ""])]
    before = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    after = torch.tensor([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    found = preferred_by_kind(pairs, before, after)
    assert found["all"] == {"pairs": 5, "before": 0.4, "after": 0.8}
    assert found["wrong before"] == {"pairs": 3, "before": 0.0, "after": 2 / 3}
    assert found["a"] == {"pairs": 2, "before": 0.5, "after": 1.0}
    assert found["b"] == {"pairs": 2, "before": 0.0, "after": 0.5}
    qa = {"accuracy": 0.5, "correct": 1, "total": 2, "by_kind": {"refusal/zh": 0.5}}
    report = {
        "before": {"val_prefers_chosen": 0.4},
        "after": {"val_prefers_chosen": 0.8, "val_accuracy": 0.8, "val_margin": 1.0},
        "pairs": found,
        "heldout_qa": {"before": qa, "after": {**qa, "accuracy": 1.0, "by_kind": {"refusal/zh": 1.0}}},
    }
    text = describe(report)
    assert "wrong before: 0.0% → 66.7% of 3" in text and "refusal/zh: 50.0% → 100.0%" in text
    card = card_evaluation(report, 5)
    assert card["held-out pairs, b"] == {"prefers chosen": 0.5, "prefers chosen before": 0.0, "items": 2}
    assert card["held-out questions: refusal/zh"] == {"accuracy": 1.0, "accuracy before": 0.5}
