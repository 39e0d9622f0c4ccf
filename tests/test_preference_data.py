import gzip
import json

import pytest
from conftest import write_jsonl

from tinylm.data.preference import PreferencePair, detect_preference_format, read_preferences
from tinylm.io import DataError

SYSTEM = {"role": "system", "content": "You are helpful. 你是一个乐于助人的助手。"}
USER_EN = {"role": "user", "content": "What is the capital of France?"}
BOT_EN = {"role": "assistant", "content": "Paris."}
USER_ZH = {"role": "user", "content": "法国的首都是哪里？"}
GOOD_ZH, BAD_ZH = "巴黎。", "伦敦。"
GOOD_EN, BAD_EN = "Paris is the capital of France.", "I don't know."

MINIMIND = {
    "chosen": [USER_ZH, {"role": "assistant", "content": GOOD_ZH}],
    "rejected": [USER_ZH, {"role": "assistant", "content": BAD_ZH}],
}
LLAMAFACTORY = {
    "conversations": [{"from": "human", "value": USER_EN["content"]}],
    "chosen": {"from": "gpt", "value": GOOD_EN},
    "rejected": {"from": "gpt", "value": BAD_EN},
}
MEDICALGPT = {"conversations": [{"from": "human", "value": USER_ZH["content"]}], "chosen": GOOD_ZH, "rejected": BAD_ZH}
HH = {
    "chosen": f"\n\nHuman: {USER_EN['content']}\n\nAssistant: {GOOD_EN}",
    "rejected": f"\n\nHuman: {USER_EN['content']}\n\nAssistant: {BAD_EN}",
}


def read_one(tmp_path, record, **kwargs) -> PreferencePair:
    pairs, _ = read_preferences(write_jsonl(tmp_path / "one.jsonl", [record]), **kwargs)
    assert len(pairs) == 1
    return pairs[0]


def error_of(tmp_path, records, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_preferences(write_jsonl(tmp_path / "bad.jsonl", records), **kwargs)
    return info.value


def hh(*turns):
    """An hh-rlhf transcript from (speaker, text) pairs."""
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


# -- formats ------------------------------------------------------------------------------------


def test_each_format_is_detected_and_read(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [MINIMIND, LLAMAFACTORY, MEDICALGPT, HH])
    pairs, report = read_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([USER_ZH], GOOD_ZH, BAD_ZH),
        ([USER_EN], GOOD_EN, BAD_EN),
        ([USER_ZH], GOOD_ZH, BAD_ZH),
        ([USER_EN], GOOD_EN, BAD_EN),
    ]
    assert [p.source for p in pairs] == [f"{path}:{n}" for n in range(1, 5)]
    assert report.files[str(path)].read == {"minimind": 1, "llamafactory": 2, "hh-rlhf": 1}
    assert report.read == 4 and not report.skipped
    assert [detect_preference_format(r) for r in (MINIMIND, LLAMAFACTORY, MEDICALGPT, HH)] == [
        "minimind",
        "llamafactory",
        "llamafactory",
        "hh-rlhf",
    ]
    for forced in ("minimind", "llamafactory", "hh-rlhf"):  # forcing a record's own format changes nothing
        record = {"minimind": MINIMIND, "llamafactory": LLAMAFACTORY, "hh-rlhf": HH}[forced]
        assert read_one(tmp_path, record, format=forced) == read_one(tmp_path, record)


def test_llamafactory_variants(tmp_path):
    openai = {
        "system": SYSTEM["content"],
        "messages": [USER_EN, BOT_EN, USER_ZH],
        "chosen": {"role": "assistant", "content": GOOD_ZH},
        "rejected": {"role": "assistant", "content": BAD_ZH},
    }
    pair = read_one(tmp_path, openai)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([SYSTEM, USER_EN, BOT_EN, USER_ZH], GOOD_ZH, BAD_ZH)
    sharegpt_system = {
        **LLAMAFACTORY,
        "conversations": [{"from": "system", "value": SYSTEM["content"]}, *LLAMAFACTORY["conversations"]],
    }
    assert read_one(tmp_path, sharegpt_system).prompt == [SYSTEM, USER_EN]


def test_multi_turn_prompts_and_system(tmp_path):
    history = [SYSTEM, USER_EN, BOT_EN, USER_ZH]
    minimind = {
        "chosen": [*history, {"role": "assistant", "content": GOOD_ZH}],
        "rejected": [*history, {"role": "assistant", "content": BAD_ZH}],
    }
    pair = read_one(tmp_path, minimind)
    assert (pair.prompt, pair.chosen, pair.rejected) == (history, GOOD_ZH, BAD_ZH)
    top_level = {"system": SYSTEM["content"], "chosen": minimind["chosen"][1:], "rejected": minimind["rejected"][1:]}
    assert read_one(tmp_path, top_level).prompt == history
    turns = [("Human", " Hi! "), ("Assistant", "Hello."), ("Human", "你好吗？")]
    record = {"chosen": hh(*turns, ("Assistant", "很好。\n")), "rejected": hh(*turns, ("Assistant", "No."))}
    pair = read_one(tmp_path, record)
    assert pair.prompt == [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "你好吗？"},
    ]
    assert (pair.chosen, pair.rejected) == ("很好。", "No.")
    assert pair.prompt[-1]["role"] == "user"


def test_forced_format_that_does_not_fit_is_an_error(tmp_path):
    assert error_of(tmp_path, [HH], format="minimind").reason == "wrong_type"
    assert error_of(tmp_path, [MINIMIND], format="hh-rlhf").reason == "wrong_type"
    assert error_of(tmp_path, [MINIMIND], format="llamafactory").reason == "missing_field"
    assert "chosen" in str(error_of(tmp_path, [LLAMAFACTORY], format="hh-rlhf"))
    with pytest.raises(ValueError, match="format 'dpo'"):
        read_preferences(tmp_path / "x.jsonl", format="dpo")


# -- errors -------------------------------------------------------------------------------------


def test_prompt_mismatch_names_line_and_message(tmp_path):
    other = {**MINIMIND, "rejected": [SYSTEM, USER_ZH, {"role": "assistant", "content": BAD_ZH}]}
    error = error_of(tmp_path, [MINIMIND, other])
    assert error.reason == "prompt_mismatch"
    assert f"{tmp_path / 'bad.jsonl'}:2: prompt message 0 differs" in str(error)
    assert "chosen[0].content" in str(error) and "rejected[0].content" in str(error)
    longer = hh(("Human", "Hi"), ("Assistant", "Hey"), ("Human", "Bye"), ("Assistant", "Ciao"))
    error = error_of(tmp_path, [{"chosen": longer, "rejected": hh(("Human", "Hi"), ("Assistant", "Yo"))}])
    assert error.reason == "prompt_mismatch" and "prompt message 1 differs" in str(error)
    assert "rejected: no such message" in str(error)


def test_identical_and_empty_replies(tmp_path):
    error = error_of(tmp_path, [{**MEDICALGPT, "rejected": f" {GOOD_ZH}\n"}])
    assert error.reason == "identical_pair" and "the two replies are identical" in str(error)
    error = error_of(tmp_path, [HH, {**LLAMAFACTORY, "rejected": {"from": "gpt", "value": "  "}}])
    assert error.reason == "empty_content" and str(error).startswith(f"{tmp_path / 'bad.jsonl'}:2: rejected.value:")
    error = error_of(tmp_path, [{"chosen": hh(("Human", "Hi"), ("Assistant", "")), "rejected": HH["rejected"]}])
    assert error.reason == "empty_content" and "chosen turn 2 (Assistant)" in str(error)


@pytest.mark.parametrize(
    "record, reason, field",
    [
        (
            {"conversations": [USER_EN, BOT_EN], "chosen": GOOD_EN, "rejected": BAD_EN},
            "last_not_user",
            "conversations[1]",
        ),
        ({**LLAMAFACTORY, "chosen": {"from": "human", "value": GOOD_EN}}, "alternation", "chosen.from"),
        ({**LLAMAFACTORY, "chosen": {"from": "function_call", "value": "{}"}}, "unsupported", "chosen.from"),
        ({**LLAMAFACTORY, "images": ["cat.png"]}, "unsupported", "images"),
        ({"chosen": [USER_EN, BOT_EN], "rejected": [USER_EN]}, "last_not_assistant", "rejected[0].role"),
        (
            {"chosen": [USER_EN, {"role": "tool", "content": "x"}], "rejected": [USER_EN, BOT_EN]},
            "unsupported",
            "chosen[1].role",
        ),
        ({"chosen": [], "rejected": [USER_EN, BOT_EN]}, "empty_conversation", "chosen"),
        ({"chosen": "Paris", "rejected": "London"}, "bad_transcript", "chosen"),
        (
            {"chosen": hh(("Human", "Hi"), ("Human", "Hello?"), ("Assistant", "Hey")), "rejected": HH["rejected"]},
            "alternation",
            "chosen turn 2 (Human)",
        ),
        (
            {
                "chosen": hh(("Human", "a Human: b"), ("Assistant", "Hi")) + " Human: c" + hh(("Assistant", "x")),
                "rejected": hh(("Human", "a Human: b"), ("Assistant", "Hi")),
            },
            "alternation",
            "chosen turn 3 (Assistant)",
        ),
        ({"prompt": "Hi", "answer": "Hey"}, "unknown_format", "'prompt', 'answer'"),
        ({"messages": [USER_EN, BOT_EN], "label": True}, "unsupported", "label: a KTO record"),
        (["not", "an", "object"], "wrong_type", "a list"),
    ],
)
def test_bad_records_name_field_and_reason(tmp_path, record, reason, field):
    error = error_of(tmp_path, [HH, record])
    assert error.reason == reason
    assert str(error).startswith(f"{tmp_path / 'bad.jsonl'}:2: ") and field in str(error)


def test_bad_json_line_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(HH) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON") as info:
        read_preferences(path)
    assert info.value.reason == "invalid_json"


def test_skip_bad_counts_reasons(tmp_path):
    records = [
        HH,
        {**HH, "rejected": HH["chosen"]},
        "{broken",
        MINIMIND,
        {**MEDICALGPT, "chosen": ""},
        {**MINIMIND, "rejected": [USER_EN, BOT_EN]},
        {"chosen": hh(("Human", "Hi"), ("Human", "?"))},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
        encoding="utf-8",
    )
    pairs, report = read_preferences(path, skip_bad=True)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:4"]
    assert report.skipped == {
        "identical_pair": 1,
        "invalid_json": 1,
        "empty_content": 1,
        "prompt_mismatch": 1,
        "missing_field": 1,
    }
    assert report.files[str(path)].first_error["identical_pair"].startswith(f"{path}:2: ")
    assert "prompt_mismatch" in report.summary()


# -- containers ---------------------------------------------------------------------------------


def test_json_and_gzip_containers(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps([LLAMAFACTORY, MEDICALGPT], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "object.json").write_text(json.dumps({"data": [MINIMIND]}, ensure_ascii=False), encoding="utf-8")
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(HH) + "\n" + json.dumps(MINIMIND, ensure_ascii=False) + "\n")
    with gzip.open(tmp_path / "array.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps([HH, MEDICALGPT], ensure_ascii=False))
    names = ["array.json", "object.json", "hh.jsonl.gz", "array.json.gz"]
    pairs, report = read_preferences([tmp_path / name for name in names])
    assert [p.chosen for p in pairs] == [GOOD_EN, GOOD_ZH, GOOD_ZH, GOOD_EN, GOOD_ZH, GOOD_EN, GOOD_ZH]
    assert [p.source for p in pairs][::2] == [
        f"{tmp_path / 'array.json'}:item 0",
        f"{tmp_path / 'object.json'}:item 0",
        f"{tmp_path / 'hh.jsonl.gz'}:2",
        f"{tmp_path / 'array.json.gz'}:item 1",
    ]
    assert report.files[str(tmp_path / "hh.jsonl.gz")].read == {"hh-rlhf": 1, "minimind": 1}
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write(json.dumps(HH) + "\nnope\n")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:2: invalid JSON"):
        read_preferences(tmp_path / "bad.jsonl.gz")
    with gzip.open(tmp_path / "bad.json.gz", "wt") as f:
        f.write('[\n{"chosen": "x",\n]')
    with pytest.raises(DataError, match=r"bad\.json\.gz:3: invalid JSON"):
        read_preferences(tmp_path / "bad.json.gz")
    with gzip.open(tmp_path / "lines.json.gz", "wt") as f:  # JSON Lines under a .json name
        f.write(json.dumps(HH) + "\n" + json.dumps(HH) + "\n")
    assert [p.source for p in read_preferences(tmp_path / "lines.json.gz")[0]] == [
        f"{tmp_path / 'lines.json.gz'}:1",
        f"{tmp_path / 'lines.json.gz'}:2",
    ]
    (tmp_path / "fake.jsonl.gz").write_text("not gzip")
    with pytest.raises(DataError, match="not a readable gzip file") as info:
        read_preferences(tmp_path / "fake.jsonl.gz")
    assert info.value.reason == "unsupported_file"
    with pytest.raises(DataError, match="no such file"):
        read_preferences(tmp_path / "missing.jsonl.gz")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads .parquet")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([MINIMIND, {**MINIMIND, "rejected": MINIMIND["chosen"]}]),
        tmp_path / "pairs.parquet",
        row_group_size=1,
    )
    pq.write_table(pa.Table.from_pylist([HH]), tmp_path / "hh.parquet")
    pairs, report = read_preferences([tmp_path / "pairs.parquet", tmp_path / "hh.parquet"], skip_bad=True)
    assert [(p.chosen, p.source) for p in pairs] == [
        (GOOD_ZH, f"{tmp_path / 'pairs.parquet'}:row 1"),
        (GOOD_EN, f"{tmp_path / 'hh.parquet'}:row 1"),
    ]
    assert report.skipped == {"identical_pair": 1}


# -- the real files of ../shared/data/dpo -------------------------------------------------------


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name", ["llamafactory_dpo_en_demo.json", "llamafactory_dpo_zh_demo.json", "medicalgpt_dpo_zh_500.jsonl"]
)
def test_real_pairs_all_load(shared_data, name):
    path = shared_data / "dpo" / name
    text = path.read_text(encoding="utf-8")
    count = len(json.loads(text)) if name.endswith(".json") else sum(1 for line in text.splitlines() if line.strip())
    pairs, report = read_preferences(path)
    print(f"{name}: {len(pairs)} of {count} records")
    assert len(pairs) == count and report.files[str(path)].read == {"llamafactory": count}
    assert all(p.prompt[-1]["role"] == "user" and p.chosen.strip() != p.rejected.strip() for p in pairs)


@pytest.mark.realdata
def test_real_hh_rlhf_mostly_loads(shared_data):
    path = shared_data / "dpo" / "hh-rlhf_harmless-base_test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        count = sum(1 for line in f if line.strip())
    pairs, report = read_preferences(path, skip_bad=True)
    print(f"{path.name}: {len(pairs)} of {count} records\n{report.summary()}")
    assert len(pairs) + sum(report.skipped.values()) == count and len(pairs) >= 0.99 * count
    assert set(report.skipped) <= {"alternation", "empty_content", "prompt_mismatch"}
    assert all(p.prompt[-1]["role"] == "user" and p.chosen and p.rejected for p in pairs)
    assert all(m["role"] == ("user", "assistant")[i % 2] for p in pairs for i, m in enumerate(p.prompt))


@pytest.mark.realdata
def test_real_kto_file_is_refused_clearly(shared_data):
    path = shared_data / "dpo" / "llamafactory_kto_en_demo.json"
    with pytest.raises(DataError, match=r"llamafactory_kto_en_demo\.json:item 0: label: a KTO record") as info:
        read_preferences(path)
    assert info.value.reason == "unsupported"
