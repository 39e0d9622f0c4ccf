import json
import sys

import pytest
from conftest import write_jsonl

from tinylm.data.chat import Conversation, detect_format, read_conversations
from tinylm.io import DataError

SYSTEM = {"role": "system", "content": "You are helpful. 你是一个乐于助人的助手。"}
USER_EN = {"role": "user", "content": "What is the capital of France?"}
BOT_EN = {"role": "assistant", "content": "Paris."}
USER_ZH = {"role": "user", "content": "法国的首都是哪里？"}
BOT_ZH = {"role": "assistant", "content": "巴黎。"}


def sharegpt(*messages):
    """ShareGPT messages from OpenAI ones."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def read_one(tmp_path, record, **kwargs) -> Conversation:
    conversations, _ = read_conversations(write_jsonl(tmp_path / "one.jsonl", [record]), **kwargs)
    assert len(conversations) == 1
    return conversations[0]


# -- formats ------------------------------------------------------------------------------------


def test_openai_and_minimind_records(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [SYSTEM, USER_EN, BOT_EN, USER_ZH, BOT_ZH]},
            {"conversations": [USER_ZH, BOT_ZH]},  # MiniMind: role/content under "conversations"
            {"system": SYSTEM["content"], "messages": [USER_EN, BOT_EN]},
        ],
    )
    conversations, report = read_conversations(path)
    assert [c.messages for c in conversations] == [
        [SYSTEM, USER_EN, BOT_EN, USER_ZH, BOT_ZH],
        [USER_ZH, BOT_ZH],
        [SYSTEM, USER_EN, BOT_EN],
    ]
    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert report.files[str(path)].read == {"openai": 3} and report.read == 3 and not report.skipped


def test_xtuner_bare_lists_and_llamafactory_v1_text_parts(tmp_path):
    v1 = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "你好"}], "loss_weight": 0.0},
            {
                "role": "assistant",
                "loss_weight": 1.0,
                "content": [{"type": "text", "value": "Hello, "}, {"type": "text", "text": "I am Tiny."}],
            },
        ]
    }
    assert read_one(tmp_path, [USER_EN, BOT_EN]).messages == [USER_EN, BOT_EN]
    assert read_one(tmp_path, v1).messages == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello, I am Tiny."},
    ]


def test_sharegpt_roles_and_system(tmp_path):
    record = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "GPT", "value": "Hello!"},
            {"from": "user", "value": "再见"},
            {"from": "chatgpt", "value": "再见！"},
            {"from": "human", "value": "Bye"},
            {"from": "bot", "value": "Bye."},
        ],
        "system": "Be brief.",
    }
    assert read_one(tmp_path, record).messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "再见"},
        {"role": "assistant", "content": "再见！"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    # a system message in the list wins over the "system" field, as in LLaMA-Factory
    in_list = {"messages": sharegpt(SYSTEM, USER_ZH, BOT_ZH), "system": "ignored"}
    assert read_one(tmp_path, in_list).messages == [SYSTEM, USER_ZH, BOT_ZH]


def test_alpaca_with_input_history_and_system(tmp_path):
    plain = {"instruction": "Translate to Chinese.", "input": "Good morning", "output": "早上好"}
    assert read_one(tmp_path, plain).messages == [
        {"role": "user", "content": "Translate to Chinese.\nGood morning"},
        {"role": "assistant", "content": "早上好"},
    ]
    full = {
        "instruction": "它在哪个国家？",
        "input": "",
        "output": "法国。",
        "system": SYSTEM["content"],
        "history": [[USER_EN["content"], BOT_EN["content"]], [USER_ZH["content"], BOT_ZH["content"]]],
    }
    assert read_one(tmp_path, full).messages == [
        SYSTEM,
        USER_EN,
        BOT_EN,
        USER_ZH,
        BOT_ZH,
        {"role": "user", "content": "它在哪个国家？"},
        {"role": "assistant", "content": "法国。"},
    ]
    seed_task = {"id": "seed_task_0", "instruction": "Antonym?", "instances": [{"input": "hot", "output": "cold"}]}
    assert read_one(tmp_path, seed_task).messages == [
        {"role": "user", "content": "Antonym?\nhot"},
        {"role": "assistant", "content": "cold"},
    ]


def test_json_arrays_wrapped_arrays_and_json_lines_named_json(tmp_path):
    records = [
        {"instruction": "1+1?", "output": "2"},
        {"messages": [USER_ZH, BOT_ZH]},
        {"conversations": sharegpt(USER_EN, BOT_EN)},
    ]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": records}), encoding="utf-8")
    lines = write_jsonl(tmp_path / "lines.json", records)
    conversations, report = read_conversations([array, wrapped, lines])
    assert [c.source for c in conversations] == (
        [f"{array}:item {i}" for i in range(3)]
        + [f"{wrapped}:item {i}" for i in range(3)]
        + [f"{lines}:{i}" for i in (1, 2, 3)]
    )
    assert conversations[1].messages == [USER_ZH, BOT_ZH]
    assert report.read == 9
    assert all(f.read == {"alpaca": 1, "openai": 1, "sharegpt": 1} for f in report.files.values())


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads .parquet")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [{"messages": [USER_EN, BOT_EN], "system": None}, {"messages": [USER_ZH, BOT_ZH], "system": "简洁。"}]
        ),
        tmp_path / "chat.parquet",
        row_group_size=1,
    )
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "2+2?", "input": None, "output": "4", "history": None}]),
        tmp_path / "alpaca.parquet",
    )
    conversations, _report = read_conversations([tmp_path / "chat.parquet", tmp_path / "alpaca.parquet"])
    assert [c.messages for c in conversations] == [
        [USER_EN, BOT_EN],
        [{"role": "system", "content": "简洁。"}, USER_ZH, BOT_ZH],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    ]
    assert conversations[1].source == f"{tmp_path / 'chat.parquet'}:row 2"
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        read_conversations(tmp_path / "broken.parquet")


# -- detection and override ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [USER_EN, BOT_EN]}, "openai"),
        ({"conversations": [USER_EN, BOT_EN]}, "openai"),
        ([USER_EN, BOT_EN], "openai"),
        ({"conversations": sharegpt(USER_EN, BOT_EN)}, "sharegpt"),
        ({"messages": sharegpt(USER_EN, BOT_EN), "system": "s"}, "sharegpt"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "instances": [{"input": "", "output": "o"}]}, "alpaca"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detect_format_refuses_unknown_records():
    with pytest.raises(DataError, match=r"cannot tell the format from the fields 'text'") as info:
        detect_format({"text": "just a document"})
    assert info.value.reason == "unknown_format"
    with pytest.raises(DataError, match=r"a string; expected an object"):
        detect_format("hello")


def test_format_override(tmp_path):
    record = {"conversations": [USER_EN, BOT_EN]}
    assert read_one(tmp_path, record, format="openai").messages == [USER_EN, BOT_EN]
    with pytest.raises(
        DataError,
        match=r"one\.jsonl:1: conversations\[0\]\.from: missing field "
        r"\(found: 'role', 'content'\)",
    ):
        read_one(tmp_path, record, format="sharegpt")
    with pytest.raises(DataError, match=r"one\.jsonl:1: instruction: missing field \(found: 'conversations'\)"):
        read_one(tmp_path, record, format="alpaca")
    with pytest.raises(DataError, match=r"one\.jsonl:1: a list; expected an object with the fields of the alpaca"):
        read_one(tmp_path, [USER_EN, BOT_EN], format="alpaca")
    with pytest.raises(ValueError, match=r"format 'chatml': expected one of auto, openai, sharegpt, alpaca"):
        read_conversations(tmp_path / "one.jsonl", format="chatml")


# -- errors -------------------------------------------------------------------------------------

BAD_RECORDS = [
    # (second line of bad.jsonl, the message after "bad.jsonl:2: ", reason)
    ('{"messages": [oops]}', r"invalid JSON \(Expecting value, column 15\)", "invalid_json"),
    ({"text": "a document"}, r"cannot tell the format from the fields 'text'", "unknown_format"),
    (
        {"instruction": "Say hi", "input": ""},
        r"output: missing field \(found: 'instruction', 'input'\)",
        "missing_field",
    ),
    (
        {"messages": [{"role": "user"}, BOT_EN]},
        r"messages\[0\]\.content: missing field \(found: 'role'\)",
        "missing_field",
    ),
    (
        {"messages": [USER_EN, {"role": "bot", "content": "x"}]},
        r"messages\[1\]\.role: unknown role 'bot'; expected one of system, user, assistant",
        "unknown_role",
    ),
    (
        {"conversations": [{"from": "human", "value": "x"}, {"from": "narrator", "value": "y"}]},
        r"conversations\[1\]\.from: unknown role 'narrator'; expected one of human, user, gpt",
        "unknown_role",
    ),
    (
        {
            "conversations": [
                {"from": "human", "value": "天气？"},
                {"from": "function_call", "value": "{}"},
                {"from": "observation", "value": "晴"},
                {"from": "gpt", "value": "晴天。"},
            ]
        },
        r"conversations\[1\]\.from: 'function_call' is a tool-calling turn, which tinylm does not train",
        "unsupported",
    ),
    (
        {"messages": [USER_EN, {"role": "tool", "content": "{}"}]},
        r"messages\[1\]\.role: 'tool' is a tool-calling",
        "unsupported",
    ),
    (
        {"conversations": sharegpt(USER_EN, BOT_EN), "tools": '[{"name": "f"}]'},
        r"tools: tool descriptions are not supported",
        "unsupported",
    ),
    (
        {"messages": [USER_EN, {**BOT_EN, "loss_weight": 0.0}]},
        r"messages\[1\]\.loss_weight: 0\.0 is not supported for assistant messages; expected 1",
        "unsupported",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]}, BOT_EN]},
        r"messages\[0\]\.content\[0\]\.type: 'image_url' content is not supported",
        "unsupported",
    ),
    (
        {"instruction": "x", "instances": [{"input": "", "output": "a"}, {"input": "", "output": "b"}]},
        r"instances: 2 instances; expected exactly one",
        "unsupported",
    ),
    ({"messages": []}, r"messages: empty conversation", "empty_conversation"),
    ({"messages": [SYSTEM]}, r"messages\[0\]\.role: empty conversation", "empty_conversation"),
    (
        {"messages": [USER_ZH, {"role": "assistant", "content": "  \n"}]},
        r"messages\[1\]\.content: empty content; expected non-empty text",
        "empty_content",
    ),
    ({"instruction": "", "input": "", "output": "o"}, r"instruction: empty content", "empty_content"),
    (
        {"messages": [USER_EN, {"role": "assistant", "content": 42}]},
        r"messages\[1\]\.content: a number; expected a string",
        "wrong_type",
    ),
    (
        {"messages": [USER_EN, USER_ZH, BOT_ZH]},
        r"messages\[1\]\.role: two user turns in a row; expected user and assistant turns to alternate",
        "alternation",
    ),
    (
        {"conversations": sharegpt(BOT_EN, USER_EN, BOT_EN)},
        r"conversations\[0\]\.from: starts with an assistant turn",
        "alternation",
    ),
    (
        {"instruction": "q", "output": "a", "history": [["", "a0"]]},
        r"history\[0\]\[0\]: empty content",
        "empty_content",
    ),
    (
        {"messages": [USER_EN, BOT_EN, USER_ZH]},
        r"messages\[2\]\.role: the conversation ends with a user turn; expected it to end with the assistant",
        "last_not_assistant",
    ),
    (
        {"messages": [USER_EN, SYSTEM, BOT_EN]},
        r"messages\[1\]\.role: a system message after other messages; expected a system message only as the first",
        "system_not_first",
    ),
]


@pytest.mark.parametrize("line, message, reason", BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, line, message, reason):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [USER_EN, BOT_EN]})
    path.write_text(good + "\n" + (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: " + message) as info:
        read_conversations(path)
    assert info.value.reason == reason
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


def test_bad_items_and_files(tmp_path):
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"messages": [USER_EN, BOT_EN]}, {"messages": [USER_EN]}]))
    with pytest.raises(DataError, match=r"items\.json:item 1: messages\[0\]\.role: the conversation ends"):
        read_conversations(items)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        read_conversations([items, tmp_path / "missing.jsonl"], skip_bad=True)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"a\.csv: unsupported file type \.csv; expected \.jsonl, \.json or"):
        read_conversations(tmp_path / "a.csv")
    (tmp_path / "broken.json").write_text('[\n{"messages": []},\n{"messages": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        read_conversations(tmp_path / "broken.json", skip_bad=True)
    (tmp_path / "two_lists.json").write_text('{"train": [], "test": []}')
    with pytest.raises(DataError, match=r"two_lists\.json: a JSON object with several lists \('train', 'test'\)"):
        read_conversations(tmp_path / "two_lists.json")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "chat.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes "import pyarrow" fail
    with pytest.raises(DataError, match=r"chat\.parquet: reading \.parquet needs pyarrow \(pip install"):
        read_conversations(tmp_path / "chat.parquet")


def test_skip_bad_counts_by_file_and_reason(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) if not isinstance(r, str) else r for r, _, _ in BAD_RECORDS]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"messages": [USER_EN, BOT_EN]}), *lines, ""]), encoding="utf-8")
    good = write_jsonl(tmp_path / "good.jsonl", [{"conversations": sharegpt(USER_ZH, BOT_ZH)}] * 3)
    conversations, report = read_conversations([bad, good], skip_bad=True)
    assert [c.source for c in conversations] == [f"{bad}:1", f"{good}:1", f"{good}:2", f"{good}:3"]
    expected = {}
    for _, _, reason in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    assert report.files[str(bad)].skipped == expected and report.skipped == expected
    assert report.files[str(bad)].read == {"openai": 1} and report.files[str(good)].read == {"sharegpt": 3}
    assert report.read == 4 and not report.files[str(good)].skipped
    assert report.files[str(bad)].first_error["invalid_json"].startswith(f"{bad}:2: invalid JSON")
    summary = report.summary()
    assert f"{good}: read sharegpt 3; skipped none" in summary
    assert f"first alternation: {bad}:" in summary


# -- real data (../shared/data/sft) -------------------------------------------------------------

# file → (conversations read by format, records skipped by reason), as observed
REAL_FILES = {
    "alpaca_seed_tasks.jsonl": ({"alpaca": 175}, {}),  # self-instruct seed tasks, one instance each
    "gpt4llm_user_oriented_instructions.jsonl": ({"alpaca": 252}, {}),
    "llamafactory_alpaca_en_demo.json": ({"alpaca": 999}, {}),
    "llamafactory_alpaca_zh_demo.json": ({"alpaca": 1000}, {}),
    "llamafactory_identity.json": ({"alpaca": 91}, {}),
    "llamafactory_v1_sft_demo.jsonl": ({"openai": 500}, {}),  # text parts and loss_weight
    "medicalgpt_Belle_open_source_1k.json": ({"alpaca": 1000}, {}),  # JSON Lines under a .json name
    "medicalgpt_medical_sft_1K_format.jsonl": ({"sharegpt": 1000}, {}),
    # 7 conversations end with an unanswered question; line 59 has empty user turns
    "medicalgpt_sharegpt_zh_1K_format.jsonl": ({"sharegpt": 992}, {"last_not_assistant": 7, "empty_content": 1}),
    "xtuner_openai_sft.jsonl": ({"openai": 128}, {}),  # bare lists of messages
}


@pytest.mark.realdata
def test_every_real_sft_file_is_covered(shared_data):
    present = {p.name for p in (shared_data / "sft").iterdir() if p.suffix in (".json", ".jsonl", ".parquet")}
    assert present == set(REAL_FILES)


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_sft_files(shared_data, name):
    path = shared_data / "sft" / name
    read, skipped = REAL_FILES[name]
    if skipped:
        with pytest.raises(DataError, match=rf"{name}:\d+: "):
            read_conversations(path)
    conversations, report = read_conversations(path, skip_bad=True)
    assert report.files[str(path)].read == read and report.files[str(path)].skipped == skipped
    assert len(conversations) == sum(read.values())
    for conversation in conversations:
        roles = [m["role"] for m in conversation.messages if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(m["content"].strip() for m in conversation.messages)


def test_gzip_compressed_files(tmp_path):
    import gzip

    record = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}]}
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n{broken\n")
    with pytest.raises(DataError, match=r"chats\.jsonl\.gz:2: invalid JSON"):
        read_conversations(tmp_path / "chats.jsonl.gz")
    conversations, report = read_conversations(tmp_path / "chats.jsonl.gz", skip_bad=True)
    assert conversations[0].messages == record["messages"] and report.skipped["invalid_json"] == 1
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_conversations(tmp_path / "bad.json.gz")
