"""``--data hf:NAME[:CONFIG][@SPLIT]``: datasets of the Hugging Face Hub through the one record reader,
offline. Small datasets are made with ``datasets.Dataset.from_list``: saved with ``save_to_disk``, written
as a Hub repository's folder of parquet files (read by streaming, as pretraining reads), or put into a
datasets cache under a Hub id and read with the Hub switched off (in a subprocess: the library reads
``HF_HUB_OFFLINE`` when it is imported)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL, tiny_chat_dir

from tinylm.cli import main
from tinylm.data.chat import read_conversations
from tinylm.data.image_chat import read_image_conversations
from tinylm.data.preference import read_preferences
from tinylm.data.text import build_token_shards, read_documents
from tinylm.hub.data import HubSource, parse
from tinylm.io import DataError, iter_records, read_records, source_key, source_name
from tinylm.tokenizer import train_tokenizer
from tinylm.train.pretrain import DataConfig
from tinylm.train.stage import data_facts

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The fox jumps over the dog.", "狐狸跳过了狗。", "Two and three make five.", "二加三等于五。"]
USER, BOT = {"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."}
USER_ZH, BOT_ZH = {"role": "user", "content": "天空是什么颜色？"}, {"role": "assistant", "content": "蓝色。"}
TRAIN = [
    "--train.seq_len=32",
    "--train.batch_size=4",
    "--train.eval_every=0",
    "--train.progress=false",
    "--train.warmup_steps=1",
    "--train.save_every=0",
    "--train.device=cpu",
    "--train.max_steps=2",
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """The datasets cache of this test alone (what load_dataset writes goes there, not into ~/.cache)."""
    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def saved(folder: Path, **splits: list[dict]) -> str:
    """``hf:FOLDER`` of a DatasetDict of these splits, saved with save_to_disk."""
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(folder)
    return f"hf:{folder}"


def repo_folder(folder: Path, **splits: list[dict]) -> Path:
    """A dataset laid out as a Hub repository is: data/<split>-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True)
    for name, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(folder / "data" / f"{name}-00000-of-00001.parquet")
    return folder


def test_the_form_and_how_errors_name_a_source():
    assert parse("hf:HuggingFaceH4/ultrachat_200k@train_sft") == HubSource(
        "HuggingFaceH4/ultrachat_200k", None, "train_sft"
    )
    assert parse("hf:wikitext:wikitext-2-raw-v1@train") == HubSource("wikitext", "wikitext-2-raw-v1", "train")
    assert parse("hf:Anthropic/hh-rlhf") == HubSource("Anthropic/hh-rlhf")
    assert parse("hf:Anthropic/hh-rlhf").label == "hf:Anthropic/hh-rlhf@train"  # the default split, written out
    for bad in ("hf:", "hf:name:@train", "hf:name@"):
        with pytest.raises(DataError, match=r"expected hf:NAME\[:CONFIG\]\[@SPLIT\]"):
            iter_records(bad)


def test_pretraining_text_streams_from_a_repository_folder(tmp_path, datasets_cache):
    folder = repo_folder(tmp_path / "corpus", train=[{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    assert list(read_documents(f"hf:{folder}")) == TEXTS  # English and Chinese, in order
    assert not list(datasets_cache.rglob("*.arrow"))  # streamed: nothing was downloaded into the cache
    assert [record for _, record in iter_records(f"hf:{folder}")][1] == {"text": TEXTS[1], "id": 1}  # loaded
    assert list(datasets_cache.rglob("*.arrow"))  # ... into the cache, where a stream now reads it
    assert list(read_documents(f"hf:{folder}@train")) == TEXTS
    with pytest.raises(DataError, match=r"corpus@train: no column 'content' \(columns: text, id\)"):
        read_documents(f"hf:{folder}", text_field="content")


def test_a_saved_dataset_dict_and_a_saved_dataset(tmp_path):
    source = saved(tmp_path / "saved", train=[{"text": t} for t in TEXTS], test=[{"text": "held out"}])
    assert list(read_documents(source)) == TEXTS
    assert list(read_documents(f"{source}@test")) == ["held out"]
    datasets.Dataset.from_list([{"text": "alone"}]).save_to_disk(tmp_path / "one")
    assert list(read_documents(f"hf:{tmp_path / 'one'}")) == ["alone"]  # a saved Dataset is its own split
    assert list(read_documents(f"hf:{tmp_path / 'one'}@train")) == ["alone"]


def test_a_missing_split_config_or_folder_lists_what_there_is(tmp_path):
    source = saved(tmp_path / "saved", train=[{"text": "a"}], validation=[{"text": "b"}])
    with pytest.raises(DataError, match=r"saved@test: no split 'test'; expected one of train, validation") as info:
        iter_records(f"{source}@test")
    assert info.value.reason == "missing_split"
    folder = repo_folder(tmp_path / "two", en=[{"text": "a"}], zh=[{"text": "甲"}])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n  - split: train\n    path: data/en-*.parquet\n"
        "- config_name: zh\n  data_files:\n  - split: train\n    path: data/zh-*.parquet\n---\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=rf"no config 'fr'; expected one of hf:{folder}:en, hf:{folder}:zh"):
        iter_records(f"hf:{folder}:fr")
    with pytest.raises(DataError, match=rf"two has several configs; expected one of hf:{folder}:en@train, "):
        iter_records(f"hf:{folder}@train")
    assert list(read_documents(f"hf:{folder}:zh")) == ["甲"]
    with pytest.raises(DataError, match=r"hf:\./nowhere@train: no such folder './nowhere'; expected a Hub dataset id"):
        iter_records("hf:./nowhere")


def test_sft_conversations_in_openai_and_sharegpt_layouts(tmp_path):
    exchanges = ([USER, BOT], [USER_ZH, BOT_ZH])
    openai = saved(
        tmp_path / "openai", train_sft=[{"messages": m, "prompt_id": str(i)} for i, m in enumerate(exchanges)]
    )
    sharegpt = [
        {"conversations": [{"from": "human", "value": user["content"]}, {"from": "gpt", "value": bot["content"]}]}
        for user, bot in exchanges
    ]
    conversations, report = read_conversations([f"{openai}@train_sft", saved(tmp_path / "sharegpt", train=sharegpt)])
    assert [c.messages for c in conversations] == [[USER, BOT], [USER_ZH, BOT_ZH]] * 2
    assert conversations[1].source == f"{openai}@train_sft:row 1"
    assert report.files[f"{openai}@train_sft"].read == {"openai": 2}
    assert report.files[f"hf:{tmp_path / 'sharegpt'}"].read == {"sharegpt": 2}


def test_a_bad_row_is_named_by_its_number(tmp_path):
    rows = [{"messages": [USER, BOT]}] * 3 + [{"messages": [USER, USER]}, {"messages": [BOT]}]
    source = saved(tmp_path / "chats", train=rows)
    with pytest.raises(DataError, match=r"chats@train:row 3: messages\[1\].role: two user turns in a row"):
        read_conversations(source)
    conversations, report = read_conversations(source, skip_bad=True)
    assert len(conversations) == 3 and report.skipped == {"alternation": 2}
    assert report.files[source].first_error["alternation"].startswith(f"{source}@train:row 3: ")


def test_preference_pairs(tmp_path):
    hh = {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."}
    minimind = {"chosen": [USER_ZH, BOT_ZH], "rejected": [USER_ZH, {"role": "assistant", "content": "绿色。"}]}
    pairs, _ = read_preferences([saved(tmp_path / "hh", train=[hh]), saved(tmp_path / "mm", test=[minimind]) + "@test"])
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs] == [
        ("Hi?", "Hello!", "Go away."),
        ("天空是什么颜色？", "蓝色。", "绿色。"),
    ]
    assert pairs[1].source == f"hf:{tmp_path / 'mm'}@test:row 0"


def test_images_arrive_as_bytes_however_datasets_would_decode_them(tmp_path):
    from PIL import Image

    picture = Image.new("RGB", (8, 8), (200, 30, 30))
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]
    rows = [{"image": picture, "conversations": turns}]
    source = saved(tmp_path / "pictures", train=rows)
    assert isinstance(datasets.load_from_disk(tmp_path / "pictures")["train"][0]["image"], Image.Image)  # decoded there
    (conversation,), _ = read_image_conversations(source)
    assert isinstance(conversation.images[0], bytes)  # the PNG bytes as stored, not a PIL image
    assert Image.open(io.BytesIO(conversation.images[0])).getpixel((0, 0)) == (200, 30, 30)


def test_token_shards_are_keyed_by_the_dataset_and_the_card_names_it(tmp_path):
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=300)
    source = saved(tmp_path / "corpus", train=[{"text": t} for t in TEXTS * 5])
    first = build_token_shards([source], tokenizer, tmp_path / "shards")
    assert first.meta["sources"] == [source] and first.train_tokens + first.val_tokens > 0
    assert build_token_shards([source], tokenizer, tmp_path / "shards").meta == first.meta  # cached
    key = source_key(source)
    saved(tmp_path / "corpus", train=[{"text": t} for t in TEXTS * 6])  # the same folder, other rows
    assert source_key(source) != key
    assert build_token_shards([source], tokenizer, tmp_path / "shards").train_tokens > first.train_tokens
    section = DataConfig(files=["hf:HuggingFaceH4/ultrachat_200k@train_sft", f"{source}@train", source, "a/b.jsonl"])
    assert data_facts(section) == (["HuggingFaceH4/ultrachat_200k", "corpus", "b.jsonl"], [])  # each once
    assert source_name("hf:wikitext:wikitext-2-raw-v1@test") == "wikitext"


def test_a_run_is_sized_to_a_hub_dataset_by_the_size_datasets_records(tmp_path, monkeypatch):
    from tinylm.train import sizing

    source = saved(tmp_path / "corpus", train=[{"text": t} for t in TEXTS])
    assert sizing.corpus_bytes([source]) == sum(len(t.encode("utf-8")) for t in TEXTS)
    monkeypatch.setattr(sizing, "SAMPLE_BYTES", 10)  # the first document is enough: the rest by size
    assert sizing.corpus_bytes([source, source]) == 2 * len(TEXTS[0].encode("utf-8"))


def test_hub_datasets_are_read_where_tables_are_and_need_the_library(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"hf:org/name: a Hub dataset is not read here; expected \.txt or \.jsonl"):
        iter_records("hf:org/name", types=(".txt", ".jsonl"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match=r'hf:org/name@train: reading Hub datasets needs the datasets library: '
                                        r'pip install "tinylm\[datasets\]"') as info:  # fmt: skip
        read_records(["hf:org/name"], lambda record: ("row", record), skip_bad=True)
    assert info.value.reason == "missing_datasets"


def test_pretrain_and_sft_on_saved_datasets_end_to_end(tmp_path):
    corpus = saved(tmp_path / "corpus", train=[{"text": f"{t} {i}"} for i in range(50) for t in TEXTS])
    assert main(["pretrain", "--data", corpus, "--out", str(tmp_path / "base"), *TINY_MODEL, *TRAIN]) == 0
    card = (tmp_path / "base" / "final" / "README.md").read_text(encoding="utf-8")
    assert "datasets:\n- corpus\n" in card
    chats = saved(tmp_path / "chats", train_sft=[{"messages": [USER, BOT]}, {"messages": [USER_ZH, BOT_ZH]}] * 10)
    model = tiny_chat_dir(tmp_path / "chat-model")
    assert (
        main(
            [
                "sft",
                "--init",
                str(model),
                "--data",
                f"{chats}@train_sft",
                "--out",
                str(tmp_path / "sft"),
                *TRAIN,
                "--train.seq_len=128",
            ]
        )
        == 0
    )
    assert "chats" in (tmp_path / "sft" / "final" / "README.md").read_text(encoding="utf-8")


# -- Hub ids, with the Hub switched off (a subprocess: HF_HUB_OFFLINE is read when datasets is imported) --


def offline(tmp_path: Path, cache: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(cache)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_hub_id_that_is_not_cached_offline_is_one_clear_line(tmp_path):
    done = offline(tmp_path, tmp_path / "empty-cache", "-m", "tinylm.cli", "tokenizer", "train", "--data",
                   "hf:tinylm-tests/nowhere", "--vocab-size", "300", "--out", str(tmp_path / "tok"))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: hf:tinylm-tests/nowhere@train: offline mode is on (HF_HUB_OFFLINE")
    assert f"not in the datasets cache ({tmp_path / 'empty-cache'})" in line
    assert "datasets.load_dataset('tinylm-tests/nowhere', split='train')" in line


def test_a_hub_id_in_the_datasets_cache_reads_offline(tmp_path):
    """The cache as ``load_dataset("tinylm-tests/tiny")`` leaves it: <cache>/tinylm-tests___tiny/default/
    0.0.0/<revision>/ (built here from a local folder named like the dataset, then moved under the id)."""
    cache = tmp_path / "cache"
    folder = repo_folder(tmp_path / "tiny", train=[{"text": t} for t in TEXTS], test=[{"text": "held out"}])
    builder = datasets.load_dataset_builder(str(folder), cache_dir=str(cache))
    builder.download_and_prepare()
    (cache / "tiny").rename(cache / "tinylm-tests___tiny")
    script = (
        "import json; from tinylm.data.text import read_documents; from tinylm.io import iter_records, source_key\n"
        "print(json.dumps([list(read_documents('hf:tinylm-tests/tiny')),\n"
        "                  [r for _, r in iter_records('hf:tinylm-tests/tiny@test')],\n"
        "                  source_key('hf:tinylm-tests/tiny')]))"
    )
    done = offline(tmp_path, cache, "-c", script)
    assert done.returncode == 0, done.stderr
    documents, test_rows, key = json.loads(done.stdout)
    assert documents == TEXTS and test_rows == [{"text": "held out"}]
    assert key == [
        "hf",
        {"dataset": "tinylm-tests/tiny", "config": "default", "split": "train", "revision": builder.hash},
    ]
