import json

import numpy as np
import pytest
import torch

from tinylm.data.text import PackedWindows, build_token_shards, iter_eval_windows, load_shard_info, read_documents
from tinylm.io import DataError
from tinylm.tokenizer import train_tokenizer

DOCS = [f"Document {i}: the Zorble number {i} eats {'apples' if i % 2 else '苹果'}.\nA second line." for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, vocab_size=300)


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    return path


# -- readers ------------------------------------------------------------------------------------


def test_txt_blank_line_blocks(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n\r\n\r\nthree\n   \nfour".encode("utf-8"))
    assert list(read_documents(path)) == ["one\r\ntwo", "three", "four"]
    assert list(read_documents(path, txt_split="line")) == ["one", "two", "three", "four"]
    assert list(read_documents(path, txt_split="file")) == ["one\r\ntwo\r\n\r\n\r\nthree\n   \nfour"]
    with pytest.raises(DataError, match="txt_split 'para'"):
        read_documents(path, txt_split="para")


def test_jsonl_json_and_parquet(tmp_path, jsonl):
    assert list(read_documents(jsonl)) == DOCS
    as_json = tmp_path / "docs.json"
    as_json.write_text(json.dumps([{"content": d, "id": 1} for d in DOCS[:3]]), encoding="utf-8")
    assert list(read_documents(as_json, text_field="content")) == DOCS[:3]
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads .parquet")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[:5], "n": list(range(5))}), tmp_path / "docs.parquet", row_group_size=2)
    assert list(read_documents(tmp_path / "docs.parquet")) == DOCS[:5]


def test_gzip_compressed_text_reads_like_the_plain_file(tmp_path):
    """Pretraining reads .txt.gz, .jsonl.gz and .json.gz through the same reader as conversations do."""
    import gzip

    docs = ["The Zorble is red.", "咕噜兽是红色的。", "Line one\nline two"]
    plain = {
        "a.txt": "\n\n".join(docs),
        "b.jsonl": "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
        "c.json": json.dumps([{"text": d} for d in docs], ensure_ascii=False),
    }
    for name, text in plain.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with gzip.open(tmp_path / f"{name}.gz", "wt", encoding="utf-8") as f:
            f.write(text)
        assert list(read_documents(tmp_path / f"{name}.gz")) == list(read_documents(tmp_path / name)) == docs
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: not a readable gzip file"):
        list(read_documents(tmp_path / "broken.jsonl.gz"))


def test_empty_documents_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "kept"}\n\n{"text": ""}\n{"text": "  \\n "}\n{"text": "also kept"}\n', encoding="utf-8")
    assert list(read_documents(path)) == ["kept", "also kept"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:3: invalid JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no 'text' field \(found: 'body'\)"),
        (b'{"text": "ok"}\n{"text": 5}\n', r"bad\.jsonl:2: field 'text' is int, expected a string"),
        (b'["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl:2: byte 0xe9 at column 14 is not valid UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(read_documents(path))


def test_other_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        read_documents(tmp_path / "missing.txt")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type \.csv"):
        read_documents(tmp_path / "a.csv")
    (tmp_path / "bad.txt").write_bytes(b"fine\nfine\n\nbroken \xff here\n")
    with pytest.raises(DataError, match=r"bad\.txt:4: byte 0xff at column 8"):
        list(read_documents(tmp_path / "bad.txt"))
    (tmp_path / "bad.json").write_bytes(b'[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        list(read_documents(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text('{"text": "a"}')
    with pytest.raises(DataError, match=r"obj\.json: a JSON object with no list of records"):
        list(read_documents(tmp_path / "obj.json"))
    (tmp_path / "items.json").write_text('[{"text": "a"}, {"txt": "b"}]')
    with pytest.raises(DataError, match=r"items\.json:item 1: no 'text' field"):
        list(read_documents(tmp_path / "items.json"))


def test_bad_parquet_is_a_clear_error(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads .parquet")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(columns: body, n\)"):
        list(read_documents(tmp_path / "a.parquet"))
    with pytest.raises(DataError, match=r"a\.parquet:row 1: field 'n' is int, expected a string"):
        list(read_documents(tmp_path / "a.parquet", text_field="n"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet:row 2: field 'text' is null"):
        list(read_documents(tmp_path / "b.parquet"))
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"c\.parquet: not a readable parquet file"):
        list(read_documents(tmp_path / "c.parquet"))


# -- shards -------------------------------------------------------------------------------------


def test_shards_hold_every_document_once_with_eos(tokenizer, jsonl, tmp_path):
    info = build_token_shards([jsonl], tokenizer, tmp_path / "shards", val_fraction=0.1, seed=0)
    meta = info.meta
    assert info.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert meta["train_docs"] + meta["val_docs"] == len(DOCS) and meta["val_docs"] == 6
    texts = []
    for split in ("train", "val"):
        tokens = np.fromfile(info.directory / f"{split}.bin", dtype=np.uint16)
        starts = np.load(info.directory / f"{split}_docs.npy")
        assert len(tokens) == meta[f"{split}_tokens"] and len(starts) == meta[f"{split}_docs"]
        ends = [*starts[1:], len(tokens)]
        docs = [tokens[s:e].tolist() for s, e in zip(starts, ends)]
        assert all(d[-1] == tokenizer.eos_id and tokenizer.eos_id not in d[:-1] for d in docs)
        split_texts = [tokenizer.decode(d[:-1]) for d in docs]
        assert meta[f"{split}_bytes"] == sum(len(t.encode("utf-8")) for t in split_texts)
        texts.append(split_texts)
    train, val = texts
    assert sorted(train + val) == sorted(DOCS) and not set(train) & set(val)
    assert train == [d for d in DOCS if d in set(train)], "documents keep their order"


def test_validation_gets_at_least_one_document(tokenizer, tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("first document\n\nsecond document\n", encoding="utf-8")
    info = build_token_shards([path], tokenizer, tmp_path / "shards", val_fraction=0.01)
    assert (info.meta["train_docs"], info.meta["val_docs"]) == (1, 1)
    none = build_token_shards([path], tokenizer, tmp_path / "none", val_fraction=0)
    assert none.meta["val_docs"] == 0 and none.val_bin.stat().st_size == 0
    assert list(iter_eval_windows(none.val_bin, 8, none.dtype, 4)) == []


def test_split_depends_on_the_seed_not_on_file_order(tokenizer, jsonl, tmp_path):
    reversed_path = tmp_path / "reversed.jsonl"
    lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
    reversed_path.write_text("".join(reversed(lines)), encoding="utf-8")
    val_sets = []
    for name, path, seed in (("a", jsonl, 0), ("b", reversed_path, 0), ("c", jsonl, 1)):
        info = build_token_shards([path], tokenizer, tmp_path / name, val_fraction=0.1, seed=seed)
        val = np.fromfile(info.val_bin, dtype=info.dtype)
        val_sets.append(
            {tokenizer.decode(d) for d in np.split(val, np.flatnonzero(val == tokenizer.eos_id) + 1) if len(d)}
        )
    assert val_sets[0] == val_sets[1] != val_sets[2]


def test_shards_are_cached_until_an_input_changes(tokenizer, jsonl, tmp_path):
    out = tmp_path / "shards"
    first = build_token_shards([jsonl], tokenizer, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_token_shards([jsonl], tokenizer, out)
    assert again.meta == first.meta and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert sorted(stamps) == ["meta.json", "train.bin", "train_docs.npy", "val.bin", "val_docs.npy"]
    assert load_shard_info(out).meta == first.meta

    with open(jsonl, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    grown = build_token_shards([jsonl], tokenizer, out)
    assert grown.meta["train_docs"] + grown.meta["val_docs"] == len(DOCS) + 1
    other_seed = build_token_shards([jsonl], tokenizer, out, seed=5)
    assert other_seed.meta["fingerprint"] != grown.meta["fingerprint"]


def test_a_failed_build_leaves_no_files(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        build_token_shards([bad], tokenizer, tmp_path / "shards")
    assert list((tmp_path / "shards").iterdir()) == []
    with pytest.raises(DataError, match=r"absent\.jsonl: no such file"):
        build_token_shards([tmp_path / "absent.jsonl"], tokenizer, tmp_path / "shards")


def test_large_vocabularies_use_uint32(tmp_path):
    from tinylm.data.text import token_dtype

    assert token_dtype(6400) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(151_936) == np.uint32


# -- windows ------------------------------------------------------------------------------------


@pytest.fixture
def stream(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)  # token i at position i: windows are easy to read
    return path


def test_windows_are_packed_and_cover_an_epoch(stream):
    windows = PackedWindows(stream, seq_len=10, dtype="uint16", seed=0)
    batch = windows.next_batch(99)
    assert batch.dtype == torch.long and batch.shape == (99, 11)
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(99, 10, dtype=torch.long))
    assert sorted(batch[:, 0].tolist()) == list(range(0, 990, 10)), "each window once per epoch"
    assert windows.state_dict()["epoch"] == 0
    windows.next_batch(1)
    assert windows.state_dict()["epoch"] == 1


def test_same_seed_same_batches_other_seed_other_order(stream):
    a, b, c = (PackedWindows(stream, 10, np.uint16, seed=s) for s in (0, 0, 1))
    first = a.next_batch(8)
    assert torch.equal(first, b.next_batch(8)) and not torch.equal(first, c.next_batch(8))


def test_resume_from_state_dict_is_bit_identical(stream):
    windows = PackedWindows(stream, 10, np.uint16, seed=3)
    for _ in range(13):  # past the end of the first epoch
        windows.next_batch(7)
    state = windows.state_dict()
    expected = [windows.next_batch(7) for _ in range(20)]
    resumed = PackedWindows(stream, 10, np.uint16, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # states travel through JSON in checkpoints
    assert all(torch.equal(x, resumed.next_batch(7)) for x in expected)


def test_resume_refuses_other_data(stream):
    state = PackedWindows(stream, 10, np.uint16, seed=3).state_dict()
    with pytest.raises(ValueError, match="saved data position"):
        PackedWindows(stream, 20, np.uint16, seed=3).load_state_dict(state)


def test_ranks_take_disjoint_windows(stream):
    ranks = [PackedWindows(stream, 10, np.uint16, seed=0, rank=r, world_size=3) for r in range(3)]
    starts = [set(w.next_batch(33)[:, 0].tolist()) for w in ranks]
    assert all(len(s) == 33 for s in starts)
    assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])
    assert len(starts[0] | starts[1] | starts[2]) == 99


def test_too_little_data_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.bin"
    np.arange(5, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="5 tokens do not make one window of 11 tokens"):
        PackedWindows(path, 10, np.uint16, seed=0)
    with pytest.raises(FileNotFoundError, match=r"absent\.bin: missing token shard"):
        PackedWindows(tmp_path / "absent.bin", 10, np.uint16, seed=0)


def test_eval_windows_are_sequential_and_cover_the_tail(stream):
    windows = list(iter_eval_windows(stream, 100, np.uint16, None))
    assert [w[0].item() for w in windows] == list(range(0, 1000, 100)) and len(windows[-1]) == 100
    assert all(len(w) == 101 for w in windows[:-1])
    assert [w[0].item() for w in iter_eval_windows(stream, 100, np.uint16, 3)] == [0, 100, 200]
