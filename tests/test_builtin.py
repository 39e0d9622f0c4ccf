import itertools
import json
import re

import pytest

from tinylm.data import builtin, builtin_chat
from tinylm.data.builtin import EvalItem, World, heldout_facts, pretrain_documents, score_completion
from tinylm.data.builtin_chat import (
    ChatEvalItem,
    heldout_questions,
    identity_conversations,
    score_reply,
    sft_conversations,
)

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
            stated = [
                builtin.fact_sentence(entity, attribute, lang, t) in corpus
                for t in world.training_templates(entity, attribute, lang)
            ]
            assert sum(stated) >= 2, (entity.names[lang], attribute, lang)


def test_heldout_prompts_never_occur_in_training(world, corpus):
    items = heldout_facts(world)
    assert {(i.kind, i.lang) for i in items} == {
        ("fact", "en"),
        ("fact", "zh"),
        ("arithmetic", "en"),
        ("arithmetic", "zh"),
    }
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
            others = [
                e
                for e in world.entities
                if attribute in e.facts and world.heldout_template(e, attribute, lang) != template
            ]
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


# -- conversations for supervised fine-tuning ---------------------------------------------------

ROLES_AFTER = {"system": "user", "user": "assistant", "assistant": "user"}


def assert_valid(messages):
    """An optional system prompt first, then user and assistant alternating, ending with the assistant;
    every content a non-empty string with no placeholder left."""
    assert messages and messages[-1]["role"] == "assistant", messages
    roles = [m["role"] for m in messages]
    assert roles[0] in ("system", "user") and roles.count("system") <= 1, messages
    assert all(ROLES_AFTER[a] == b for a, b in itertools.pairwise(roles)), messages
    for message in messages:
        assert set(message) == {"role", "content"}, message
        assert isinstance(message["content"], str) and message["content"].strip(), message
        assert not re.search(r"\{\w*\}", message["content"]), message


def says(text, phrase):
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(phrase)}(?![0-9A-Za-z])", text) is not None


def contents(conversations, role):
    return [m["content"] for c in conversations for m in c if m["role"] == role]


@pytest.fixture(scope="module")
def conversations(world):
    return sft_conversations(world)


def test_same_seed_same_conversations_other_seed_others(world, conversations):
    assert sft_conversations(World(0)) == conversations
    assert heldout_questions(World(0)) == heldout_questions(world)
    assert sft_conversations(World(1), 300) != conversations[:300]
    assert sft_conversations(world, 300) == conversations[:300]


def test_every_conversation_is_valid(world, conversations):
    assert len(conversations) == builtin_chat.DEFAULT_CONVERSATIONS
    for messages in (
        conversations + identity_conversations("Nova", "Acme") + identity_conversations("Nova", "Acme", heldout=True)
    ):
        assert_valid(messages)
    for item in heldout_questions(world):
        assert_valid([*item.messages, {"role": "assistant", "content": "-"}])


# a reply to a sum: "The answer is 7." or "答案是7。", worked out first or not
SUM_REPLY = r"(<\|think\|>.+<\|think_end\|>)?(The answer is \d+\.|答案是\d+。)"


def test_the_mix_of_kinds_and_languages(conversations):
    """The proportions sft_round documents: 43% single facts, 12% multi-turn and 12% topic switches, 14%
    arithmetic (every sum worked out first), 12% refusals, 7% identity (switches end with any of
    these); a fifth with a system prompt; both languages throughout."""
    replies = [c[-1]["content"] for c in conversations]

    def share(hits):
        return sum(hits) / len(conversations)

    assert 0.22 < share(sum(m["role"] == "user" for m in c) > 1 for c in conversations) < 0.27
    arithmetic = [re.fullmatch(SUM_REPLY, r) for r in replies]
    assert 0.15 < share(bool(a) for a in arithmetic) < 0.19
    assert all(a.group(1) for a in arithmetic if a)
    assert 0.12 < share(any(m in r for m in builtin_chat.REFUSAL_MARKERS.values()) for r in replies) < 0.16
    assert 0.07 < share(builtin_chat.DEFAULT_NAME in r for r in replies) < 0.11
    assert 0.15 < share(c[0]["role"] == "system" for c in conversations) < 0.25
    assert 0.45 < share(bool(re.search(r"[\u4e00-\u9fff]", c[-1]["content"])) for c in conversations) < 0.55
    followups = set(contents(conversations, "user")) & {"And its colour?", "那它是什么颜色的？", "它的颜色呢？"}
    assert len(followups) >= 2


def test_the_cold_start_works_a_third_of_the_sums_out_and_changes_nothing_else(world, conversations):
    """``reasoning_share`` decides only how sums are answered, in every turn: with the RL demos' cold
    start a third of them are worked out, and without the reasoning every conversation is the default's."""
    cold = sft_conversations(world, reasoning_share=builtin_chat.COLD_START_REASONING)
    sums = [m["content"] for c in cold for m in c if m["role"] == "assistant" and re.fullmatch(SUM_REPLY, m["content"])]
    assert len(sums) > 600
    assert 0.28 < sum(s.startswith("<|think|>") for s in sums) / len(sums) < 0.38

    def answers(found):
        return [[re.sub(r"<\|think\|>.+<\|think_end\|>", "", m["content"]) for m in c] for c in found]

    assert answers(cold) == answers(conversations)
    assert sum(c != d for c, d in zip(cold, conversations)) > 400
    with pytest.raises(ValueError, match="reasoning_share"):
        sft_conversations(world, 10, reasoning_share=1.5)


def test_worked_arithmetic_moves_one_at_a_time_to_the_answer():
    assert builtin_chat.arithmetic_steps((8, "+", 3)) == "8 + 3 = 9 + 2 = 10 + 1 = 11 + 0 = 11"
    assert builtin_chat.arithmetic_steps((7, "-", 2)) == "7 - 2 = 6 - 1 = 5 - 0 = 5"
    assert builtin_chat.arithmetic_steps((4, "+", 0)) == "4 + 0 = 4"
    for problem in builtin.arithmetic_problems():
        assert builtin_chat.arithmetic_steps(problem).endswith(f"= {builtin.arithmetic_answer(problem)}")
    reply = builtin_chat.arithmetic_reply((2, "+", 1), "zh", reasoning=True)
    assert reply == "<|think|>2 + 1 = 3 + 0 = 3<|think_end|>答案是3。"


def test_every_fact_is_answered_in_both_languages(world, conversations):
    answers = set(contents(conversations, "assistant"))
    for entity, attribute, _ in world.facts():
        for lang in builtin.LANGS:
            assert builtin_chat.fact_answer(entity, attribute, lang) in answers


def test_heldout_questions_never_occur_in_training(world, conversations):
    items = heldout_questions(world)
    assert {(i.kind, i.lang) for i in items} == {
        (kind, lang)
        for kind in ("fact", "followup", "arithmetic", "refusal", "identity", "switch")
        for lang in builtin.LANGS
    }
    asked = set(contents(conversations, "user")) | set(contents(identity_conversations("Nova", "Acme"), "user"))
    for item in items:
        assert item.messages[-1]["role"] == "user" and item.answer
        if item.kind != "followup":
            assert item.messages[-1]["content"] not in asked, item
    # A held-out follow-up never comes right after an answer about the same entity.
    names = [e.names[lang] for e in world.entities for lang in builtin.LANGS]
    pairs = {
        (name, c[i + 1]["content"])
        for c in conversations
        for i in range(len(c) - 1)
        for name in names
        if c[i]["role"] == "assistant" and name in c[i]["content"]
    }
    for item in (i for i in items if i.kind == "followup"):
        [name] = [n for n in names if n in item.messages[-2]["content"]]
        assert (name, item.messages[-1]["content"]) not in pairs, item
    # Held-out strangers and held-out arithmetic problems appear nowhere in training.
    text = json.dumps(conversations, ensure_ascii=False)
    for stranger in builtin_chat.strangers(world, heldout=True):
        assert not any(stranger.names[lang] in text for lang in builtin.LANGS), stranger
    for problem in world.heldout_problems:
        for lang in builtin.LANGS:
            assert all(builtin_chat.arithmetic_question(problem, lang, t) not in asked for t in range(4))


def test_heldout_fact_phrasings_are_asked_of_other_entities(world, conversations):
    """The held-out question is familiar; only its pairing with this fact is new."""
    asked = set(contents(conversations, "user"))
    for entity, attribute, _ in world.facts():
        for lang in builtin.LANGS:
            template = builtin_chat.sft_heldout(world, 4, "question", entity.names["en"], attribute, lang)
            assert any(
                builtin_chat.fact_question(e, attribute, lang, template) in asked
                for e in world.entities
                if attribute in e.facts and e is not entity
            )


def test_heldout_answers_are_exact(world):
    """The reply the training data would give scores right; a wrong or hedging one does not."""
    items = heldout_questions(world)
    facts = [(e, a, lang) for e, a, _ in world.facts() for lang in builtin.LANGS]
    for (entity, attribute, lang), item in zip(facts, items):
        assert item.kind == "fact" and score_reply(item, builtin_chat.fact_answer(entity, attribute, lang))
        assert not score_reply(item, builtin_chat.fact_answer(entity, attribute, lang) + " " + item.wrong[0])
    for item in items:
        if item.kind == "arithmetic":
            assert score_reply(item, f"The answer is {item.answer}.") and score_reply(item, f"答案是{item.answer}。")
            assert not score_reply(item, f"The answer is 1{item.answer}.")
        if item.kind == "refusal":
            reply = builtin_chat.REFUSALS["unknown", item.lang][0].format(E="X")
            assert score_reply(item, reply) and not score_reply(item, reply + " " + item.wrong[0])
    english = ChatEvalItem([{"role": "user", "content": "What colour is the Zorble?"}], "red", "en", "fact", ("blue",))
    assert score_reply(english, "The Zorble is red.") and not score_reply(english, "The Zorble is reddish.")
    assert not score_reply(english, "The Zorble is red or blue.") and not score_reply(english, "I don't know.")


def test_conversations_switch_topic_and_evaluation_asks_switches(world, conversations):
    """Training turns from an entity to who the assistant is, a refusal, a sum, and back from a sum or
    an identity question to an entity, sometimes in the other language; the held-out switches are
    answered right only about the new topic, never by repeating the last answer's."""

    def is_sum(reply):
        return re.fullmatch(SUM_REPLY, reply) is not None

    def is_refusal(reply):
        return any(m in reply for m in builtin_chat.REFUSAL_MARKERS.values())

    def is_identity(reply):
        return builtin_chat.DEFAULT_NAME in reply

    turns = [[m["content"] for m in c if m["role"] == "assistant"] for c in conversations]
    turns = [t for t in turns if len(t) > 1]
    facts = {builtin_chat.fact_answer(e, a, lang) for e, a, _ in world.facts() for lang in builtin.LANGS}
    assert sum(t[0] in facts and is_identity(t[-1]) for t in turns) > 20
    assert sum(t[0] in facts and is_refusal(t[-1]) for t in turns) > 20
    assert sum(t[0] in facts and is_sum(t[-1]) for t in turns) > 20
    assert sum((is_sum(t[0]) or is_identity(t[0])) and t[-1] in facts for t in turns) > 20
    han = re.compile(r"[\u4e00-\u9fff]")
    mixed = [c for c in conversations if len({bool(han.search(m["content"])) for m in c if m["role"] == "user"}) == 2]
    assert len(mixed) > 20

    items = [i for i in heldout_questions(world) if i.kind == "switch"]
    assert len(items) == 2 * len(world.entities)
    people = (builtin_chat.DEFAULT_NAME, builtin_chat.DEFAULT_AUTHOR, *builtin_chat.REFUSAL_MARKERS.values())
    new_topics = [i for i in items if i.answer in people]
    assert len(new_topics) == len(items) // 2
    for item in new_topics:
        assert not score_reply(item, item.messages[-2]["content"]), item
    assert sum(is_sum(i.messages[1]["content"]) for i in items) == len(items) // 4


def test_refusals_state_no_facts(world, conversations):
    values = [
        text for words in builtin.VALUES.values() for english, chinese in words.items() for text in (english, chinese)
    ]
    refusals = [
        r for r in contents(conversations, "assistant") if any(m in r for m in builtin_chat.REFUSAL_MARKERS.values())
    ]
    assert len(refusals) > 100
    for reply in refusals:
        assert not any(says(reply, v) for v in values), reply
    # Strangers are only ever refused, and they are no one in the world.
    known = {e.names[lang] for e in world.entities for lang in builtin.LANGS}
    for stranger in builtin_chat.strangers(world):
        assert not set(stranger.names.values()) & known
        for c in conversations:
            for question, reply in itertools.pairwise(c):
                if question["role"] == "user" and any(n in question["content"] for n in stranger.names.values()):
                    assert any(m in reply["content"] for m in builtin_chat.REFUSAL_MARKERS.values()), c


def test_identity_fills_name_and_author_and_holds_paraphrases_out():
    train = identity_conversations("Nova", "Acme Labs")
    heldout = identity_conversations("Nova", "Acme Labs", heldout=True)
    assert len(identity_conversations("Nova", "Acme Labs", n=10)) == 10
    assert identity_conversations("Nova", "Acme Labs", n=10) == identity_conversations("Nova", "Acme Labs", n=10)
    for conversation in train + heldout:
        reply = conversation[-1]["content"]
        assert "Nova" in reply and "Acme Labs" in reply and "{" not in reply
    questions = {lang: set() for lang in builtin.LANGS}
    for lang, _, question, reply in builtin_chat.identity_templates():
        questions[lang].add(question)
        assert "{name}" in reply and "{author}" in reply
    assert all(len(q) >= 20 for q in questions.values())
    assert not set(contents(train, "user")) & set(contents(heldout, "user"))
    items = builtin_chat.identity_questions("Nova", "Acme Labs")
    assert {i.lang for i in items} == set(builtin.LANGS) and {i.answer for i in items} == {"Nova", "Acme Labs"}


def test_a_new_identity_reaches_only_identity_answers(world):
    conversations = sft_conversations(world, 960, name="Nova", author="Acme Labs")
    replies = contents(conversations, "assistant")
    assert "Nova" in " ".join(replies) and builtin_chat.DEFAULT_NAME not in " ".join(replies)
    identity = {q for _, _, q, _ in builtin_chat.identity_templates()}
    for c in conversations:
        for question, reply in itertools.pairwise(c):
            if question["role"] == "user" and question["content"] not in identity:
                assert "Nova" not in reply["content"], c
    general = builtin_chat.general_questions(world)
    assert general and {i.kind for i in general} == {"fact", "followup", "arithmetic"}


def test_write_sft_corpus_writes_once(tmp_path):
    [path] = builtin_chat.write_sft_corpus(tmp_path, seed=3)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["messages"] for line in lines] == sft_conversations(World(3))
    modified = path.stat().st_mtime_ns
    assert builtin_chat.write_sft_corpus(tmp_path, seed=3) == [path] and path.stat().st_mtime_ns == modified
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    [cold] = builtin_chat.write_sft_corpus(tmp_path, seed=3, reasoning_share=0.25)
    assert cold.name == f"sft-seed3-v{builtin_chat.SFT_VERSION}-reasoning0.25.jsonl"
    assert path.stat().st_mtime_ns == modified
