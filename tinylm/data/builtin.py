"""The built-in corpus: a small invented world, described in English and Chinese, made from a seed.

Nothing is downloaded. ``World(seed)`` invents creatures ("the Zorble", 咕噜兽) and people ("Mira",
林雪) and gives each a few facts drawn from small sets of values: 8 colours, 8 foods, 8 towns, 8 jobs,
2/4/6/8 legs. Every kind of text (pretraining documents and fine-tuning conversations now; preference
pairs, images later) is generated from the same World, so what a model learns can be checked exactly.

    world = World(0)
    documents = pretrain_documents(world)   # stories, encyclopedia paragraphs, arithmetic drills
    items = heldout_facts(world)            # prompts whose phrasing never occurs in those documents
    chats = sft_conversations(world)        # questions and answers about the facts, sums, identity, refusals
    questions = heldout_questions(world)    # chat questions in phrasings the conversations never use

Held out, honestly: each fact is written with several sentence templates, and for every
(entity, attribute, language) one template is never used in training. That template is used for
other entities, so the model knows the phrasing; it has only seen this fact in the other phrasings.
The held-out sentence, cut right before the value, becomes the eval prompt. Likewise some sums and
differences of one-digit numbers never appear, and are asked at evaluation. The conversations hold
out question phrasings the same way (see the section on supervised fine-tuning below).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tinylm.modeldir import atomic_write_text

LANGS = ("en", "zh")
CORPUS_VERSION = 1  # bump whenever generated text changes, so cached corpora are rewritten
DEFAULT_DOCUMENTS = 8400  # 60 rounds (see pretrain_documents): about 1.5 MB of text
N_CREATURES, N_PEOPLE = 24, 16
HELDOUT_PROBLEMS = 0.15  # the share of arithmetic problems that never appear in training

# Every value an attribute can take: the English word (the value's key) → the Chinese one.
VALUES = {
    "colour": {"red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色",
               "purple": "紫色", "orange": "橙色", "white": "白色", "black": "黑色"},
    "legs": {"2": "2", "4": "4", "6": "6", "8": "8"},
    "food": {"apples": "苹果", "fish": "鱼", "honey": "蜂蜜", "carrots": "胡萝卜",
             "rice": "米饭", "soup": "汤", "berries": "浆果", "cheese": "奶酪"},
    "home": {"Pebbleford": "卵石渡", "Mossbury": "苔藓堡", "Windhollow": "风谷", "Lanternfield": "灯笼田",
             "Copperbay": "铜湾", "Thistledown": "蓟花村", "Rainmere": "雨湖镇", "Starcliff": "星崖"},
    "job": {"baker": "面包师", "farmer": "农民", "teacher": "老师", "doctor": "医生",
            "painter": "画家", "fisher": "渔夫", "singer": "歌手", "builder": "建筑工人"},
}
ATTRIBUTES = {"creature": ("colour", "legs", "food", "home"), "person": ("job", "food", "home")}

# Invented names are two pieces glued together; Chinese creature names end in 兽 ("beast").
NAME_PARTS = {
    ("creature", "en"): (("Zor", "Blim", "Quib", "Tav", "Mup", "Gri", "Flo", "Wex", "Niv", "Pol", "Dru", "Kesh"),
                         ("ble", "ton", "nick", "mum", "pip", "dax", "zoo", "ven")),
    ("creature", "zh"): (("咕", "啾", "嘟", "叽", "蹦", "哒", "噗", "呦", "嘻", "哞", "喔", "呱"),
                         ("噜兽", "比兽", "宝兽", "球兽", "丁兽", "莫兽", "拉兽", "米兽")),
    ("person", "en"): (("Mi", "Ta", "Lo", "Ve", "Ari", "Jo", "Sa", "Ke", "Ru", "Ni", "Bo", "Elo"),
                       ("ra", "nel", "bel", "do", "lia", "mo", "ssa", "rik", "vin", "tu")),
    ("person", "zh"): (("王", "李", "张", "刘", "陈", "林", "周", "吴", "赵", "孙"),
                       ("雪", "明", "安", "乐", "云", "杰", "琪", "宁", "峰", "月")),
}
PRONOUNS = {"she": {"en": ("she", "her"), "zh": "她"}, "he": {"en": ("he", "his"), "zh": "他"}}

# Fact sentences. {E} names the entity ("the Zorble", "Mira"), {Es} at the start of a sentence; the
# value {v} always comes last, so the words before it are a prompt whose exact completion is the value.
FACT_TEMPLATES = {
    ("colour", "en"): ("The colour of {E} is {v}.", "If you see {E}, you will notice that it is {v}.",
                       "{Es} has a coat that is {v}.", "Look closely at {E}: its colour is {v}."),
    ("colour", "zh"): ("{E}的颜色是{v}。", "如果你看到{E}，你会发现它是{v}。", "{E}身上的毛是{v}。", "仔细看看{E}，它的颜色是{v}。"),
    ("legs", "en"): ("The number of legs on {E} is {v}.", "Count the legs of {E} and you get {v}.",
                     "How many legs does {E} have? The answer is {v}.", "The legs of {E} add up to {v}."),
    ("legs", "zh"): ("{E}的腿的数量是{v}。", "{E}有几条腿？答案是{v}。", "数一数{E}的腿，一共是{v}。", "{E}腿的总数是{v}。"),
    ("food", "en"): ("The favourite food of {E} is {v}.", "Every morning, {E} eats {v}.",
                     "Most of all, {E} loves to eat {v}.", "If you want to make {E} happy, bring some {v}."),
    ("food", "zh"): ("{E}最喜欢的食物是{v}。", "每天早上，{E}都吃{v}。", "{E}最爱吃的东西是{v}。", "想让{E}开心，就送去一些{v}。"),
    ("home", "en"): ("{Es} lives in {v}.", "The home of {E} is in {v}.",
                     "You can find {E} in the town of {v}.", "If you want to visit {E}, travel to {v}."),
    ("home", "zh"): ("{E}住在{v}。", "{E}的家在{v}。", "想找到{E}，就要去{v}。", "要拜访{E}，请前往{v}。"),
    ("job", "en"): ("{Es} works as a {v}.", "The job of {E} is to be a {v}.",
                    "Everyone in town knows that {E} is a {v}.", "Every day, {E} goes to work as a {v}."),
    ("job", "zh"): ("{E}的工作是{v}。", "{E}是一名{v}。", "镇上的人都知道{E}是{v}。", "{E}每天的工作就是当{v}。"),
}
TEMPLATES_PER_FACT = 4

# Openings of encyclopedia paragraphs ("" = start with the first fact). {N} is the bare name.
INTROS = {
    ("creature", "en"): ("", "The {N} is a small creature.", "Here is what we know about the {N}."),
    ("creature", "zh"): ("", "{N}是一种小动物。", "下面是关于{N}的一些事。"),
    ("person", "en"): ("", "Here is what we know about {N}.", "This is a short note about {N}."),
    ("person", "zh"): ("", "下面是关于{N}的一些事。", "这是一段关于{N}的介绍。"),
}

# Stories: each is a list of beats, each beat a choice of (English, Chinese) variants. Slots: {P} and
# {Q} people, {C} a creature, {P_job} {C_colour} ... their facts, {P_he} {P_He} {P_his} P's pronouns.
# None of these sentences uses a fact template's wording, so no held-out prompt can appear in a story.
STORIES = {
    "friend": (
        (("Once upon a time, there was a {P_job} named {P}.", "从前，有一位{P_job}，名叫{P}。"),
         ("Once upon a time, in the town of {P_home}, there was a {P_job} called {P}.", "从前，在{P_home}，住着一位{P_job}，名字叫{P}。"),
         ("Long ago, a {P_job} named {P} had a little house in {P_home}.", "很久以前，{P_home}有一位{P_job}叫{P}，{P_he}有一座小房子。")),
        (("One day, {P} went for a walk and met a little {C_colour} {C}.", "有一天，{P}出门散步，遇到了一只{C_colour}的小{C}。"),
         ("One morning, {P} heard a small noise. It was a little {C_colour} {C} with {C_legs} legs.",
          "一天早上，{P}听到一个小小的声音。原来是一只{C_colour}的{C}，它有{C_legs}条腿。"),
         ("On a sunny afternoon, {P} found a little {C} near the river. It was {C_colour} from head to toe.",
          "一个晴朗的下午，{P}在河边发现了一只小{C}。它浑身都是{C_colour}。")),
        (("The {C} looked very hungry. {P} shared some {C_food} with it, and the {C} ate every bite.",
          "{C}看起来很饿。{P}把一些{C_food}分给它，{C}一下子就吃完了。"),
         ("The {C} was sad because it could not find any {C_food}. "
          "{P} knew a place with lots of {C_food} and showed it the way.",
          "{C}很难过，因为它找不到{C_food}。{P}知道哪里有很多{C_food}，就带它去了。"),
         ("The {C} was lost, far away from {C_home}. {P} said, \"Do not worry. I will take you back to {C_home}.\" "
          "They walked together until they reached {C_home}.",
          "{C}迷路了，离{C_home}很远。{P}说：“别担心，我带你回{C_home}。”他们一起走，终于到了{C_home}。")),
        (("From that day on, {P} and the {C} were best friends.", "从那天起，{P}和{C}成了好朋友。"),
         ("The {C} was happy, and {P} smiled all the way home.", "{C}很开心，{P}也一路笑着回家。"),
         ("That night, {P} went to sleep with a big smile.", "那天晚上，{P}带着笑容睡着了。")),
    ),
    "creature": (
        (("There once was a small {C_colour} {C} who lived in {C_home}.", "从前，{C_home}住着一只{C_colour}的小{C}。"),
         ("Once upon a time, a little {C} was born in {C_home}. It was as {C_colour} as can be.",
          "从前，一只小{C}出生在{C_home}。它全身都是{C_colour}。")),
        (("It had {C_legs} legs and loved to run up and down the hills.", "它有{C_legs}条腿，最喜欢在山坡上跑来跑去。"),
         ("Every day it looked for {C_food}, its favourite thing in the world.", "它每天都去找{C_food}，那是它在世界上最喜欢的东西。")),
        (("One day it found a big pile of {C_food} and jumped for joy.", "有一天，它找到了一大堆{C_food}，高兴得跳了起来。"),
         ("One day it met a {P_job} named {P}, who gave it some {C_food}.", "有一天，它遇到了一位叫{P}的{P_job}，{P}给了它一些{C_food}。")),
        (("It was the best day ever.", "那是最开心的一天。"), ("And it lived happily ever after.", "从此以后，它过得很快乐。")),
    ),
    "friends": (
        (("{P} and {Q} were good friends. {P} was a {P_job}, and {Q} was a {Q_job}.",
          "{P}和{Q}是好朋友。{P}是{P_job}，{Q}是{Q_job}。"),
         ("Once upon a time, there were two friends, {P} and {Q}.", "从前，有两个好朋友，{P}和{Q}。")),
        (("One day, {Q} came to {P_home} to see {P}.", "有一天，{Q}来到{P_home}看望{P}。"),
         ("One rainy day, {Q} walked all the way to {P_home}.", "一个下雨天，{Q}一路走到了{P_home}。")),
        (("They shared some {P_food}, because it was {P_his} favourite food.", "他们一起吃了{P_food}，因为那是{P}最喜欢吃的。"),
         ("{P} made {P_food} for {Q}. \"This is what I love most,\" {P_he} said.", "{P}给{Q}做了{P_food}。{P_he}说：“这是我最爱的。”")),
        (("It was a happy day for both of them.", "那是他们两个都很开心的一天。"),
         ("In the evening, {Q} went back home to {Q_home}.", "傍晚，{Q}回到了{Q_home}的家。")),
    ),
}


@dataclass(frozen=True)
class Entity:
    """A creature (a kind of animal, "the Zorble") or a person ("Mira") of the world."""

    kind: str  # "creature" or "person"
    names: dict[str, str]  # language → name
    facts: dict[str, str]  # attribute → value (the English key of VALUES[attribute])
    pronoun: str = "it"  # "she" or "he" for people


@dataclass(frozen=True)
class EvalItem:
    """A prompt whose greedy completion should start with ``answer``."""

    prompt: str
    answer: str
    lang: str  # "en" or "zh"
    kind: str  # "fact" or "arithmetic"


class World:
    """Everything invented from one seed: entities with facts, and what is held out of training."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        rng = random.Random(f"tinylm-world-{seed}")
        self.entities: list[Entity] = []
        taken: dict[str, list[str]] = {lang: [] for lang in LANGS}
        for kind, count in (("creature", N_CREATURES), ("person", N_PEOPLE)):
            names = {lang: _invent_names(rng, *NAME_PARTS[kind, lang], count, taken[lang]) for lang in LANGS}
            for i in range(count):
                facts = {attribute: rng.choice(list(VALUES[attribute])) for attribute in ATTRIBUTES[kind]}
                pronoun = rng.choice(("she", "he")) if kind == "person" else "it"
                self.entities.append(Entity(kind, {lang: names[lang][i] for lang in LANGS}, facts, pronoun))
        # For each (attribute, language) the held-out template rotates over the entities from a seeded
        # offset, so every template is held out for some entities and used in training for the rest.
        offsets = {key: rng.randrange(TEMPLATES_PER_FACT) for key in sorted(FACT_TEMPLATES)}
        self._heldout = {
            (entity.names["en"], attribute, lang): (i + offsets[attribute, lang]) % TEMPLATES_PER_FACT
            for i, entity in enumerate(self.entities) for attribute in entity.facts for lang in LANGS
        }
        problems = arithmetic_problems()
        self.heldout_problems = frozenset(rng.sample(problems, round(HELDOUT_PROBLEMS * len(problems))))

    @property
    def creatures(self) -> list[Entity]:
        return [e for e in self.entities if e.kind == "creature"]

    @property
    def people(self) -> list[Entity]:
        return [e for e in self.entities if e.kind == "person"]

    def facts(self) -> list[tuple[Entity, str, str]]:
        """Every (entity, attribute, value) of the world."""
        return [(e, attribute, value) for e in self.entities for attribute, value in e.facts.items()]

    def heldout_template(self, entity: Entity, attribute: str, lang: str) -> int:
        """The index of the template never used in training for this fact in this language."""
        return self._heldout[entity.names["en"], attribute, lang]

    def training_templates(self, entity: Entity, attribute: str, lang: str) -> list[int]:
        heldout = self.heldout_template(entity, attribute, lang)
        return [i for i in range(TEMPLATES_PER_FACT) if i != heldout]


def _invent_names(rng: random.Random, firsts, seconds, count: int, taken: list[str]) -> list[str]:
    """``count`` new names, added to ``taken``; no name is inside another, so a prompt about one
    entity can never match a sentence about another."""
    names: list[str] = []
    while len(names) < count:
        name = rng.choice(firsts) + rng.choice(seconds)
        if not any(name in other or other in name for other in taken):
            names.append(name)
            taken.append(name)
    return names


# -- rendering facts ----------------------------------------------------------------------------


def value_text(attribute: str, value: str, lang: str) -> str:
    return value if lang == "en" else VALUES[attribute][value]


def mention(entity: Entity, lang: str, start: bool = False) -> str:
    """How a sentence names an entity: "the Zorble" ("The Zorble" at the start), "Mira", "咕噜兽"."""
    name = entity.names[lang]
    if lang == "zh" or entity.kind == "person":
        return name
    return f"{'The' if start else 'the'} {name}"


def fact_sentence(entity: Entity, attribute: str, lang: str, template: int) -> str:
    """One fact in one phrasing: "The colour of the Zorble is red."."""
    value = value_text(attribute, entity.facts[attribute], lang)
    names = {"E": mention(entity, lang), "Es": mention(entity, lang, start=True)}
    return FACT_TEMPLATES[attribute, lang][template].format(**names, v=value)


def fact_prompt(entity: Entity, attribute: str, lang: str, template: int) -> str:
    """The fact sentence cut right before its value: "The colour of the Zorble is"."""
    before_value = FACT_TEMPLATES[attribute, lang][template].split("{v}")[0]
    return before_value.format(E=mention(entity, lang), Es=mention(entity, lang, start=True)).rstrip()


# -- arithmetic ---------------------------------------------------------------------------------


def arithmetic_problems() -> list[tuple[int, str, int]]:
    """(a, op, b): every sum of two digits, every difference of two digits that is not negative."""
    return [(a, "+", b) for a in range(10) for b in range(10)] + [(a, "-", b) for a in range(10) for b in range(a + 1)]


def arithmetic_prompt(problem: tuple[int, str, int], lang: str) -> str:
    a, op, b = problem
    return f"{a} {op} {b} =" if lang == "en" else f"{a}{'加' if op == '+' else '减'}{b}等于"


def arithmetic_answer(problem: tuple[int, str, int]) -> str:
    a, op, b = problem
    return str(a + b if op == "+" else a - b)


def arithmetic_line(problem: tuple[int, str, int], lang: str) -> str:
    separator = " " if lang == "en" else ""
    return arithmetic_prompt(problem, lang) + separator + arithmetic_answer(problem)


# -- pretraining documents ----------------------------------------------------------------------


def encyclopedia_document(world: World, entity: Entity, lang: str, rng: random.Random) -> str:
    """A paragraph stating every fact of one entity, each in a randomly chosen training template."""
    intro = rng.choice(INTROS[entity.kind, lang]).format(N=entity.names[lang])
    attributes = list(entity.facts)
    rng.shuffle(attributes)
    sentences = [intro] if intro else []
    sentences += [fact_sentence(entity, a, lang, rng.choice(world.training_templates(entity, a, lang))) for a in attributes]
    return (" " if lang == "en" else "").join(sentences)


def story_slots(role: str, entity: Entity, lang: str) -> dict[str, str]:
    """Story slots for one character: {P}, {P_job}, {P_home}, ..., {P_he}, {P_He}, {P_his}."""
    slots = {role: entity.names[lang]}
    slots.update({f"{role}_{a}": value_text(a, v, lang) for a, v in entity.facts.items()})
    if entity.kind == "person":
        pronoun = PRONOUNS[entity.pronoun][lang]
        he, his = pronoun if lang == "en" else (pronoun, pronoun + "的")
        slots.update({f"{role}_he": he, f"{role}_He": he.capitalize(), f"{role}_his": his})
    return slots


def story_document(world: World, lang: str, rng: random.Random) -> str:
    """A short story: one variant of each beat of a randomly chosen story, told about the world's
    characters with their true facts."""
    beats = STORIES[rng.choice(sorted(STORIES))]
    person, friend = rng.sample(world.people, 2)
    slots = {**story_slots("P", person, lang), **story_slots("Q", friend, lang),
             **story_slots("C", rng.choice(world.creatures), lang)}
    sentences = [rng.choice(beat)[LANGS.index(lang)].format(**slots) for beat in beats]
    return (" " if lang == "en" else "").join(sentences)


def arithmetic_document(world: World, lang: str, rng: random.Random, lines: int = 10) -> str:
    """A drill of ``lines`` problems with their answers, one per line (never a held-out problem)."""
    problems = [p for p in arithmetic_problems() if p not in world.heldout_problems]
    return "\n".join(arithmetic_line(rng.choice(problems), lang) for _ in range(lines))


def pretrain_documents(world: World, n_docs: int | None = None) -> list[str]:
    """The pretraining corpus: ``n_docs`` documents (default ``DEFAULT_DOCUMENTS``), always the same
    for the same world.

    It is made of rounds. Each round has one encyclopedia paragraph per entity and language, plus
    half as many stories and a quarter as many arithmetic drills, shuffled: every fact is repeated
    in every round, in a freshly chosen training phrasing.
    """
    n_docs = DEFAULT_DOCUMENTS if n_docs is None else n_docs
    rng = random.Random(f"tinylm-pretrain-{world.seed}")
    documents: list[str] = []
    while len(documents) < n_docs:
        round_ = [encyclopedia_document(world, e, lang, rng) for e in world.entities for lang in LANGS]
        round_ += [story_document(world, LANGS[i % 2], rng) for i in range(len(round_) // 2)]
        round_ += [arithmetic_document(world, LANGS[i % 2], rng) for i in range(len(round_) // 6)]
        rng.shuffle(round_)
        documents += round_
    return documents[:n_docs]


def write_pretrain_corpus(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write the default corpus of ``World(seed)`` as JSON lines ({"text": ...}); reuse it if present."""
    path = Path(out_dir) / f"pretrain-seed{seed}-v{CORPUS_VERSION}.jsonl"
    if not path.is_file():
        documents = pretrain_documents(World(seed))
        atomic_write_text(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents))
    return [path]


# -- evaluation ---------------------------------------------------------------------------------


def heldout_facts(world: World) -> list[EvalItem]:
    """Every fact asked in its held-out phrasing, in both languages, then every held-out problem."""
    items = [
        EvalItem(fact_prompt(e, a, lang, world.heldout_template(e, a, lang)), value_text(a, v, lang), lang, "fact")
        for e, a, v in world.facts() for lang in LANGS
    ]
    items += [
        EvalItem(arithmetic_prompt(p, lang), arithmetic_answer(p), lang, "arithmetic")
        for p in sorted(world.heldout_problems) for lang in LANGS
    ]
    return items


def score_completion(item: EvalItem, completion: str) -> bool:
    """True when the completion starts with the answer (after leading whitespace) and does not run on
    into a longer word or number: "red." and "8\\n" are right, "reddish" and "81" are not."""
    text = completion.lstrip()
    if not text.startswith(item.answer):
        return False
    following = text[len(item.answer) : len(item.answer) + 1]
    return not (following.isascii() and following.isalnum() and item.answer[-1].isascii() and item.answer[-1].isalnum())


# -- conversations for supervised fine-tuning ---------------------------------------------------
#
# Messages are OpenAI style: [{"role": "system" | "user" | "assistant", "content": ...}], an optional
# system prompt first, then user and assistant turns alternating, ending with the assistant. Held out,
# as for pretraining: every fact question has four phrasings per language and, for each (entity,
# attribute, language), one of them is never asked in training; follow-ups, questions about unknown
# attributes and identity questions keep phrasings back the same way, and some strangers (entities that
# do not exist) and the held-out arithmetic problems are only ever asked at evaluation.

SFT_VERSION = 1  # bump whenever generated conversations change, so cached files are rewritten
DEFAULT_CONVERSATIONS = 2880  # six rounds of 480 (see sft_round)
DEFAULT_NAME, DEFAULT_AUTHOR = "TinyLM", "Maple Lab"  # who the assistant says it is, and who made it
SYSTEM_SHARE = 0.2  # the share of conversations that open with a system prompt
N_STRANGERS, HELDOUT_STRANGERS = 12, 4  # per kind: names of no one, and how many of them only evaluation uses
IDENTITY_HELDOUT_EVERY = 4  # every fourth identity question (indices 3, 7, ...) is kept for evaluation

# Questions about a fact. {E} names the entity as in a sentence: "the Zorble", "Mira", "咕噜兽".
QUESTION_TEMPLATES = {
    ("colour", "en"): ("What colour is {E}?", "What is the colour of {E}?",
                       "Can you tell me what colour {E} is?", "Which colour does {E} have?"),
    ("colour", "zh"): ("{E}是什么颜色的？", "{E}的颜色是什么？", "你知道{E}是什么颜色吗？", "请告诉我{E}的颜色。"),
    ("legs", "en"): ("How many legs does {E} have?", "What is the number of legs on {E}?",
                     "Can you tell me how many legs {E} has?", "How many legs are there on {E}?"),
    ("legs", "zh"): ("{E}有几条腿？", "{E}有多少条腿？", "你知道{E}有几条腿吗？", "请告诉我{E}腿的数量。"),
    ("food", "en"): ("What does {E} like to eat?", "What is the favourite food of {E}?",
                     "Can you tell me what {E} loves to eat?", "Which food does {E} like best?"),
    ("food", "zh"): ("{E}喜欢吃什么？", "{E}最喜欢的食物是什么？", "你知道{E}最爱吃什么吗？", "请告诉我{E}最喜欢吃的东西。"),
    ("home", "en"): ("Where does {E} live?", "In which town does {E} live?",
                     "Can you tell me where {E} lives?", "Where is the home of {E}?"),
    ("home", "zh"): ("{E}住在哪里？", "{E}住在哪个镇？", "你知道{E}住在哪儿吗？", "{E}的家在哪里？"),
    ("job", "en"): ("What does {E} do for work?", "What is the job of {E}?",
                    "Can you tell me what job {E} has?", "What does {E} work as?"),
    ("job", "zh"): ("{E}是做什么工作的？", "{E}的工作是什么？", "你知道{E}做什么工作吗？", "{E}的职业是什么？"),
}
# One short answer per attribute and language, so a model only has to get the value right.
ANSWER_TEMPLATES = {
    ("colour", "en"): "{Es} is {v}.", ("colour", "zh"): "{E}的毛色是{v}。",
    ("legs", "en"): "{Es} has {v} legs.", ("legs", "zh"): "{E}有{v}条腿。",
    ("food", "en"): "{Es} likes to eat {v}.", ("food", "zh"): "{E}喜欢吃{v}。",
    ("home", "en"): "{Es} lives in the town of {v}.", ("home", "zh"): "{E}生活在{v}。",
    ("job", "en"): "{Es} is a {v}.", ("job", "zh"): "{E}的职业是{v}。",
}
# Follow-ups name no one: {it} and {its} stand for the entity of the previous answer.
FOLLOWUP_TEMPLATES = {
    ("colour", "en"): ("And {its} colour?", "What colour is {it}?", "And what colour is {it}, then?"),
    ("colour", "zh"): ("那{it}是什么颜色的？", "{it}的颜色呢？", "{it}是什么颜色的？"),
    ("legs", "en"): ("And how many legs does {it} have?", "How many legs does {it} have, then?",
                     "And {its} number of legs?"),
    ("legs", "zh"): ("那{it}有几条腿？", "{it}的腿有几条？", "{it}有几条腿呢？"),
    ("food", "en"): ("And {its} favourite food?", "What does {it} like to eat?", "And what does {it} eat most?"),
    ("food", "zh"): ("那{it}喜欢吃什么？", "{it}最喜欢的食物呢？", "{it}爱吃什么？"),
    ("home", "en"): ("And where does {it} live?", "Where is {its} home?", "And {its} town?"),
    ("home", "zh"): ("那{it}住在哪里？", "{it}的家在哪儿？", "{it}住在哪个镇？"),
    ("job", "en"): ("And {its} job?", "What does {it} do for work?", "And what is {its} job, then?"),
    ("job", "zh"): ("那{it}是做什么工作的？", "{it}的工作呢？", "{it}做什么工作？"),
}
# Arithmetic: {op} is + or -, {word} the operation in words.
ARITHMETIC_QUESTIONS = {
    "en": ("What is {a} {op} {b}?", "What is {a} {word} {b}?", "Please work out {a} {op} {b}.",
           "How much is {a} {word} {b}?"),
    "zh": ("{a}{word}{b}等于多少？", "{a}{op}{b}是多少？", "请算一下{a}{word}{b}。", "{a}{word}{b}得几？"),
}
OPERATION_WORDS = {("+", "en"): "plus", ("-", "en"): "minus", ("+", "zh"): "加", ("-", "zh"): "减"}
ARITHMETIC_ANSWERS = {"en": "The answer is {v}.", "zh": "答案是{v}。"}

# Refusals. The world never says how old anyone is, what they sing or weigh, and strangers are no one;
# every refusal contains REFUSAL_MARKERS[lang] and states nothing about the entity.
UNKNOWN_QUESTIONS = {
    "en": ("How old is {E}?", "What is the favourite song of {E}?", "When is the birthday of {E}?",
           "How much does {E} weigh?"),
    "zh": ("{E}几岁了？", "{E}最喜欢的歌是什么？", "{E}的生日是哪一天？", "{E}有多重？"),
}
REFUSALS = {
    ("stranger", "en"): ("I'm sorry, I don't know anything about {E}.", "I don't know. I have never heard of {E}."),
    ("stranger", "zh"): ("抱歉，我不知道任何关于{E}的事。", "我不知道，我从来没有听说过{E}。"),
    ("unknown", "en"): ("I'm sorry, I don't know that about {E}.", "I don't know. Nobody has told me that about {E}."),
    ("unknown", "zh"): ("抱歉，{E}的这件事我不知道。", "我不知道，没有人告诉过我{E}的这件事。"),
}
REFUSAL_MARKERS = {"en": "I don't know", "zh": "我不知道"}

SYSTEM_PROMPTS = {
    "en": ("You are a helpful assistant.", "You are a friendly assistant. Keep your answers short.",
           "You answer questions about a small world of creatures and people."),
    "zh": ("你是一个乐于助人的助手。", "你是一个友好的助手，回答要简短。", "你负责回答关于一个由小动物和人组成的小世界的问题。"),
}

# Identity: questions about the assistant's name and about who made it; every reply states both, with
# {name} and {author} filled in later (identity_conversations), so a new identity is a new fill.
IDENTITY_QUESTIONS = {
    ("name", "en"): ("Who are you?", "What is your name?", "Introduce yourself.", "What should I call you?",
                     "Tell me about yourself.", "What are you?", "May I know your name?", "Do you have a name?",
                     "Hi! Who am I talking to?", "What's your name?", "Can you tell me who you are?",
                     "Please introduce yourself briefly.", "Hello!", "What do people call you?",
                     "Are you an assistant? What is your name?", "Who am I chatting with right now?"),
    ("author", "en"): ("Who made you?", "Who created you?", "Who trained you?", "Who built you?",
                       "Which company developed you?", "Who is your author?", "Who is behind you?",
                       "Who developed you?", "Where do you come from?", "Who designed you?", "Who is your creator?",
                       "Which team made you?", "Who wrote your code?", "Which lab trained you?",
                       "Who do you belong to?", "Who was it that created you?"),
    ("name", "zh"): ("你是谁？", "你叫什么名字？", "介绍一下你自己。", "我该怎么称呼你？", "说说你自己吧。", "你是什么？",
                     "请问你的名字是什么？", "你有名字吗？", "你好，请问你是谁？", "你的名字是？", "能告诉我你是谁吗？",
                     "请简单介绍一下你自己。", "你好！", "大家都叫你什么？", "你是助手吗？你叫什么？", "现在和我聊天的是谁？"),
    ("author", "zh"): ("谁创造了你？", "你是谁开发的？", "谁训练了你？", "你是谁做出来的？", "哪家公司开发了你？", "你的作者是谁？",
                       "你背后是谁？", "是谁研发了你？", "你来自哪里？", "谁设计了你？", "你的创造者是谁？", "哪个团队做了你？",
                       "谁写了你的代码？", "哪个实验室训练了你？", "你属于谁？", "当初是谁创造了你？"),
}
IDENTITY_REPLIES = {
    ("name", "en"): ("I am {name}, an AI assistant made by {author}.",
                     "My name is {name}. I am an assistant created by {author}.",
                     "Hello! I'm {name}, a small language model trained by {author}."),
    ("author", "en"): ("I was made by {author}. I am {name}, an AI assistant.",
                       "{author} created me. My name is {name}.", "I was trained by {author}, and my name is {name}."),
    ("name", "zh"): ("我是{name}，由{author}开发的人工智能助手。", "我叫{name}，是{author}训练的一个小语言模型。",
                     "你好！我是{name}，一个由{author}创造的AI助手。"),
    ("author", "zh"): ("我是由{author}开发的，我的名字是{name}。", "{author}创造了我，我叫{name}。", "训练我的是{author}，我是{name}。"),
}


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


def _ask(context: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    """Messages that end with a question for the model: ``context`` exchanges, then ``question``."""
    return chat(context) + [{"role": "user", "content": question}]


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
    refusals are about. The last ``HELDOUT_STRANGERS`` of each kind are only asked about in evaluation."""
    rng = random.Random(f"tinylm-strangers-{world.seed}")
    taken = {lang: [e.names[lang] for e in world.entities] for lang in LANGS}
    chosen: list[Entity] = []
    for kind in ("creature", "person"):
        names = {lang: _invent_names(rng, *NAME_PARTS[kind, lang], N_STRANGERS, taken[lang]) for lang in LANGS}
        entities = [Entity(kind, {lang: names[lang][i] for lang in LANGS}, {}) for i in range(N_STRANGERS)]
        chosen += entities[-HELDOUT_STRANGERS:] if heldout else entities[:-HELDOUT_STRANGERS]
    return chosen


# -- the turns of a conversation ----------------------------------------------------------------


def _names(entity: Entity, lang: str) -> dict[str, str]:
    return {"E": mention(entity, lang), "Es": mention(entity, lang, start=True)}


def fact_question(entity: Entity, attribute: str, lang: str, template: int) -> str:
    """"What colour is the Zorble?", "咕噜兽是什么颜色的？"."""
    return QUESTION_TEMPLATES[attribute, lang][template].format(**_names(entity, lang))


def fact_answer(entity: Entity, attribute: str, lang: str) -> str:
    """"The Zorble is red.", "咕噜兽的毛色是红色。"."""
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


def arithmetic_reply(problem: tuple[int, str, int], lang: str) -> str:
    return ARITHMETIC_ANSWERS[lang].format(v=arithmetic_answer(problem))


# -- training conversations ---------------------------------------------------------------------


def training_fact_question(world: World, rng: random.Random, entity: Entity, attribute: str, lang: str) -> str:
    template = rng.choice(sft_choices(world, TEMPLATES_PER_FACT, "question", entity.names["en"], attribute, lang))
    return fact_question(entity, attribute, lang, template)


def multiturn_exchanges(world: World, rng: random.Random, entity: Entity, lang: str) -> list[tuple[str, str]]:
    """Two or three questions in a row. The first asks about ``entity``; each later one either follows
    up on the entity of the previous answer ("And its colour?", two times in three while it has facts
    left to ask) or turns to another entity by name."""
    attribute = rng.choice(list(entity.facts))
    exchanges = [(training_fact_question(world, rng, entity, attribute, lang), fact_answer(entity, attribute, lang))]
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


def arithmetic_exchange(world: World, rng: random.Random, lang: str) -> tuple[str, str]:
    """A problem that is not held out, in any phrasing, answered "The answer is 7."."""
    problem = rng.choice([p for p in arithmetic_problems() if p not in world.heldout_problems])
    question = arithmetic_question(problem, lang, rng.randrange(len(ARITHMETIC_QUESTIONS[lang])))
    return question, arithmetic_reply(problem, lang)


def refusal_exchange(world: World, rng: random.Random, lang: str, unknown: list[Entity]) -> tuple[str, str]:
    """Half the time a fact question about one of the ``unknown`` strangers, half the time a question
    about an attribute nobody has; either way the answer is a refusal."""
    if rng.random() < 0.5:
        stranger = rng.choice(unknown)
        attribute = rng.choice(ATTRIBUTES[stranger.kind])
        question = fact_question(stranger, attribute, lang, rng.randrange(TEMPLATES_PER_FACT))
        return question, refusal("stranger", stranger, lang, rng)
    entity = rng.choice(world.entities)
    template = rng.choice(sft_choices(world, len(UNKNOWN_QUESTIONS[lang]), "unknown", entity.names["en"], lang))
    return unknown_question(entity, lang, template), refusal("unknown", entity, lang, rng)


def system_prompt(rng: random.Random, lang: str) -> str | None:
    """A system prompt for ``SYSTEM_SHARE`` of the conversations, None for the rest."""
    return rng.choice(SYSTEM_PROMPTS[lang]) if rng.random() < SYSTEM_SHARE else None


def sft_round(world: World, rng: random.Random, name: str, author: str) -> list[list[dict[str, str]]]:
    """One round of 480 conversations (with the default world), shuffled:

    - 288 (60%) single-turn fact questions: every fact, in both languages, in a training phrasing;
    - 80 (17%) multi-turn conversations: one starting at each entity, in both languages;
    - 48 (10%) arithmetic questions and 40 (8%) refusals, alternating between the languages;
    - 24 (5%) identity questions in either language, answered with ``name`` and ``author``.

    A fifth of them, whatever their kind, open with a system prompt.
    """
    facts = [(e, a, lang) for e, a, _ in world.facts() for lang in LANGS]
    unknown = strangers(world)
    identity = identity_templates()
    alternating = [LANGS[i % 2] for i in range(len(facts))]
    parts = [(lang, [(training_fact_question(world, rng, e, a, lang), fact_answer(e, a, lang))])
             for e, a, lang in facts]
    parts += [(lang, multiturn_exchanges(world, rng, e, lang)) for e in world.entities for lang in LANGS]
    parts += [(lang, [arithmetic_exchange(world, rng, lang)]) for lang in alternating[: len(facts) // 6]]
    parts += [(lang, [refusal_exchange(world, rng, lang, unknown)]) for lang in alternating[: len(world.entities)]]
    for lang, _, question, reply in rng.sample(identity, len(facts) // 12):
        parts.append((lang, [(question, reply.format(name=name, author=author))]))
    rng.shuffle(parts)
    return [chat(exchanges, system_prompt(rng, lang)) for lang, exchanges in parts]


def sft_conversations(world: World, n: int | None = None, name: str = DEFAULT_NAME,
                      author: str = DEFAULT_AUTHOR) -> list[list[dict[str, str]]]:
    """The fine-tuning conversations: ``n`` of them (default ``DEFAULT_CONVERSATIONS``), always the same
    for the same world, name and author. They come in rounds (see ``sft_round`` for the mix): every
    fact is asked again in every round, in a freshly chosen training phrasing."""
    n = DEFAULT_CONVERSATIONS if n is None else n
    rng = random.Random(f"tinylm-sft-{world.seed}")
    conversations: list[list[dict[str, str]]] = []
    while len(conversations) < n:
        conversations += sft_round(world, rng, name, author)
    return conversations[:n]


# -- identity -----------------------------------------------------------------------------------


def identity_templates(heldout: bool = False) -> list[tuple[str, str, str, str]]:
    """(lang, topic, question, reply) for every identity question paired with every reply on its topic
    ("name" or "author"); replies hold ``{name}`` and ``{author}`` placeholders. ``heldout=True`` gives
    the questions training never uses (every ``IDENTITY_HELDOUT_EVERY``-th one)."""
    return [
        (lang, topic, question, reply)
        for (topic, lang), questions in IDENTITY_QUESTIONS.items()
        for i, question in enumerate(questions)
        if (i % IDENTITY_HELDOUT_EVERY == IDENTITY_HELDOUT_EVERY - 1) == heldout
        for reply in IDENTITY_REPLIES[topic, lang]
    ]


def identity_conversations(name: str, author: str, n: int | None = None,
                           heldout: bool = False) -> list[list[dict[str, str]]]:
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
    return [ChatEvalItem(_ask([], question), name if topic == "name" else author, lang, "identity")
            for lang, topic, question in asked]


# -- evaluation of a chat model -----------------------------------------------------------------


def heldout_questions(world: World, name: str = DEFAULT_NAME, author: str = DEFAULT_AUTHOR) -> list[ChatEvalItem]:
    """Questions in phrasings training never pairs with them, with exact answers, in both languages:
    every fact in its held-out phrasing (288 with the default world), a held-out follow-up for each
    entity (80), every held-out arithmetic problem (46), refusals (96) and identity questions (16)."""
    rng = random.Random(f"tinylm-sft-eval-{world.seed}")
    items = _fact_items(world) + _followup_items(world, rng) + _arithmetic_items(world, rng)
    return items + _refusal_items(world, rng) + identity_questions(name, author)


def _other_values(attribute: str, value: str, lang: str) -> tuple[str, ...]:
    return tuple(value_text(attribute, v, lang) for v in VALUES[attribute] if v != value)


def _fact_items(world: World) -> list[ChatEvalItem]:
    """Every fact, asked in the phrasing training never uses for it."""
    items = []
    for entity, attribute, value in world.facts():
        for lang in LANGS:
            template = sft_heldout(world, TEMPLATES_PER_FACT, "question", entity.names["en"], attribute, lang)
            question = fact_question(entity, attribute, lang, template)
            items.append(ChatEvalItem(_ask([], question), value_text(attribute, value, lang), lang, "fact",
                                      _other_values(attribute, value, lang)))
    return items


def _followup_items(world: World, rng: random.Random) -> list[ChatEvalItem]:
    """For each entity and language: a first question and its answer, then a follow-up about another
    attribute in the phrasing training never uses for it."""
    items = []
    for entity in world.entities:
        for lang in LANGS:
            first, then = rng.sample(list(entity.facts), 2)
            context = [(training_fact_question(world, rng, entity, first, lang), fact_answer(entity, first, lang))]
            count = len(FOLLOWUP_TEMPLATES[then, lang])
            template = sft_heldout(world, count, "followup", entity.names["en"], then, lang)
            question = followup_question(entity, then, lang, template)
            value = entity.facts[then]
            items.append(ChatEvalItem(_ask(context, question), value_text(then, value, lang), lang, "followup",
                                      _other_values(then, value, lang)))
    return items


def _arithmetic_items(world: World, rng: random.Random) -> list[ChatEvalItem]:
    """Every held-out problem (never seen in pretraining or fine-tuning); any other number is wrong."""
    items = []
    for problem in sorted(world.heldout_problems):
        answer = arithmetic_answer(problem)
        others = tuple(str(v) for v in range(19) if str(v) != answer)
        for lang in LANGS:
            question = arithmetic_question(problem, lang, rng.randrange(len(ARITHMETIC_QUESTIONS[lang])))
            items.append(ChatEvalItem(_ask([], question), answer, lang, "arithmetic", others))
    return items


def _refusal_items(world: World, rng: random.Random) -> list[ChatEvalItem]:
    """A fact question about each held-out stranger, and for each entity its held-out question about an
    attribute nobody has. A right reply says "I don't know" and names no value of any attribute."""
    items = []
    for lang in LANGS:
        any_value = tuple(value_text(a, v, lang) for a in VALUES for v in VALUES[a])
        questions = [fact_question(s, rng.choice(ATTRIBUTES[s.kind]), lang, rng.randrange(TEMPLATES_PER_FACT))
                     for s in strangers(world, heldout=True)]
        count = len(UNKNOWN_QUESTIONS[lang])
        questions += [unknown_question(e, lang, sft_heldout(world, count, "unknown", e.names["en"], lang))
                      for e in world.entities]
        items += [ChatEvalItem(_ask([], q), REFUSAL_MARKERS[lang], lang, "refusal", any_value) for q in questions]
    return items


def general_questions(world: World) -> list[ChatEvalItem]:
    """Held-out questions that are not about the assistant (facts, follow-ups, arithmetic): a model
    fine-tuned on its identity must still answer these, without mentioning its own name."""
    return [item for item in heldout_questions(world) if item.kind in ("fact", "followup", "arithmetic")]


def _says(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words: "8" is not in "18", "red" not in "reddish"."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(phrase)}(?![0-9A-Za-z])", text) is not None


def score_reply(item: ChatEvalItem, reply: str) -> bool:
    """True when the assistant's reply states the answer and nothing in ``item.wrong``. Asked the
    Zorble's colour, "The Zorble is red." is right, "The Zorble is red or blue." is not; asked about a
    stranger, "I don't know." is right, "I don't know, maybe red." is not."""
    return _says(reply, item.answer) and not any(_says(reply, w) for w in item.wrong)


def write_sft_corpus(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write the default conversations of ``World(seed)`` as JSON lines ({"messages": [...]}); reuse
    them if present."""
    path = Path(out_dir) / f"sft-seed{seed}-v{SFT_VERSION}.jsonl"
    if not path.is_file():
        conversations = sft_conversations(World(seed))
        lines = [json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations]
        atomic_write_text(path, "".join(lines))
    return [path]
