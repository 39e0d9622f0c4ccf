"""End to end through the CLI, as a user runs it: pretrain → resume → generate; the quickstart's report."""

import json
from pathlib import Path

import pytest
from conftest import read_metrics

from tinylm.cli import main
from tinylm.modeldir import load_model_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = [
    "--model.hidden_size=32",
    "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2",
    "--model.num_key_value_heads=1",
    "--data.vocab_size=300",
    "--train.seq_len=32",
    "--train.batch_size=4",
    "--train.eval_every=4",
    "--train.eval_batches=2",
    "--train.progress=false",
    "--train.warmup_steps=2",
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps(
            {"body": f"The fox number {i} jumps over {i % 7} lazy dogs. 狐狸跳过了{i % 5}只狗。"}, ensure_ascii=False
        )
        for i in range(300)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_pretrain_resume_generate(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    data = ["--data.source=files", f"--data.files=[{corpus}]", "--data.text_field=body"]
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(CONFIGS / "cpu-tiny.yaml"),
                "--out",
                str(run),
                *TINY,
                *data,
                "--train.max_steps=8",
                "--train.save_every=4",
            ]
        )
        == 0
    )
    assert (run / "checkpoints" / "step-000008").is_dir() and (run / "final" / "SHA256SUMS").exists()
    assert "max_steps: 8" in (run / "config.yaml").read_text()
    # extend the same run: resume continues from step 8 to 12
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(CONFIGS / "cpu-tiny.yaml"),
                "--out",
                str(run),
                "--resume",
                *TINY,
                *data,
                "--train.max_steps=12",
                "--train.save_every=4",
            ]
        )
        == 0
    )
    steps = [r["step"] for r in read_metrics(run)]
    assert steps[-1] == 12 and "resumed from" in capsys.readouterr().err
    model, tokenizer = load_model_dir(run / "final")
    assert tokenizer is not None and model.config.vocab_size == tokenizer.vocab_size
    assert (
        main(["generate", str(run / "final"), "--prompt", "The fox", "--max-new-tokens", "5", "--temperature", "0"])
        == 0
    )
    streamed = capsys.readouterr().out
    from tinylm.infer.engine import Engine
    from tinylm.infer.sampling import SamplingSettings

    expected = Engine.from_dir(run / "final", device="cpu").complete(
        ["The fox"], SamplingSettings(max_new_tokens=5, temperature=0)
    )[0]
    assert expected and streamed == expected + "\n"  # the greedy continuation, streamed to stdout


def test_bad_data_file_is_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    code = main(
        [
            "pretrain",
            "--out",
            str(tmp_path / "run"),
            *TINY,
            "--data.source=files",
            f"--data.files=[{bad}]",
            "--data.tokenizer=null",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and ":2" in err and "Traceback" not in err


@pytest.mark.slow
def test_quickstart_writes_its_report(tmp_path):
    from tinylm.config import load_config
    from tinylm.data import builtin, builtin_chat
    from tinylm.infer.engine import Engine
    from tinylm.quickstart import evaluate_facts, evaluate_questions, quickstart
    from tinylm.train.pretrain import PretrainConfig

    sft_tiny = [
        "--train.max_steps=10",
        "--train.batch_size=8",
        "--train.seq_len=128",
        "--train.eval_every=10",
        "--train.eval_batches=1",
        "--train.progress=false",
    ]
    report = quickstart(
        tmp_path / "qs",
        str(CONFIGS / "cpu-tiny.yaml"),
        [*TINY, "--train.max_steps=40", "--train.batch_size=8"],
        sft_overrides=sft_tiny,
    )
    assert (tmp_path / "qs" / "report.md").exists() and (tmp_path / "qs" / "loss.png").exists()
    saved = json.loads((tmp_path / "qs" / "report.json").read_text())
    # even 40 steps of a 40k-parameter model learn more than token frequencies
    assert saved["validation"]["bpb"] < 0.95 * saved["validation"]["unigram_bpb"]
    assert len(report["samples"]) == 4
    # what the report measured is what the saved models do: the held-out facts and questions, asked again
    world = builtin.World(load_config(PretrainConfig, tmp_path / "qs" / "config.yaml", []).data.builtin_seed)
    base = Engine.from_dir(tmp_path / "qs" / "final", device="cpu")
    chat = Engine.from_dir(tmp_path / "qs" / "sft" / "final", device="cpu")
    facts = evaluate_facts(base, builtin.heldout_facts(world))
    assert saved["facts"] == facts and facts["total"] == 334
    questions = evaluate_questions(base, chat, builtin_chat.heldout_questions(world))
    assert saved["sft"]["questions"] == questions
    assert questions["chat"]["total"] == questions["base"]["total"] == 606
    assert [m["role"] for m in saved["sft"]["chat"]] == ["user", "assistant"] * 4
    assert (tmp_path / "qs" / "sft" / "final" / "chat_template.jinja").exists()
    assert "Fine-tuned into a chat model" in (tmp_path / "qs" / "report.md").read_text(encoding="utf-8")
    # the whole run on one page (tinylm report), and each model's card with what the quickstart measured
    page = (tmp_path / "qs" / "report" / "report.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 2 and "Held-out questions answered" in page
    card = (tmp_path / "qs" / "sft" / "final" / "README.md").read_text(encoding="utf-8")
    assert f"| held-out questions, greedy | accuracy | {questions['chat']['accuracy']:.1%} | 606 |" in card


def test_tokenizer_train_command(tmp_path, corpus):
    from tinylm.tokenizer import Tokenizer

    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(corpus),
                "--text-field",
                "body",
                "--vocab-size",
                "300",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tokenizer = Tokenizer.load(out)
    text = "The fox number 12 jumps. 狐狸跳过了3只狗。🦊"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.token_to_id("<|im_end|>") == 2


def test_resume_with_a_different_model_is_a_clear_error(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    data = ["--data.source=files", f"--data.files=[{corpus}]", "--data.text_field=body"]
    assert main(["pretrain", "--out", str(run), *TINY, *data, "--train.max_steps=4"]) == 0
    code = main(
        ["pretrain", "--out", str(run), "--resume", *TINY, *data, "--train.max_steps=8", "--model.hidden_size=48"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err and "config changed" in err and "Traceback" not in err
    # and a fresh run into the same directory is refused rather than mixed with the old one
    assert main(["pretrain", "--out", str(run), *TINY, *data, "--train.max_steps=4"]) == 2
    assert "already holds a training run" in capsys.readouterr().err


def test_the_runs_tokenizer_is_retrained_when_its_corpus_changes(tmp_path, corpus, capsys):
    from tinylm.config import load_config
    from tinylm.train import distributed
    from tinylm.train.pretrain import PretrainConfig, prepare_tokenizer

    cfg = load_config(PretrainConfig, None, ["--data.vocab_size=300", "--data.text_field=body"])
    first = prepare_tokenizer(cfg, [corpus], tmp_path, distributed.setup("cpu"))
    again = prepare_tokenizer(cfg, [corpus], tmp_path, distributed.setup("cpu"))
    assert capsys.readouterr().err.count("training a") == 1 and again.fingerprint() == first.fingerprint()
    corpus.write_text(json.dumps({"body": "完全不同的文本。" * 50}, ensure_ascii=False) + "\n", encoding="utf-8")
    changed = prepare_tokenizer(cfg, [corpus], tmp_path, distributed.setup("cpu"))
    assert "training a" in capsys.readouterr().err and changed.fingerprint() != first.fingerprint()
