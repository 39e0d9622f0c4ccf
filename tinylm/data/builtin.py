"""The built-in corpus: a small invented world, described in English and Chinese, made from a seed.

Nothing is downloaded. ``World(seed)`` invents creatures ("the Zorble", 咕噜兽) and people ("Mira",
林雪) and gives each a few facts drawn from small sets of values: 8 colours, 8 foods, 8 towns, 8 jobs,
2/4/6/8 legs. Every kind of text (pretraining documents and fine-tuning conversations now; preference
pairs, images later) is generated from the same World, so what a model learns can be checked exactly.

    world = World(0)
    documents = pretrain_documents(world)   # stories, encyclopedia paragraphs, arithmetic drills
    items = heldout_facts(world)            # prompts whose phrasing never occurs in those documents

The fine-tuning conversations about the same world are in ``tinylm.data.builtin_chat``.

Held out, honestly: each fact is written with several sentence templates, and for every
(entity, attribute, language) one template is never used in training. That template is used for
other entities, so the model knows the phrasing; it has only seen this fact in the other phrasings.
The held-out sentence, cut right before the value, becomes the eval prompt. Likewise some sums and
differences of one-digit numbers never appear, and are asked at evaluation. The conversations hold
out question phrasings the same way (see tinylm.data.builtin_chat).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tinylm.io import atomic_write_text

LANGS = ("en", "zh")
CORPUS_VERSION = 1  # bump whenever generated text changes, so cached corpora are rewritten
DEFAULT_DOCUMENTS = 8400  # 60 rounds (see pretrain_documents): about 1.5 MB of text
N_CREATURES, N_PEOPLE = 24, 16
HELDOUT_PROBLEMS = 0.15  # the share of arithmetic problems that never appear in training

# Every value an attribute can take: the English word (the value's key) → the Chinese one.
VALUES = {
    "colour": {
        "red": "红色",
        "blue": "蓝色",
        "green": "绿色",
        "yellow": "黄色",
        "purple": "紫色",
        "orange": "橙色",
        "white": "白色",
        "black": "黑色",
    },
    "legs": {"2": "2", "4": "4", "6": "6", "8": "8"},
    "food": {
        "apples": "苹果",
        "fish": "鱼",
        "honey": "蜂蜜",
        "carrots": "胡萝卜",
        "rice": "米饭",
        "soup": "汤",
        "berries": "浆果",
        "cheese": "奶酪",
    },
    "home": {
        "Pebbleford": "卵石渡",
        "Mossbury": "苔藓堡",
        "Windhollow": "风谷",
        "Lanternfield": "灯笼田",
        "Copperbay": "铜湾",
        "Thistledown": "蓟花村",
        "Rainmere": "雨湖镇",
        "Starcliff": "星崖",
    },
    "job": {
        "baker": "面包师",
        "farmer": "农民",
        "teacher": "老师",
        "doctor": "医生",
        "painter": "画家",
        "fisher": "渔夫",
        "singer": "歌手",
        "builder": "建筑工人",
    },
}
ATTRIBUTES = {"creature": ("colour", "legs", "food", "home"), "person": ("job", "food", "home")}

# Invented names are two pieces glued together; Chinese creature names end in 兽 ("beast").
NAME_PARTS = {
    ("creature", "en"): (
        ("Zor", "Blim", "Quib", "Tav", "Mup", "Gri", "Flo", "Wex", "Niv", "Pol", "Dru", "Kesh"),
        ("ble", "ton", "nick", "mum", "pip", "dax", "zoo", "ven"),
    ),
    ("creature", "zh"): (
        ("咕", "啾", "嘟", "叽", "蹦", "哒", "噗", "呦", "嘻", "哞", "喔", "呱"),
        ("噜兽", "比兽", "宝兽", "球兽", "丁兽", "莫兽", "拉兽", "米兽"),
    ),
    ("person", "en"): (
        ("Mi", "Ta", "Lo", "Ve", "Ari", "Jo", "Sa", "Ke", "Ru", "Ni", "Bo", "Elo"),
        ("ra", "nel", "bel", "do", "lia", "mo", "ssa", "rik", "vin", "tu"),
    ),
    ("person", "zh"): (
        ("王", "李", "张", "刘", "陈", "林", "周", "吴", "赵", "孙"),
        ("雪", "明", "安", "乐", "云", "杰", "琪", "宁", "峰", "月"),
    ),
}
PRONOUNS = {"she": {"en": ("she", "her"), "zh": "她"}, "he": {"en": ("he", "his"), "zh": "他"}}

# Fact sentences. {E} names the entity ("the Zorble", "Mira"), {Es} at the start of a sentence; the
# value {v} always comes last, so the words before it are a prompt whose exact completion is the value.
FACT_TEMPLATES = {
    ("colour", "en"): (
        "The colour of {E} is {v}.",
        "If you see {E}, you will notice that it is {v}.",
        "{Es} has a coat that is {v}.",
        "Look closely at {E}: its colour is {v}.",
    ),
    ("colour", "zh"): (
        "{E}的颜色是{v}。",
        "如果你看到{E}，你会发现它是{v}。",
        "{E}身上的毛是{v}。",
        "仔细看看{E}，它的颜色是{v}。",
    ),
    ("legs", "en"): (
        "The number of legs on {E} is {v}.",
        "Count the legs of {E} and you get {v}.",
        "How many legs does {E} have? The answer is {v}.",
        "The legs of {E} add up to {v}.",
    ),
    ("legs", "zh"): (
        "{E}的腿的数量是{v}。",
        "{E}有几条腿？答案是{v}。",
        "数一数{E}的腿，一共是{v}。",
        "{E}腿的总数是{v}。",
    ),
    ("food", "en"): (
        "The favourite food of {E} is {v}.",
        "Every morning, {E} eats {v}.",
        "Most of all, {E} loves to eat {v}.",
        "If you want to make {E} happy, bring some {v}.",
    ),
    ("food", "zh"): (
        "{E}最喜欢的食物是{v}。",
        "每天早上，{E}都吃{v}。",
        "{E}最爱吃的东西是{v}。",
        "想让{E}开心，就送去一些{v}。",
    ),
    ("home", "en"): (
        "{Es} lives in {v}.",
        "The home of {E} is in {v}.",
        "You can find {E} in the town of {v}.",
        "If you want to visit {E}, travel to {v}.",
    ),
    ("home", "zh"): ("{E}住在{v}。", "{E}的家在{v}。", "想找到{E}，就要去{v}。", "要拜访{E}，请前往{v}。"),
    ("job", "en"): (
        "{Es} works as a {v}.",
        "The job of {E} is to be a {v}.",
        "Everyone in town knows that {E} is a {v}.",
        "Every day, {E} goes to work as a {v}.",
    ),
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
        (
            ("Once upon a time, there was a {P_job} named {P}.", "从前，有一位{P_job}，名叫{P}。"),
            (
                "Once upon a time, in the town of {P_home}, there was a {P_job} called {P}.",
                "从前，在{P_home}，住着一位{P_job}，名字叫{P}。",
            ),
            (
                "Long ago, a {P_job} named {P} had a little house in {P_home}.",
                "很久以前，{P_home}有一位{P_job}叫{P}，{P_he}有一座小房子。",
            ),
        ),
        (
            (
                "One day, {P} went for a walk and met a little {C_colour} {C}.",
                "有一天，{P}出门散步，遇到了一只{C_colour}的小{C}。",
            ),
            (
                "One morning, {P} heard a small noise. It was a little {C_colour} {C} with {C_legs} legs.",
                "一天早上，{P}听到一个小小的声音。原来是一只{C_colour}的{C}，它有{C_legs}条腿。",
            ),
            (
                "On a sunny afternoon, {P} found a little {C} near the river. It was {C_colour} from head to toe.",
                "一个晴朗的下午，{P}在河边发现了一只小{C}。它浑身都是{C_colour}。",
            ),
        ),
        (
            (
                "The {C} looked very hungry. {P} shared some {C_food} with it, and the {C} ate every bite.",
                "{C}看起来很饿。{P}把一些{C_food}分给它，{C}一下子就吃完了。",
            ),
            (
                "The {C} was sad because it could not find any {C_food}. "
                "{P} knew a place with lots of {C_food} and showed it the way.",
                "{C}很难过，因为它找不到{C_food}。{P}知道哪里有很多{C_food}，就带它去了。",
            ),
            (
                'The {C} was lost, far away from {C_home}. {P} said, "Do not worry. I will take you back to {C_home}." '
                "They walked together until they reached {C_home}.",
                "{C}迷路了，离{C_home}很远。{P}说：“别担心，我带你回{C_home}。”他们一起走，终于到了{C_home}。",
            ),
        ),
        (
            ("From that day on, {P} and the {C} were best friends.", "从那天起，{P}和{C}成了好朋友。"),
            ("The {C} was happy, and {P} smiled all the way home.", "{C}很开心，{P}也一路笑着回家。"),
            ("That night, {P} went to sleep with a big smile.", "那天晚上，{P}带着笑容睡着了。"),
        ),
    ),
    "creature": (
        (
            (
                "There once was a small {C_colour} {C} who lived in {C_home}.",
                "从前，{C_home}住着一只{C_colour}的小{C}。",
            ),
            (
                "Once upon a time, a little {C} was born in {C_home}. It was as {C_colour} as can be.",
                "从前，一只小{C}出生在{C_home}。它全身都是{C_colour}。",
            ),
        ),
        (
            (
                "It had {C_legs} legs and loved to run up and down the hills.",
                "它有{C_legs}条腿，最喜欢在山坡上跑来跑去。",
            ),
            (
                "Every day it looked for {C_food}, its favourite thing in the world.",
                "它每天都去找{C_food}，那是它在世界上最喜欢的东西。",
            ),
        ),
        (
            (
                "One day it found a big pile of {C_food} and jumped for joy.",
                "有一天，它找到了一大堆{C_food}，高兴得跳了起来。",
            ),
            (
                "One day it met a {P_job} named {P}, who gave it some {C_food}.",
                "有一天，它遇到了一位叫{P}的{P_job}，{P}给了它一些{C_food}。",
            ),
        ),
        (
            ("It was the best day ever.", "那是最开心的一天。"),
            ("And it lived happily ever after.", "从此以后，它过得很快乐。"),
        ),
    ),
    "friends": (
        (
            (
                "{P} and {Q} were good friends. {P} was a {P_job}, and {Q} was a {Q_job}.",
                "{P}和{Q}是好朋友。{P}是{P_job}，{Q}是{Q_job}。",
            ),
            ("Once upon a time, there were two friends, {P} and {Q}.", "从前，有两个好朋友，{P}和{Q}。"),
        ),
        (
            ("One day, {Q} came to {P_home} to see {P}.", "有一天，{Q}来到{P_home}看望{P}。"),
            ("One rainy day, {Q} walked all the way to {P_home}.", "一个下雨天，{Q}一路走到了{P_home}。"),
        ),
        (
            (
                "They shared some {P_food}, because it was {P_his} favourite food.",
                "他们一起吃了{P_food}，因为那是{P}最喜欢吃的。",
            ),
            (
                '{P} made {P_food} for {Q}. "This is what I love most," {P_he} said.',
                "{P}给{Q}做了{P_food}。{P_he}说：“这是我最爱的。”",
            ),
        ),
        (
            ("It was a happy day for both of them.", "那是他们两个都很开心的一天。"),
            ("In the evening, {Q} went back home to {Q_home}.", "傍晚，{Q}回到了{Q_home}的家。"),
        ),
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
            for i, entity in enumerate(self.entities)
            for attribute in entity.facts
            for lang in LANGS
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
    sentences += [
        fact_sentence(entity, a, lang, rng.choice(world.training_templates(entity, a, lang))) for a in attributes
    ]
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
    slots = {
        **story_slots("P", person, lang),
        **story_slots("Q", friend, lang),
        **story_slots("C", rng.choice(world.creatures), lang),
    }
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
        for e, a, v in world.facts()
        for lang in LANGS
    ]
    items += [
        EvalItem(arithmetic_prompt(p, lang), arithmetic_answer(p), lang, "arithmetic")
        for p in sorted(world.heldout_problems)
        for lang in LANGS
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
