"""Image-text training data for a LLaVA-style vision-language model, in the common formats → one form.

    read_image_conversations(paths, image_root=None, skip_bad=False) → (conversations, report)
    read_coco_captions(annotations_json, image_dir=None)             → conversations

Every reader produces ``ImageConversation(messages, images, source)``. ``messages`` are valid by the
rules of ``tinylm.data.chat`` (an optional system message, then user and assistant turns alternating,
ending with the assistant), plain text in which each image is marked by one ``<image>`` tag, in user
(or system) turns only. ``images`` has one entry per tag, in the order of the tags: a ``pathlib.Path``
to an existing file, or the raw bytes of an image stored in the data (parquet). Images are not opened
here, only checked to exist (``tinylm.image_processor.load_image`` reads them when training).

The formats, one record each (detected per record; the report counts records by these names):

    llava         {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                   {"from": "gpt", "value": "..."}]}
                  LLaVA, MiniMind-V and tinylm's built-in images. "image" may be a list, or MiniMind-V's
                  comma-separated string "a.jpg, b.jpg" when the tags ask for that many images; role/content
                  messages and "messages" instead of "conversations" are read too.
    llamafactory  {"messages": [{"role": "user", "content": "<image>Who are they?"}, ...], "images": [...]}
                  tags anywhere in the user turns; ShareGPT-style messages too
    xtuner        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.jpg"}},
                   {"type": "text", "text": "<IMG_CONTEXT>\\n..."}]}, {"role": "assistant", "content": "..."}]}
                  content parts: the image parts give the images in order and each "<IMG_CONTEXT>" (or
                  "<image>") in the text becomes a tag; a message with image parts and no placeholder gets one
                  "<image>\\n" per image at its start. Parts {"type": "image"} without a source (HF/TRL datasets)
                  take their images from the record's "images".
                  XTuner's "pretrain" message (images and a text that is learned whole) becomes a caption-style
                  pair: a user turn holding only the tags ("<image>\\n<image>") and an assistant turn holding
                  the text with the placeholders removed (the pieces between them stripped, joined by
                  newlines). tinylm learns assistant turns only, so this learns the text given the images, as
                  LLaVA's stage-1 captions do; where the images sat in the text is not kept.
    caption       {"image": ..., "caption": "..."} (or "text"): user "<image>\\n" + ``prompt`` (one tag per
                  image), assistant the caption, stripped
    minimind-v    parquet rows {"conversations": (a list, or a JSON string of one), "image_bytes": ...}
    text          a record without images: a text-only conversation, which may hold no tag

All take chat.py's optional "system" field. In parquet an image is raw bytes, a struct {"bytes", "path"}
as HF datasets writes it (the bytes, or the path when they are null), or a path. Files as in chat.py:
.jsonl, .json, .parquet, and .jsonl.gz, .json.gz; and Hub datasets (``hf:NAME[:CONFIG][@SPLIT]``), whose
image columns arrive as those structs (``tinylm.hub.data``).

A relative image path is looked up under ``image_root`` if given, else the data file's folder, and when
not there, with its first folder dropped: XTuner's examples name "resource/x.jpg" for a file that lies
beside the .jsonl. A missing image is an error naming every place tried.

Skip reasons beyond chat.py's (see ``ReadReport``): missing_image (the file does not exist),
image_count (the number of tags differs from the number of images), image_in_reply (a tag in an
assistant turn).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tinylm.data.chat import (
    MESSAGE_LISTS,
    RECORD_FILES,
    ROLES,
    Turn,
    as_object,
    check_text_only,
    get_field,
    kind_of,
    message_list,
    message_list_format,
    openai_turns,
    role_error,
    sharegpt_turns,
    validate_turns,
    with_system_field,
)
from tinylm.io import DataError, Paths, ReadReport, is_hub_source, read_records

IMAGE_TAG = "<image>"
XTUNER_TAG = "<IMG_CONTEXT>"
CAPTION_PROMPT = "Describe the picture."
IMAGE_FIELDS = {"image": "llava", "images": "llamafactory", "image_bytes": "minimind-v"}
CAPTION_FIELDS = ("caption", "text")


@dataclass
class ImageConversation:
    """Validated messages whose ``<image>`` tags stand for ``images`` (paths or bytes), in order, and
    where they came from ("path:line", "path:item N", "path:row N", or "path:annotation N" for COCO)."""

    messages: list[dict]
    images: list
    source: str


def read_image_conversations(
    paths: Paths,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    prompt: str = CAPTION_PROMPT,
) -> tuple[list[ImageConversation], ReadReport]:
    """Every valid image conversation of ``paths``, in order, and a report of what was read and skipped.

    Relative image paths are looked up under ``image_root``, by default each data file's folder (for a
    Hub dataset, ``hf:...``, the current folder: its images are usually bytes in the rows). A bad
    record raises ``DataError``; with ``skip_bad`` it is skipped and counted by reason. ``prompt``
    is the user's request in caption records.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    conversations, report, checked = [], ReadReport(), {}
    for path in map(Path, paths):
        beside = Path() if is_hub_source(path) else path.parent
        root = Path(image_root) if image_root is not None else beside
        found, part = read_records(
            [path],
            lambda record, root=root: _normalize(record, root, checked, prompt),
            skip_bad,
            **RECORD_FILES,
        )
        conversations += [ImageConversation(messages, images, where) for where, (messages, images) in found]
        report.add(part)
    return conversations, report


def _normalize(record, root: Path, checked: dict, prompt: str) -> tuple[str, tuple[list[dict], list]]:
    """(the record's format, (its validated messages, its images))."""
    if isinstance(record, list):  # a bare message list (XTuner's text-only records)
        record = {"messages": record}
    if not isinstance(record, dict):
        raise DataError(f"{kind_of(record)}; expected an object (an image-text record)", "wrong_type")
    image_field, sources = _image_sources(record)
    check_text_only({key: value for key, value in record.items() if key not in IMAGE_FIELDS})
    caption_field = next((key for key in CAPTION_FIELDS if isinstance(record.get(key), str)), None)
    if any(key in record for key in MESSAGE_LISTS):
        record = _parsed_messages(record)
        key, messages = message_list(record)
        if _has_parts(messages):
            turns, part_sources = _xtuner_turns(record, key, messages)
            record_format, sources = "xtuner", sources + part_sources
            image_field = image_field or f"{key} image parts"
        else:
            turns = (sharegpt_turns if message_list_format(messages) == "sharegpt" else openai_turns)(record)
            record_format = IMAGE_FIELDS[image_field] if image_field else "text"
    elif caption_field:
        if not sources:
            raise DataError(
                f"{caption_field}: a caption without an image; expected an 'image' or 'images' field", "missing_field"
            )
        caption = record[caption_field].strip()
        turns = with_system_field(
            record,
            [
                Turn("user", f"{IMAGE_TAG}\n" * len(sources) + prompt, "prompt", "prompt"),
                Turn("assistant", caption, caption_field, caption_field),
            ],
        )
        record_format = "caption"
    else:
        raise DataError(
            f"cannot tell the format from the fields {', '.join(map(repr, record)) or '(none)'}; "
            "expected 'conversations' or 'messages', or 'image' with a 'caption'",
            "unknown_format",
        )
    messages = validate_turns(turns)
    tags = _check_tags(turns, messages)
    if image_field == "image" and len(sources) == 1 and isinstance(sources[0][1], str) and tags > 1:
        names = [name.strip() for name in sources[0][1].split(",")]  # MiniMind-V: "a.jpg, b.jpg"
        sources = [(f"image[{i}]", name) for i, name in enumerate(names)] if len(names) == tags else sources
    if tags != len(sources):
        where = f"{image_field}: {len(sources)} image(s)" if image_field else "no 'image' or 'images' field (text only)"
        raise DataError(
            f"{where} but {tags} {IMAGE_TAG} tag(s) in the messages; expected one tag per image, in order",
            "image_count",
        )
    images = [raw if isinstance(raw, bytes) else _existing(raw, label, root, checked) for label, raw in sources]
    return record_format, (messages, images)


def _image_sources(record: dict) -> tuple[str | None, list[tuple[str, bytes | str]]]:
    """(the field holding the record's images, [(label, bytes or path)]); (None, []) without images."""
    fields = [key for key in IMAGE_FIELDS if record.get(key) not in (None, [], "")]
    if len(fields) > 1:
        raise DataError(f"both {' and '.join(map(repr, fields))}; expected images in one field", "wrong_type")
    if not fields:
        return None, []
    value = record[fields[0]]
    items = [(f"{fields[0]}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(fields[0], value)]
    return fields[0], [(label, _image_source(item, label)) for label, item in items]


def _image_source(item, label: str) -> bytes | str:
    """Raw bytes or a path, from bytes, a path or an HF datasets image struct {"bytes", "path"}."""
    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str) and item.strip():
        return item
    raise DataError(
        f"{label}: {kind_of(item)}; expected an image path, image bytes or {{'bytes', 'path'}}", "wrong_type"
    )


def _existing(name: str, label: str, root: Path, checked: dict) -> Path:
    """The file an image path names: absolute as is; relative under ``root``, else with its first folder
    dropped. ``checked`` remembers what exists, since big corpora name the same images many times."""
    path = Path(name)
    tried = [path] if path.is_absolute() else [root / path]
    if not path.is_absolute() and len(path.parts) > 1 and path.parts[0] != "..":
        tried.append(root.joinpath(*path.parts[1:]))
    for candidate in tried:
        if candidate not in checked:
            checked[candidate] = candidate.is_file()
        if checked[candidate]:
            return candidate
    raise DataError(f"{label}: image {name!r} not found (tried {', '.join(map(str, tried))})", "missing_image")


def _parsed_messages(record: dict) -> dict:
    """The record with a message list stored as a JSON string (MiniMind-V's parquet) parsed."""
    key = next(key for key in MESSAGE_LISTS if key in record)
    if not isinstance(record[key], str):
        return record
    try:
        return {**record, key: json.loads(record[key])}
    except json.JSONDecodeError as e:
        raise DataError(
            f"{key}: a string that is not JSON ({e.msg}); expected a list of messages", "invalid_json"
        ) from None


def _has_parts(messages) -> bool:
    """Whether a message list is XTuner's: a "pretrain" message, or content parts that are not all text."""
    return isinstance(messages, list) and any(
        isinstance(m, dict)
        and (
            m.get("role") == "pretrain"
            or (
                isinstance(m.get("content"), list)
                and any(not isinstance(p, dict) or p.get("type") != "text" for p in m["content"])
            )
        )
        for m in messages
    )


def _xtuner_turns(record: dict, key: str, messages: list) -> tuple[list[Turn], list[tuple[str, bytes | str]]]:
    """Turns with tags where the images go, and the images of the image parts (see the module docstring)."""
    turns, sources = [], []
    for index, message in enumerate(messages):
        label = f"{key}[{index}]"
        message = as_object(message, label)
        role = get_field(message, "role", label)
        if role not in (*ROLES, "pretrain"):
            raise role_error(f"{label}.role", role, (*ROLES, "pretrain"))
        content_field = f"{label}.content"
        text, count, found = _parts(get_field(message, "content", label), content_field)
        sources += found
        text = text.replace(XTUNER_TAG, IMAGE_TAG) if isinstance(text, str) else text  # else: validate_turns says
        placeholders = text.count(IMAGE_TAG) if isinstance(text, str) else 0
        if count and placeholders not in (0, count):
            raise DataError(
                f"{content_field}: {count} image part(s) but {placeholders} {XTUNER_TAG} (or "
                f"{IMAGE_TAG}) placeholder(s); expected one per image part, or none",
                "image_count",
            )
        if role == "pretrain":
            if not count:
                raise DataError(
                    f"{content_field}: a 'pretrain' message without images; expected image parts and a text",
                    "image_count",
                )
            caption = "\n".join(piece.strip() for piece in text.split(IMAGE_TAG) if piece.strip())
            turns += [
                Turn("user", "\n".join([IMAGE_TAG] * count), f"{label}.role", content_field),
                Turn("assistant", caption, f"{label}.role", content_field),
            ]
        else:
            text = f"{IMAGE_TAG}\n" * count + text if count and not placeholders else text
            turns.append(Turn(role, text, f"{label}.role", content_field))
    return with_system_field(record, turns), sources


def _parts(content, label: str) -> tuple[object, int, list[tuple[str, bytes | str]]]:
    """(the text, the number of image parts, the images those parts name) of a message's content."""
    if not isinstance(content, list):
        return content, 0, []
    texts, count, sources = [], 0, []
    for index, part in enumerate(content):
        part_label = f"{label}[{index}]"
        part = as_object(part, part_label)
        kind = part.get("type")
        if kind == "text":
            text = next((part[key] for key in ("text", "value") if part.get(key) is not None), None)
            if not isinstance(text, str):
                raise DataError(f"{part_label}: no 'text' string; expected a text part", "missing_field")
            texts.append(text)
        elif kind in ("image_url", "image"):
            count += 1
            source = part.get(kind)
            if isinstance(source, dict):
                source = source.get("url") if kind == "image_url" else source
            if source is not None:  # {"type": "image"} alone takes its image from the record's "images"
                sources.append((f"{part_label}.{kind}", _image_source(source, f"{part_label}.{kind}")))
        else:
            raise DataError(
                f"{part_label}.type: {kind!r} content is not supported; expected 'text', 'image_url' or 'image' parts",
                "unsupported",
            )
    return "".join(texts), count, sources


def _check_tags(turns: list[Turn], messages: list[dict]) -> int:
    """The number of image tags; an error if an assistant turn holds one."""
    for turn, message in zip(turns, messages):
        if message["role"] == "assistant" and IMAGE_TAG in message["content"]:
            raise DataError(
                f"{turn.content_field}: an {IMAGE_TAG} tag in an assistant turn; expected images "
                "only in the user's turns",
                "image_in_reply",
            )
    return sum(message["content"].count(IMAGE_TAG) for message in messages)


# -- COCO captions --------------------------------------------------------------------------------


def read_coco_captions(
    annotations_json: str | Path, image_dir: str | Path | None = None, prompt: str = CAPTION_PROMPT
) -> list[ImageConversation]:
    """One conversation per caption of a COCO ``captions_<split>.json``, in the order of its annotations:
    user "<image>\\n" + ``prompt``, assistant the caption (stripped); source "path:annotation N".

    ``image_dir`` defaults to the split's folder beside the annotations folder (captions_train2017.json in
    annotations/ → ../train2017), or inside it. Every image file must exist; errors name the file.
    """
    path = Path(annotations_json)
    try:
        return _coco_captions(path, image_dir, prompt)
    except DataError as e:
        raise DataError(f"{path}: {e}", e.reason) from None


def _coco_captions(path: Path, image_dir, prompt: str) -> list[ImageConversation]:
    if not path.is_file():
        raise DataError("no such file", "missing_file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"invalid JSON ({e}); expected a COCO captions file", "invalid_json") from None
    data = as_object(data, "the top level")
    folder = _coco_image_dir(path) if image_dir is None else Path(image_dir)
    if not folder.is_dir():
        raise DataError(f"image_dir {folder}: no such folder", "missing_image")
    files = {}
    for index, image in enumerate(_coco_list(data, "images")):
        image = as_object(image, f"images[{index}]")
        files[get_field(image, "id", f"images[{index}]")] = get_field(image, "file_name", f"images[{index}]")
    conversations, checked = [], {}
    for index, annotation in enumerate(_coco_list(data, "annotations")):
        label = f"annotations[{index}]"
        annotation = as_object(annotation, label)
        image_id = get_field(annotation, "image_id", label)
        if image_id not in files:
            raise DataError(f"{label}.image_id: {image_id!r} is not the id of any of 'images'", "missing_image")
        file = folder / files[image_id]
        if file not in checked:
            checked[file] = file.is_file()
        if not checked[file]:
            raise DataError(f"{label} (image_id {image_id}): image {file} not found", "missing_image")
        caption = get_field(annotation, "caption", label)
        turns = [
            Turn("user", f"{IMAGE_TAG}\n{prompt}", "prompt", "prompt"),
            Turn(
                "assistant",
                caption.strip() if isinstance(caption, str) else caption,
                f"{label}.caption",
                f"{label}.caption",
            ),
        ]
        messages = validate_turns(turns)
        if _check_tags(turns, messages) != 1:
            raise DataError(f"prompt {prompt!r}: holds an {IMAGE_TAG} tag; expected the one image only", "image_count")
        conversations.append(ImageConversation(messages, [file], f"{path}:annotation {index}"))
    return conversations


def _coco_list(data: dict, key: str) -> list:
    value = get_field(data, key)
    if not isinstance(value, list):
        raise DataError(f"{key}: {kind_of(value)}; expected a list", "wrong_type")
    return value


def _coco_image_dir(path: Path) -> Path:
    """The folder of the split that ``captions_<split>.json`` names: beside its folder, or inside it."""
    match = re.fullmatch(r"captions_(\w+)\.json", path.name)
    if not match:
        raise DataError(
            "cannot tell the image folder from the file name (expected captions_<split>.json); pass image_dir",
            "missing_image",
        )
    tried = [path.parent.parent / match[1], path.parent / match[1]]
    folder = next((folder for folder in tried if folder.is_dir()), None)
    if folder is None:
        raise DataError(
            f"no image folder for split {match[1]!r} (tried {', '.join(map(str, tried))}); pass image_dir",
            "missing_image",
        )
    return folder
