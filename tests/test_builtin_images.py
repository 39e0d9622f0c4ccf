"""The built-in pictures: deterministic, and every caption and answer is true of the pixels."""

import json

from tinylm.data.builtin_images import (
    BACKGROUND,
    CELLS,
    COLOURS,
    drills,
    image_scenes,
    questions,
    render,
    write_image_corpus,
)


def centre_colour(image, cell):
    row, column = cell
    size = image.size[0]
    return image.getpixel((int((column + 0.5) * size / 3), int((row + 0.5) * size / 3)))


def test_scenes_and_pictures_are_deterministic_and_held_out_ones_differ():
    a, b = image_scenes(0, 50), image_scenes(0, 50)
    assert a == b and render(a[3]).tobytes() == render(b[3]).tobytes()
    heldout = image_scenes(0, 50, heldout=True)
    train_pixels = {render(s).tobytes() for s in a}
    assert not any(render(s).tobytes() in train_pixels for s in heldout)
    assert image_scenes(1, 50) != a


def test_every_answer_is_true_of_the_pixels():
    for scene in image_scenes(0, 200):
        image = render(scene)
        rgb = COLOURS[scene.colour][0]
        coloured = {cell for cell in CELLS if centre_colour(image, cell) == rgb}
        assert coloured == set(scene.cells)  # each shape covers its cell's centre, and nothing else is painted there
        assert all(centre_colour(image, cell) == BACKGROUND for cell in CELLS if cell not in scene.cells)
        for q in questions(scene):
            assert q.answer in q.choices and q.answer in q.reply
            if q.kind == "count":
                assert q.answer == str(len(coloured))
            if q.kind == "position":
                assert q.answer == CELLS[scene.cells[0]][0 if q.lang == "en" else 1]
        for q in drills(scene):  # several shapes: which shape, and every place (in reading order)
            assert scene.count > 1 and q.answer in q.reply
            if q.kind == "positions":
                places = [CELLS[cell][0 if q.lang == "en" else 1] for cell in sorted(coloured)]
                assert all(place in q.answer for place in places) and q.answer.endswith(places[-1])


def test_captions_and_questions_in_both_languages():
    one = next(s for s in image_scenes(0, 10) if s.count == 1)
    many = next(s for s in image_scenes(0, 10) if s.count > 1)
    assert one.caption("en").startswith(f"A {one.colour} {one.shape} ") and one.caption("zh").endswith(
        f"的{('圆形', '正方形', '三角形')[('circle', 'square', 'triangle').index(one.shape)]}。"
    )
    assert many.caption("en").split()[0].lower() in ("two", "three", "four")
    kinds = {(q.kind, q.lang) for q in questions(one)} | {(q.kind, q.lang) for q in questions(many)}
    assert kinds == {(k, lang) for k in ("colour", "shape", "position", "count") for lang in ("en", "zh")}
    assert len(next(q for q in questions(many) if q.kind == "count").choices) == 3  # 2, 3 or 4: chance is 1 in 3


def test_corpus_files(tmp_path):
    paths = write_image_corpus(tmp_path, train=6, heldout=4, size=48)
    root = paths["captions"].parent
    captions = [json.loads(line) for line in paths["captions"].read_text(encoding="utf-8").splitlines()]
    asked = [json.loads(line) for line in paths["questions"].read_text(encoding="utf-8").splitlines()]
    heldout = [json.loads(line) for line in paths["heldout"].read_text(encoding="utf-8").splitlines()]
    assert len(captions) == 12 and all(r["conversations"][0]["value"].startswith("<image>\n") for r in captions + asked)
    assert all((root / r["image"]).is_file() for r in captions + heldout)
    assert {r["kind"] for r in heldout} <= {"colour", "shape", "position", "count", "follow-up"} and all(
        r["answer"] in r["choices"] for r in heldout
    )
    # training: per picture and language, one conversation asking every question and drill of that language
    scenes = image_scenes(0, 6)
    for scene, (en, zh) in zip(scenes, zip(asked[::2], asked[1::2])):
        for record, lang in ((en, "en"), (zh, "zh")):
            expected = {(q.question, q.reply) for q in questions(scene) + drills(scene) if q.lang == lang}
            turns = record["conversations"]
            assert {(h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(turns[::2], turns[1::2])} == (
                expected
            )
    # held out: each question on its own, then one conversation per picture whose later questions are follow-ups
    singles = {(r["image"], r["question"]): r for r in heldout if r["kind"] != "follow-up"}
    follow_ups = [r for r in heldout if r["kind"] == "follow-up"]
    assert len(singles) == sum(len(questions(s)) for s in image_scenes(0, 4, heldout=True)) and follow_ups
    for r in follow_ups:
        alone = singles[r["image"], r["question"]]
        assert r["asks"] == alone["kind"] and r["answer"] == alone["answer"] and r["choices"] == alone["choices"]
        assert all((r["image"], q) in singles for q in r["before"]) and r["question"] not in r["before"]
    assert {r["lang"] for r in follow_ups} == {"en", "zh"}
    assert write_image_corpus(tmp_path, train=6, heldout=4, size=48) == paths  # reused, not rewritten
