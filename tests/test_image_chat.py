import json
from pathlib import Path

import pytest
from conftest import write_jsonl

from tinylm.data.builtin_images import image_scenes, render, write_image_corpus
from tinylm.data.image_chat import IMAGE_TAG, ImageConversation, read_coco_captions, read_image_conversations
from tinylm.image_processor import load_image
from tinylm.io import DataError

ANSWER = {"from": "gpt", "value": "A red circle."}


@pytest.fixture
def pictures(tmp_path) -> list[Path]:
    """Three small PNGs under tmp_path/pics."""
    folder = tmp_path / "pics"
    folder.mkdir()
    paths = []
    for i, scene in enumerate(image_scenes(0, 3)):
        paths.append(folder / f"{i}.png")
        render(scene, size=16).save(paths[-1])
    return paths


def read_one(tmp_path, record, **kwargs) -> ImageConversation:
    conversations, _ = read_image_conversations(write_jsonl(tmp_path / "one.jsonl", [record]), **kwargs)
    assert len(conversations) == 1
    return conversations[0]


def error_of(tmp_path, records, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_image_conversations(write_jsonl(tmp_path / "bad.jsonl", records), **kwargs)
    return info.value


def test_llava_records_with_several_images_and_text_only_records(tmp_path, pictures):
    records = [
        {"image": "pics/0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, ANSWER]},
        {
            "image": ["pics/1.png", "pics/2.png"],
            "system": "Be brief.",
            "conversations": [
                {"from": "human", "value": "<image>\nAnd this?"},
                ANSWER,
                {"from": "human", "value": "Compare with <image>"},
                {"from": "gpt", "value": "Same."},
            ],
        },
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {
            "image": "pics/2.png, pics/0.png",  # MiniMind-V's multi-image records
            "conversations": [
                {"role": "user", "content": "<image><image>\nSame?"},
                {"role": "assistant", "content": "No."},
            ],
        },
    ]
    path = write_jsonl(tmp_path / "llava.jsonl", records)
    conversations, report = read_image_conversations(path)
    assert [c.images for c in conversations] == [[pictures[0]], pictures[1:], [], [pictures[2], pictures[0]]]
    assert conversations[0].messages == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A red circle."},
    ]
    assert conversations[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"].count(IMAGE_TAG) for m in conversations[1].messages] == [0, 1, 0, 1, 0]
    assert [c.source for c in conversations] == [f"{path}:{n}" for n in range(1, 5)]
    assert report.files[str(path)].read == {"llava": 3, "text": 1}


def test_llamafactory_tags_anywhere_and_image_root(tmp_path, pictures):
    data = tmp_path / "data"
    data.mkdir()
    record = {
        "messages": [
            {"role": "user", "content": "<image>Who?"},
            {"role": "assistant", "content": "Tom."},
            {"role": "user", "content": "Doing what?<image>"},
            {"role": "assistant", "content": "Running."},
        ],
        "images": ["0.png", "0.png"],
    }
    path = data / "demo.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    (conversation,), report = read_image_conversations([path], image_root=tmp_path / "pics")
    assert conversation.images == [pictures[0], pictures[0]]
    assert conversation.messages[2]["content"] == "Doing what?<image>"
    assert conversation.source == f"{path}:item 0"
    assert report.read == 1 and report.files[str(path)].read == {"llamafactory": 1}
    with pytest.raises(DataError, match=r"missing_image|not found") as info:
        read_image_conversations(path)  # without image_root: beside the file, where they are not
    assert info.value.reason == "missing_image"


def test_xtuner_content_parts(tmp_path, pictures):
    def image(name):
        return {"type": "image_url", "image_url": {"url": f"resource/{name}", "image_wh": [16, 16]}}

    records = [
        {
            "id": 1,
            "messages": [
                {"role": "user", "content": [image("0.png"), {"type": "text", "text": "<IMG_CONTEXT>\nColour?"}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Shape?"},
                {"role": "assistant", "content": "A circle."},
            ],
        },
        {
            "id": 2,
            "messages": [
                {"role": "user", "content": [image("1.png"), image("2.png"), {"type": "text", "text": "Same?"}]},
                {"role": "assistant", "content": "No."},
            ],
        },
    ]
    # "resource/0.png" is not under the file's folder: found with the first folder dropped
    path = write_jsonl(tmp_path / "pics" / "sft.jsonl", records)
    conversations, report = read_image_conversations(path)
    assert conversations[0].messages[0]["content"] == "<image>\nColour?"
    assert conversations[0].images == [pictures[0]]
    assert conversations[1].messages[0]["content"] == "<image>\n<image>\nSame?"
    assert conversations[1].images == pictures[1:]
    assert report.files[str(path)].read == {"xtuner": 2}


def test_xtuner_pretrain_becomes_a_caption_pair(tmp_path, pictures):
    parts = [
        {"type": "image_url", "image_url": {"url": "pics/0.png"}},
        {"type": "image_url", "image_url": {"url": "pics/1.png"}},
        {"type": "text", "text": "<IMG_CONTEXT>\nA red circle.<IMG_CONTEXT>\nTwo blue squares."},
    ]
    conversation = read_one(tmp_path, {"messages": [{"role": "pretrain", "content": parts}]})
    assert conversation.messages == [
        {"role": "user", "content": "<image>\n<image>"},
        {"role": "assistant", "content": "A red circle.\nTwo blue squares."},
    ]
    assert conversation.images == pictures[:2]


def test_xtuner_errors_and_hf_image_parts(tmp_path, pictures):
    url = {"type": "image_url", "image_url": {"url": "pics/0.png"}}
    two_placeholders = {
        "messages": [
            {"role": "user", "content": [url, {"type": "text", "text": "<IMG_CONTEXT><IMG_CONTEXT>?"}]},
            {"role": "assistant", "content": "No."},
        ]
    }
    error = error_of(tmp_path, [two_placeholders])
    assert error.reason == "image_count" and "messages[0].content: 1 image part(s) but 2" in str(error)
    no_image = {"messages": [{"role": "pretrain", "content": [{"type": "text", "text": "Just text."}]}]}
    assert error_of(tmp_path, [no_image]).reason == "image_count"
    missing = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "res/gone.png"}}]},
            {"role": "assistant", "content": "?"},
        ]
    }
    error = error_of(tmp_path, [missing])
    assert error.reason == "missing_image" and "messages[0].content[0].image_url: image 'res/gone.png'" in str(error)
    # HF/TRL style: {"type": "image"} parts, the images in the record's "images"; absolute paths as given
    hf = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ],
        "images": [str(pictures[2])],
    }
    conversation = read_one(tmp_path, hf)
    assert conversation.messages[0]["content"] == "<image>\nWhat?" and conversation.images == [pictures[2]]
    bare = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]  # XTuner's text-only records
    assert read_one(tmp_path, bare).images == []


def test_parquet_rows_with_image_bytes(tmp_path, pictures):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    png = [p.read_bytes() for p in pictures]
    chat = [{"from": "human", "value": "<image>\nWhat is it?"}, ANSWER]
    hf = pa.table(
        {
            "image": [{"bytes": png[0], "path": "x.png"}, {"bytes": None, "path": str(pictures[1])}],
            "conversations": [chat, chat],
        }
    )
    pq.write_table(hf, tmp_path / "hf.parquet")
    pq.write_table(
        pa.table(
            {
                "images": [[png[0], png[1]]],
                "messages": [
                    [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "No."}]
                ],
            }
        ),
        tmp_path / "multi.parquet",
    )
    pq.write_table(pa.table({"image": [png[2]], "caption": [" A green square. "]}), tmp_path / "captions.parquet")
    minimind = json.dumps([{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A shape."}])
    pq.write_table(pa.table({"conversations": [minimind], "image_bytes": [[png[1]]]}), tmp_path / "minimind.parquet")
    paths = [tmp_path / name for name in ("hf.parquet", "multi.parquet", "captions.parquet", "minimind.parquet")]
    conversations, report = read_image_conversations(paths)
    assert [c.images for c in conversations] == [[png[0]], [pictures[1]], png[:2], [png[2]], [png[1]]]
    assert conversations[3].messages == [
        {"role": "user", "content": "<image>\nDescribe the picture."},
        {"role": "assistant", "content": "A green square."},
    ]
    assert conversations[0].source == f"{paths[0]}:row 1"
    assert [dict(f.read) for f in report.files.values()] == [
        {"llava": 2},
        {"llamafactory": 1},
        {"caption": 1},
        {"minimind-v": 1},
    ]
    assert load_image(conversations[0].images[0]).size == (16, 16)


def test_tag_count_mismatch_names_the_line_and_both_numbers(tmp_path, pictures):
    good = {"image": "pics/0.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, ANSWER]}
    two_tags = {"image": "pics/0.png", "conversations": [{"from": "human", "value": "<image><image>\nWhat?"}, ANSWER]}
    error = error_of(tmp_path, [good, two_tags])
    assert error.reason == "image_count"
    assert f"{tmp_path / 'bad.jsonl'}:2:" in str(error) and "1 image(s) but 2 <image> tag(s)" in str(error)
    text_only = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, ANSWER]}
    assert error_of(tmp_path, [text_only]).reason == "image_count"
    no_tag = {"image": "pics/0.png", "conversations": [{"from": "human", "value": "What?"}, ANSWER]}
    assert "1 image(s) but 0" in str(error_of(tmp_path, [no_tag]))


def test_missing_image_names_the_path_and_the_sample(tmp_path, pictures):
    record = {"image": "pics/nope.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, ANSWER]}
    error = error_of(tmp_path, [record])
    assert error.reason == "missing_image"
    assert f"{tmp_path / 'bad.jsonl'}:1: image: image 'pics/nope.png' not found" in str(error)
    assert str(tmp_path / "pics" / "nope.png") in str(error)


def test_image_in_a_reply(tmp_path, pictures):
    record = {
        "image": "pics/0.png",
        "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "<image>"}],
    }
    error = error_of(tmp_path, [record])
    assert error.reason == "image_in_reply" and "conversations[1].value" in str(error)


def test_skip_bad_counts_each_reason_and_chat_rules_still_apply(tmp_path, pictures):
    def llava(image, *turns):
        return {**({"image": image} if image else {}), "conversations": [{"from": f, "value": v} for f, v in turns]}

    records = [
        llava("pics/0.png", ("human", "<image>\nWhat?"), ("gpt", "Red.")),
        llava("pics/x.png", ("human", "<image>\nWhat?"), ("gpt", "Red.")),  # missing_image
        llava("pics/0.png", ("human", "What?"), ("gpt", "Red.")),  # image_count
        llava("pics/0.png", ("human", "<image>"), ("gpt", "<image>")),  # image_in_reply
        llava("pics/0.png", ("human", "<image>\nWhat?")),  # last_not_assistant
        {**llava(None, ("human", "Hi"), ("gpt", "Hello.")), "videos": ["a.mp4"]},  # unsupported
        llava(None, ("human", "Hi"), ("gpt", "Hello.")),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    conversations, report = read_image_conversations(path, skip_bad=True)
    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:7"]
    assert report.skipped == {
        "missing_image": 1,
        "image_count": 1,
        "image_in_reply": 1,
        "last_not_assistant": 1,
        "unsupported": 1,
    }
    assert report.files[str(path)].first_error["missing_image"].startswith(f"{path}:2:")
    assert "image_count" in report.summary()


def write_coco(root: Path, pictures, captions: dict[int, list[str]], name="captions_train2017.json") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(exist_ok=True)
    images = []
    for i, picture in enumerate(pictures):
        (root / "train2017" / f"{i:012d}.jpg").write_bytes(picture.read_bytes())
        images.append({"id": 100 + i, "file_name": f"{i:012d}.jpg"})
    annotations = [
        {"image_id": image_id, "id": n, "caption": c}
        for n, (image_id, texts) in enumerate(captions.items())
        for c in texts
    ]
    path = root / "annotations" / name
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def test_coco_captions(tmp_path, pictures):
    path = write_coco(
        tmp_path / "coco", pictures[:2], {100: ["A red circle. ", "Something red."], 101: ["Two squares."]}
    )
    conversations = read_coco_captions(path)
    assert len(conversations) == 3
    assert conversations[0].messages == [
        {"role": "user", "content": "<image>\nDescribe the picture."},
        {"role": "assistant", "content": "A red circle."},
    ]
    assert [c.images for c in conversations] == [[tmp_path / "coco" / "train2017" / "000000000000.jpg"]] * 2 + [
        [tmp_path / "coco" / "train2017" / "000000000001.jpg"]
    ]
    assert conversations[2].source == f"{path}:annotation 2"
    (first, *_) = read_coco_captions(path, image_dir=tmp_path / "coco" / "train2017", prompt="What?")
    assert first.messages[0]["content"] == "<image>\nWhat?"


def test_coco_errors(tmp_path, pictures):
    path = write_coco(tmp_path / "coco", pictures[:1], {100: ["A red circle."]})
    renamed = path.with_name("captions_val2017.json")
    renamed.write_text(path.read_text())
    with pytest.raises(DataError, match="val2017") as info:
        read_coco_captions(renamed)  # no val2017 folder
    assert str(tmp_path / "coco" / "val2017") in str(info.value)
    (tmp_path / "coco" / "train2017" / "000000000000.jpg").unlink()
    with pytest.raises(
        DataError, match=r"annotations\[0\] \(image_id 100\): image .*000000000000.jpg not found"
    ) as info:
        read_coco_captions(path)
    assert info.value.reason == "missing_image" and str(path) in str(info.value)
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON") as info:
        read_coco_captions(path)
    assert str(path) in str(info.value)


def test_builtin_image_corpus_loads(tmp_path):
    paths = write_image_corpus(tmp_path, train=4, heldout=2, size=16)
    captions, report = read_image_conversations(paths["captions"])
    assert len(captions) == 8 and report.files[str(paths["captions"])].read == {"llava": 8}
    assert all(len(c.images) == 1 and c.images[0].is_file() for c in captions)
    questions, _ = read_image_conversations(paths["questions"])
    assert len(questions) == 8 and all(c.messages[0]["content"].startswith("<image>\n") for c in questions)
    assert all(len(c.messages) >= 4 for c in questions)  # one conversation per picture and language: its questions


# -- real data: ../shared/data/vlm ---------------------------------------------------------------


@pytest.mark.realdata
def test_llamafactory_demo(shared_data):
    path = shared_data / "vlm" / "llamafactory_mllm_demo" / "mllm_demo.json"
    conversations, report = read_image_conversations(path)
    records = json.loads(path.read_text(encoding="utf-8"))
    assert len(conversations) == len(records) and report.skipped == {}
    for conversation, record in zip(conversations, records):
        assert [p.name for p in conversation.images] == [Path(name).name for name in record["images"]]
        assert all(p.is_file() for p in conversation.images)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["mllm_sft_single_image_example_data.jsonl", "mllm_pretrain_image_example_data.jsonl"])
def test_xtuner_examples(shared_data, name):
    path = shared_data / "vlm" / "xtuner" / name
    conversations, report = read_image_conversations(path)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(conversations) == len(lines) and report.files[str(path)].read == {"xtuner": len(lines)}
    for conversation, record in zip(conversations, lines):
        urls = [
            part["image_url"]["url"]
            for m in record["messages"]
            if isinstance(m["content"], list)
            for part in m["content"]
            if part["type"] == "image_url"
        ]
        assert [p.name for p in conversation.images] == [Path(url).name for url in urls]
        assert all(p.is_file() for p in conversation.images)
        assert "<IMG_CONTEXT>" not in json.dumps(conversation.messages, ensure_ascii=False)


@pytest.mark.realdata
def test_coco_mini_captions(shared_data):
    path = shared_data / "vlm" / "coco-mini" / "annotations" / "captions_train2017.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    conversations = read_coco_captions(path)
    assert len(conversations) == len(data["annotations"]) == 5 * len(data["images"])
    per_image = {}
    for conversation in conversations:
        (image,) = conversation.images
        per_image[image] = per_image.get(image, 0) + 1
    assert len(per_image) == len(data["images"]) and set(per_image.values()) == {5}
    assert all(image.is_file() and image.parent.name == "train2017" for image in per_image)
