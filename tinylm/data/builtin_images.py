"""The built-in images: generated pictures of coloured shapes, with captions and questions whose
answers are exact, in English and Chinese, so what a vision-language model learns can be measured.

    scenes = image_scenes(seed=0, count=2000)           # the same scenes for the same seed
    picture = render(scenes[0])                          # a PIL image, 64×64 by default
    scenes[0].caption("en")    → "A red circle at the top left."
    questions(scenes[0])       → [ImageQuestion(kind="colour", question=..., answer="red", choices=...), ...]
    drills(scenes[1])          → what training also asks of several shapes: which shape, and where each is
    write_image_corpus(out_dir, seed=0)                  # PNGs + LLaVA-style JSON Lines, train and held out

A scene is a 3×3 grid with one to four shapes, all of one kind and one colour, each in its own cell.
A scene with one shape is asked its colour, its shape and where it is; a scene with several is asked
how many there are and their colour. Each question's ``choices`` are all the answers of its kind, so
1 / len(choices) is the chance rate. Training also asks two drills of a scene with several shapes
(``drills``): which shape they are, and where each one is, so the pictures that teach counting also
teach seeing every shape and its place. Held-out scenes come from their own random stream and, in
addition, every image is drawn with its own small jitter of size and place: no held-out picture was
ever seen in training.

Each training picture is one conversation per language that asks all its questions (and drills) in a
shuffled order, so every question is learned both first and as a follow-up about the same picture.
The held-out set asks each question on its own, and again as a follow-up: per picture, one
conversation in one language asks its questions in a shuffled order, and the questions after the
first are the kind "follow-up" (``asks`` names the question's own kind), answered after the model's
own earlier replies.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tinylm.io import atomic_write_text

COLOURS = {  # name → (RGB, Chinese)
    "red": ((220, 40, 40), "红色"),
    "green": ((40, 170, 60), "绿色"),
    "blue": ((40, 80, 220), "蓝色"),
    "yellow": ((235, 200, 30), "黄色"),
    "purple": ((140, 60, 190), "紫色"),
    "orange": ((245, 140, 30), "橙色"),
}
SHAPES = {"circle": ("circles", "圆形"), "square": ("squares", "正方形"), "triangle": ("triangles", "三角形")}
CELLS = {  # (row, column) → (English, Chinese)
    (0, 0): ("at the top left", "左上角"),
    (0, 1): ("at the top", "上方"),
    (0, 2): ("at the top right", "右上角"),
    (1, 0): ("on the left", "左边"),
    (1, 1): ("in the middle", "中间"),
    (1, 2): ("on the right", "右边"),
    (2, 0): ("at the bottom left", "左下角"),
    (2, 1): ("at the bottom", "下方"),
    (2, 2): ("at the bottom right", "右下角"),
}
NUMBERS = {1: ("one", "一"), 2: ("two", "两"), 3: ("three", "三"), 4: ("four", "四")}
BACKGROUND = (245, 245, 240)
IMAGE_VERSION = 3  # bump whenever generated images or texts change, so cached corpora are rewritten


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    cells: tuple[tuple[int, int], ...]  # one per shape, distinct
    jitter: int  # the seed of this picture's small variations of size and place

    @property
    def count(self) -> int:
        return len(self.cells)

    def caption(self, lang: str) -> str:
        """ "A red circle at the top left." / "Three blue squares." / "左上角有一个红色的圆形。"."""
        plural, shape_zh = SHAPES[self.shape]
        colour_zh = COLOURS[self.colour][1]
        if self.count == 1:
            where_en, where_zh = CELLS[self.cells[0]]
            return (
                f"A {self.colour} {self.shape} {where_en}."
                if lang == "en"
                else f"{where_zh}有一个{colour_zh}的{shape_zh}。"
            )
        number_en, number_zh = NUMBERS[self.count]
        return (
            f"{number_en.capitalize()} {self.colour} {plural}."
            if lang == "en"
            else f"有{number_zh}个{colour_zh}的{shape_zh}。"
        )


@dataclass(frozen=True)
class ImageQuestion:
    kind: str  # colour | shape | count | position (and, among drills, positions)
    lang: str
    question: str
    answer: str  # the word a right reply contains
    reply: str  # the full answer sentence training uses
    choices: tuple[str, ...]  # every answer of this kind: 1 / len(choices) is the chance rate


def image_scenes(seed: int, count: int, heldout: bool = False) -> list[Scene]:
    """``count`` scenes: half with one shape (asked colour, shape and place), half with two to four."""
    rng = random.Random(f"tinylm-images-{seed}-{'heldout' if heldout else 'train'}")
    scenes = []
    for i in range(count):
        shapes = 1 if i % 2 == 0 else rng.randint(2, 4)
        cells = tuple(rng.sample(sorted(CELLS), shapes))
        scenes.append(Scene(rng.choice(sorted(SHAPES)), rng.choice(sorted(COLOURS)), cells, rng.randrange(1 << 30)))
    return scenes


def render(scene: Scene, size: int = 64):
    """The scene as a PIL RGB image of ``size``×``size`` pixels."""
    from PIL import Image, ImageDraw  # Pillow, loaded when a picture is first drawn

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    rng = random.Random(scene.jitter)
    cell = size / 3
    rgb = COLOURS[scene.colour][0]
    for row, column in scene.cells:
        radius = cell * rng.uniform(0.28, 0.4)
        cx = (column + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if scene.shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif scene.shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)], fill=rgb
            )
    return image


def questions(scene: Scene) -> list[ImageQuestion]:
    """What is asked about a scene, in both languages, with exact answers."""
    plural, shape_zh = SHAPES[scene.shape]
    colour_zh = COLOURS[scene.colour][1]
    asked = []
    for lang in ("en", "zh"):
        en = lang == "en"
        colours = tuple(sorted(COLOURS)) if en else tuple(COLOURS[c][1] for c in sorted(COLOURS))
        shapes = tuple(sorted(SHAPES)) if en else tuple(SHAPES[s][1] for s in sorted(SHAPES))
        colour, shape = (scene.colour, scene.shape) if en else (colour_zh, shape_zh)
        if scene.count == 1:
            where = CELLS[scene.cells[0]][0 if en else 1]
            places = tuple(CELLS[c][0 if en else 1] for c in sorted(CELLS))
            asked += [
                ImageQuestion(
                    "colour",
                    lang,
                    "What colour is the shape?" if en else "这个图形是什么颜色的？",
                    colour,
                    f"It is {colour}." if en else f"它是{colour}的。",
                    colours,
                ),
                ImageQuestion(
                    "shape",
                    lang,
                    "What shape is it?" if en else "这是什么形状？",
                    shape,
                    f"It is a {shape}." if en else f"这是一个{shape}。",
                    shapes,
                ),
                ImageQuestion(
                    "position",
                    lang,
                    "Where is the shape?" if en else "图形在哪里？",
                    where,
                    f"It is {where}." if en else f"它在{where}。",
                    places,
                ),
            ]
        else:
            numbers = tuple(str(n) for n in NUMBERS if n > 1)  # only scenes of two or more shapes are asked
            asked += [
                ImageQuestion(
                    "count",
                    lang,
                    f"How many {plural} are there?" if en else f"图中有几个{shape_zh}？",
                    str(scene.count),
                    f"There are {scene.count} {plural}." if en else f"有{scene.count}个{shape_zh}。",
                    numbers,
                ),
                ImageQuestion(
                    "colour",
                    lang,
                    f"What colour are the {plural}?" if en else f"这些{shape_zh}是什么颜色的？",
                    colour,
                    f"They are {colour}." if en else f"它们是{colour}的。",
                    colours,
                ),
            ]
    return asked


def drills(scene: Scene) -> list[ImageQuestion]:
    """What training also asks of a scene with several shapes (nothing of one shape), in both languages:
    which shape they are, and where each one is (kind "positions": the reply names every place, in
    reading order). Both make the pictures that teach counting teach seeing each shape too."""
    if scene.count == 1:
        return []
    plural, shape_zh = SHAPES[scene.shape]
    asked = []
    for lang in ("en", "zh"):
        en = lang == "en"
        places = [CELLS[cell][0 if en else 1] for cell in sorted(scene.cells)]
        listed = ", ".join(places[:-1]) + " and " + places[-1] if en else "、".join(places[:-1]) + "和" + places[-1]
        asked += [
            ImageQuestion(
                "shape",
                lang,
                "What shape are they?" if en else "它们是什么形状？",
                scene.shape if en else shape_zh,
                f"They are {plural}." if en else f"它们是{shape_zh}。",
                tuple(sorted(SHAPES)) if en else tuple(SHAPES[s][1] for s in sorted(SHAPES)),
            ),
            ImageQuestion(
                "positions",
                lang,
                f"Where are the {plural}?" if en else f"这些{shape_zh}在哪里？",
                listed,
                f"They are {listed}." if en else f"它们在{listed}。",
                (listed,),
            ),
        ]
    return asked


def write_image_corpus(
    out_dir: str | Path, seed: int = 0, train: int = 2000, heldout: int = 200, size: int = 64
) -> dict[str, Path]:
    """Write the pictures and, as JSON Lines in LLaVA's format ({"image", "conversations"}), the
    captions (stage 1), the questions (stage 2: per picture and language, one conversation asking its
    questions and drills in a shuffled order) and the held-out questions (each question on its own,
    then per picture one conversation's follow-ups: kind "follow-up", ``asks`` its own kind, ``before``
    the questions asked earlier in it); reuse them if present.
    Returns {"captions", "questions", "heldout"} → file paths."""
    root = Path(out_dir) / f"images-seed{seed}-{size}px-{train}+{heldout}-v{IMAGE_VERSION}"
    paths = {name: root / f"{name}.jsonl" for name in ("captions", "questions", "heldout")}
    if all(p.is_file() for p in paths.values()):
        return paths
    lines = {name: [] for name in paths}
    for split, scenes in (("train", image_scenes(seed, train)), ("heldout", image_scenes(seed, heldout, heldout=True))):
        (root / split).mkdir(parents=True, exist_ok=True)
        order = random.Random(f"tinylm-images-{seed}-{split}-order")
        for i, scene in enumerate(scenes):
            image = f"{split}/{i:05d}.png"
            render(scene, size).save(root / image)
            asked = questions(scene)
            if split == "train":
                for lang in ("en", "zh"):
                    prompt = "Describe the picture." if lang == "en" else "描述这张图片。"
                    lines["captions"].append(_record(image, [(prompt, scene.caption(lang))]))
                    conversation = [q for q in asked + drills(scene) if q.lang == lang]
                    order.shuffle(conversation)
                    lines["questions"].append(_record(image, [(q.question, q.reply) for q in conversation]))
            else:
                lines["heldout"] += [_heldout(image, q) for q in asked]
                conversation = [q for q in asked if q.lang == ("en", "zh")[i // 2 % 2]]  # both kinds of scene in both
                order.shuffle(conversation)
                lines["heldout"] += [
                    _heldout(image, q, before=[p.question for p in conversation[:turn]])
                    for turn, q in enumerate(conversation)
                    if turn
                ]
    for name, records in lines.items():
        atomic_write_text(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return paths


def _heldout(image: str, q: ImageQuestion, before: list[str] | None = None) -> dict:
    """One held-out question; with ``before`` (the questions asked earlier about the picture, in order) a
    follow-up."""
    record = {"image": image, "question": q.question, "answer": q.answer, "kind": q.kind, "lang": q.lang}
    if before:
        record.update(kind="follow-up", asks=q.kind, before=before)
    return {**record, "choices": list(q.choices)}


def _record(image: str, exchanges: list[tuple[str, str]]) -> dict:
    """One LLaVA-style record: the image tag opens the first human turn."""
    conversations = []
    for i, (question, answer) in enumerate(exchanges):
        conversations += [
            {"from": "human", "value": ("<image>\n" if i == 0 else "") + question},
            {"from": "gpt", "value": answer},
        ]
    return {"image": image, "conversations": conversations}
