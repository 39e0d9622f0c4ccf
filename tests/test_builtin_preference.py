"""The built-in preference pairs: every kind, held out honestly, and the targeted pairs reject what the
fine-tuned model gets wrong; DPO's report by kind."""

import json
from collections import Counter

import pytest
import torch

from tinylm.data import builtin, builtin_chat
from tinylm.data.builtin import World
from tinylm.data.builtin_preference import name_parts, preference_pairs
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


def test_pairs_aim_at_sums_keep_what_is_known_and_probe_refusals(world, pairs):
    train, heldout = pairs
    known = {e.names[lang]: e for e in world.entities for lang in builtin.LANGS}
    facts = {builtin_chat.fact_answer(e, a, lang) for e, a, _ in world.facts() for lang in builtin.LANGS}
    for lang in builtin.LANGS:
        marker = builtin_chat.REFUSAL_MARKERS[lang]
        # sums: worked out first, against the bare answer with the same number
        sums = [p for p in train + heldout if p.kind == f"arithmetic/{lang}"]
        assert len(sums) == len(builtin.arithmetic_problems())
        for pair in sums:
            assert pair.chosen.startswith(THINK) and THINK not in pair.rejected
            assert pair.chosen.endswith(pair.rejected)
        # what the model knows, asked, must not be refused
        refused = [p for p in train if p.kind in (f"fact/{lang}", f"followup/{lang}") and marker in p.rejected]
        assert len(refused) >= 2 * len(world.entities) and all(p.chosen in facts for p in refused)
        # held-out refusals are rejected as the chat model gets them wrong: a near miss about each held-out
        # stranger (a known one's fact, whose name shares a part with the stranger's), a dodge for each entity
        probes = [p for p in heldout if p.kind == f"refusal/{lang}" and p.rejected in facts]
        assert all(marker in p.chosen for p in probes)
        near = [p for p in probes if not any(n in asked(p) for n in known)]
        assert len(near) == len(builtin_chat.strangers(world, heldout=True))
        for pair in near:
            [name] = [n for n in known if n in pair.rejected and known[n].names[lang] == n]
            [stranger] = [s for s in builtin_chat.strangers(world, heldout=True) if s.names[lang] in asked(pair)]
            alike = [
                e
                for e in world.entities
                if e.kind == stranger.kind and name_parts(e, lang) & name_parts(stranger, lang)
            ]
            assert known[name] in alike or not alike, pair
        assert len(probes) - len(near) == len(world.entities)
    # a third of the single-question training pairs are asked after an exchange about something else
    single = [p for p in train if not p.kind.startswith("followup")]
    assert 0.3 < sum(len(p.prompt) == 3 for p in single) / len(single) < 0.36


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
