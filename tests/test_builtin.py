import json
import re

import pytest

from tinylm.data import builtin
from tinylm.data.builtin import EvalItem, World, heldout_facts, pretrain_documents, score_completion

N_DOCS = 1400  # ten rounds: every fact appears in every round


@pytest.fixture(scope="module")
def world() -> World:
    return World(0)


@pytest.fixture(scope="module")
def corpus(world) -> str:
    return "\n".join(pretrain_documents(world, N_DOCS))


def test_same_seed_same_text_other_seed_other_world(world):
    assert pretrain_documents(World(0), 300) == pretrain_documents(world, 300)
    assert heldout_facts(World(0)) == heldout_facts(world)
    other = World(1)
    assert [e.names for e in other.entities] != [e.names for e in world.entities]
    assert pretrain_documents(other, 300) != pretrain_documents(world, 300)


def test_the_world_is_small_and_bilingual(world):
    assert len(world.creatures) == builtin.N_CREATURES and len(world.people) == builtin.N_PEOPLE
    for entity in world.entities:
        assert set(entity.names) == {"en", "zh"}
        assert set(entity.facts) == set(builtin.ATTRIBUTES[entity.kind])
        for attribute, value in entity.facts.items():
            assert value in builtin.VALUES[attribute]
    names = [e.names[lang] for e in world.entities for lang in builtin.LANGS]
    assert not any(a != b and a in b for a in names for b in names), "no name may hide inside another"


def test_documents_cover_both_languages_and_every_kind(corpus):
    assert re.search(r"[\u4e00-\u9fff]", corpus) and "Once upon a time" in corpus and "从前" in corpus
    assert re.search(r"^\d \+ \d = \d+$", corpus, re.M) and re.search(r"^\d加\d等于\d+$", corpus, re.M)


def test_default_corpus_is_about_one_and_a_half_megabytes(world):
    documents = pretrain_documents(world)
    assert len(documents) == builtin.DEFAULT_DOCUMENTS
    assert 1.0e6 < sum(len(d.encode("utf-8")) for d in documents) < 2.0e6


def test_every_fact_is_stated_in_training_in_both_languages(world, corpus):
    for entity, attribute, _ in world.facts():
        for lang in builtin.LANGS:
            stated = [builtin.fact_sentence(entity, attribute, lang, t) in corpus
                      for t in world.training_templates(entity, attribute, lang)]
            assert sum(stated) >= 2, (entity.names[lang], attribute, lang)


def test_heldout_prompts_never_occur_in_training(world, corpus):
    items = heldout_facts(world)
    assert {(i.kind, i.lang) for i in items} == {("fact", "en"), ("fact", "zh"), ("arithmetic", "en"), ("arithmetic", "zh")}
    for item in items:
        if item.kind == "fact":
            assert item.prompt not in corpus, item
        else:
            assert not re.search(rf"^{re.escape(item.prompt)}", corpus, re.M), item


def test_heldout_templates_are_used_for_other_entities(world, corpus):
    """The held-out phrasing is familiar; only its pairing with this fact is new."""
    for entity, attribute, _ in world.facts():
        for lang in builtin.LANGS:
            template = world.heldout_template(entity, attribute, lang)
            others = [e for e in world.entities
                      if attribute in e.facts and world.heldout_template(e, attribute, lang) != template]
            assert any(builtin.fact_sentence(e, attribute, lang, template) in corpus for e in others)


def test_heldout_prompts_end_right_before_their_answer(world):
    for item in heldout_facts(world):
        assert item.prompt == item.prompt.rstrip() and item.answer
        if item.kind == "arithmetic":
            a, b = map(int, re.findall(r"\d", item.prompt))
            assert int(item.answer) == (a + b if ("+" in item.prompt or "加" in item.prompt) else a - b)


def test_score_completion():
    english = EvalItem("The colour of the Zorble is", "red", "en", "fact")
    assert score_completion(english, " red.")
    assert score_completion(english, "red")
    assert score_completion(english, "\n red and blue")
    assert not score_completion(english, " reddish")
    assert not score_completion(english, " blue")
    number = EvalItem("9 + 9 =", "18", "en", "arithmetic")
    assert score_completion(number, " 18\n3 + 4 = 7")
    assert not score_completion(number, " 180") and not score_completion(number, " 1")
    chinese = EvalItem("咕噜兽的颜色是", "红色", "zh", "fact")
    assert score_completion(chinese, "红色。") and score_completion(chinese, "红色的")
    assert not score_completion(chinese, "蓝色")


def test_write_pretrain_corpus_writes_once(tmp_path):
    [path] = builtin.write_pretrain_corpus(tmp_path, seed=3)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == pretrain_documents(World(3))
    modified = path.stat().st_mtime_ns
    assert builtin.write_pretrain_corpus(tmp_path, seed=3) == [path] and path.stat().st_mtime_ns == modified
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind
