"""Supervised fine-tuning on the real conversation files of ../shared/data/sft, through the CLI.

Each file goes through its reader twice, auto-detected and with the explicit ``--format``, and the
loss has to fall. The base model is tiny (hidden 32, 2 layers, a 1,000-token tokenizer) and is
pretrained for a few steps on text taken from the same files, so each fine-tuning run takes seconds;
at 256 tokens of context many long answers do not fit and are skipped (counted on stderr), which is
fine as long as a sensible number of conversations is left to train on.

LLaMA-Factory's identity file is a template: its answers say ``{{name}}`` and ``{{author}}``, to be
replaced by the user before training. tinylm's reader passes them through verbatim (checked below),
and the fine-tuning runs train on a copy with both filled in, as that file is meant to be used.
"""

import json
import re

import pytest
from conftest import read_metrics

from tinylm.cli import main
from tinylm.data.chat import read_conversations
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings

pytestmark = pytest.mark.realdata

ALPACA_EN, ALPACA_ZH = "llamafactory_alpaca_en_demo.json", "llamafactory_alpaca_zh_demo.json"
SHAREGPT_ZH, IDENTITY = "medicalgpt_sharegpt_zh_1K_format.jsonl", "llamafactory_identity.json"
NAME, AUTHOR = "Quokka", "the tinylm team"  # what the identity file's {{name}} and {{author}} become

TINY_MODEL = [
    "--model.hidden_size=32",
    "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2",
    "--model.num_key_value_heads=1",
    "--data.vocab_size=1000",
]
TRAIN = [
    "--train.seq_len=256",
    "--train.batch_size=8",
    "--train.progress=false",
    "--train.warmup_steps=2",
    "--train.save_every=0",
    "--train.eval_batches=2",
]
SFT = [*TRAIN, "--train.max_steps=40", "--train.lr=0.005", "--train.log_every=1", "--train.eval_every=10"]

# file → (its reader, extra sft arguments, the fewest conversations the run must train on)
CASES = {
    ALPACA_EN: ("alpaca", [], 300),  # 426 of 999 fit in 256 tokens
    ALPACA_ZH: ("alpaca", [], 300),  # 526 of 1,000
    SHAREGPT_ZH: ("sharegpt", ["--skip-bad"], 150),  # 238 of 992 good ones, 149 of them shortened
    IDENTITY: ("alpaca", ["--data.val_fraction=0.1"], 75),  # 82 of 91 (9 held out for validation)
}


@pytest.fixture(scope="module")
def runs():
    """What the tests of this module build once and share: the base model, the runs by (file, format)."""
    return {}


@pytest.fixture
def sft_files(shared_data, runs, tmp_path_factory):
    """The real SFT files by name, the identity file replaced by a copy with its placeholders filled."""
    if "files" not in runs:
        files = {name: shared_data / "sft" / name for name in CASES}
        records = json.loads(files[IDENTITY].read_text(encoding="utf-8"))
        filled = [
            {
                key: value.replace("{{name}}", NAME).replace("{{author}}", AUTHOR) if isinstance(value, str) else value
                for key, value in record.items()
            }
            for record in records
        ]
        assert "{{" not in json.dumps(filled, ensure_ascii=False)  # no other placeholder was left behind
        files[IDENTITY] = tmp_path_factory.mktemp("identity") / IDENTITY
        files[IDENTITY].write_text(json.dumps(filled, ensure_ascii=False, indent=1), encoding="utf-8")
        runs["files"] = files
    return runs["files"]


@pytest.fixture
def base(sft_files, runs, tmp_path_factory):
    """A tiny base model, pretrained for 20 steps on the text of up to 300 conversations of each file."""
    if "base" not in runs:
        root = tmp_path_factory.mktemp("base")
        text = root / "text.jsonl"
        with open(text, "w", encoding="utf-8") as f:
            for path in sft_files.values():
                conversations, _ = read_conversations(path, skip_bad=True)
                for conversation in conversations[:300]:
                    document = "\n".join(message["content"] for message in conversation.messages)
                    f.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
        assert (
            main(
                [
                    "pretrain",
                    "--out",
                    str(root / "run"),
                    *TINY_MODEL,
                    *TRAIN,
                    "--train.max_steps=20",
                    "--data.source=files",
                    f"--data.files=[{text}]",
                ]
            )
            == 0
        )
        runs["base"] = root / "run" / "final"
    return runs["base"]


def finetune(runs, base, files, name: str, fmt: str, out, capsys) -> dict:
    """``tinylm sft`` on one file (``fmt`` "auto" leaves --format out); its stderr and losses."""
    _reader, extra, _ = CASES[name]
    if (name, fmt) not in runs:
        capsys.readouterr()
        format_args = [] if fmt == "auto" else ["--format", fmt]
        assert (
            main(
                ["sft", "--init", str(base), "--data", str(files[name]), *format_args, "--out", str(out), *SFT, *extra]
            )
            == 0
        )
        records = read_metrics(out)
        runs[name, fmt] = {
            "err": capsys.readouterr().err,
            "train": [r["loss"] for r in records if "loss" in r],
            "val": [r["val_loss"] for r in records if "val_loss" in r],
            "final": out / "final",
        }
    return runs[name, fmt]


@pytest.mark.parametrize("fmt", ["auto", "explicit"])
@pytest.mark.parametrize("name", list(CASES))
def test_sft_on_a_real_file_lowers_the_loss(runs, base, sft_files, name, fmt, tmp_path, capsys):
    reader, _, fewest = CASES[name]
    run = finetune(runs, base, sft_files, name, reader if fmt == "explicit" else "auto", tmp_path / "run", capsys)
    err = run["err"]

    # every record was read by the file's reader; the ShareGPT file's 8 bad records are skipped and reported
    expected = {ALPACA_EN: 999, ALPACA_ZH: 1000, SHAREGPT_ZH: 992, IDENTITY: 91}[name]
    assert f"read {reader} {expected}; skipped " in err
    if name == SHAREGPT_ZH:
        assert (
            "skipped empty_content 1, last_not_assistant 7" in err
            and ".jsonl:59: conversations[2].value: empty content" in err
        )
    else:
        assert f"read {reader} {expected}; skipped none" in err

    # long conversations were shortened or skipped to fit 256 tokens, and enough were left
    used = int(re.search(r"^train: ([\d,]+) conversations", err, re.M).group(1).replace(",", ""))
    assert used >= fewest, err
    if name == SHAREGPT_ZH:
        assert "shortened by" in err  # multi-turn: whole exchanges dropped from the left

    # the loss falls: the training loss from the first step (the base model's) to the last five,
    # and the validation loss from the first evaluation (step 10) to the last (step 40)
    train, val = run["train"], run["val"]
    assert len(train) == 40 and len(val) == 4
    assert sum(train[-5:]) / 5 < train[0] - 0.4, train
    assert val[-1] < val[0] - 0.1, val
    print(
        f"\n{name} ({fmt}): {used} conversations; training loss {train[0]:.3f} -> {sum(train[-5:]) / 5:.3f} (last 5), "
        f"validation loss {val[0]:.3f} (step 10) -> {val[-1]:.3f} (step 40)"
    )


def test_without_skip_bad_the_first_bad_sharegpt_record_stops_the_run(base, sft_files, tmp_path, capsys):
    code = main(
        ["sft", "--init", str(base), "--data", str(sft_files[SHAREGPT_ZH]), "--out", str(tmp_path / "run"), *SFT]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{SHAREGPT_ZH}:59: conversations[2].value: empty content" in err and "Traceback" not in err


def test_the_identity_file_keeps_its_placeholders_until_they_are_filled(shared_data, sft_files):
    conversations, report = read_conversations(shared_data / "sft" / IDENTITY)
    answers = [c.messages[-1]["content"] for c in conversations]
    assert report.read == 91 and not report.skipped
    # read verbatim: most answers name {{name}} and many {{author}}; tinylm does not fill or drop them
    assert sum("{{name}}" in a for a in answers) == 77 and sum("{{author}}" in a for a in answers) == 60
    filled, _ = read_conversations(sft_files[IDENTITY])
    assert [c.messages[-1]["content"] for c in filled] == [
        a.replace("{{name}}", NAME).replace("{{author}}", AUTHOR) for a in answers
    ]


def test_scripted_chat_answers_every_prompt_of_a_fine_tuned_model(runs, base, sft_files, tmp_path, capsys):
    model = finetune(runs, base, sft_files, IDENTITY, "auto", tmp_path / "run", capsys)["final"]
    prompts = [
        "Who are you?",
        "What is your name?",
        "你是谁？",
        "Who created you?",
        "介绍一下你自己",
        "What can you do?",
    ]
    prompts_file, out = tmp_path / "prompts.txt", tmp_path / "answers.jsonl"
    prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    assert (
        main(
            [
                "chat",
                str(model),
                "--prompts",
                str(prompts_file),
                "--output",
                str(out),
                "--temperature",
                "0",
                "--max-new-tokens",
                "32",
            ]
        )
        == 0
    )
    assert f"wrote {len(prompts)} answers" in capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == prompts  # one record per prompt, in order
    # each answer is the model's greedy reply in its chat template, stopped where the model stops
    engine = Engine.from_dir(model, device="cpu")
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    settings = chat_format.settings(SamplingSettings(max_new_tokens=32, temperature=0), engine.tokenizer)
    replies = engine.run([chat_format.render([{"role": "user", "content": p}]) for p in prompts], settings)
    assert [(r["answer"], r["finish_reason"]) for r in records] == [(c.text.strip(), c.finish_reason) for c in replies]
    print("\n".join(f"{r['prompt']!r} -> {r['answer']!r} ({r['finish_reason']})" for r in records))
