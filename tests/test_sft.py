"""Supervised fine-tuning end to end through the CLI: a base model → a chat model whose template,
stop tokens and answers agree between tinylm and transformers; the chat formats the engine uses."""

import json

import pytest
import torch
from conftest import TRAIN, logged, tiny_qwen2_dir

from tinylm.chat_template import get_template
from tinylm.cli import main
from tinylm.infer.chat import PLAIN, chat_format_for, jinja_renderer
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.modeldir import load_model_dir


def test_sft_turns_a_base_model_into_a_chat_model(base_and_chats, tmp_path, capsys):
    _, base, chats = base_and_chats
    run = tmp_path / "chat"
    assert (
        main(
            [
                "sft",
                "--init",
                str(base),
                "--data",
                str(chats),
                "--out",
                str(run),
                *TRAIN,
                "--train.max_steps=60",
                "--train.lr=0.005",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "read openai 300" in err and "rows of 64" in err
    val = logged(run, "val_loss")
    assert len(val) == 3 and val[-1] < 0.6 * val[0]  # the answers are being learned
    assert (run / "final" / "chat_template.jinja").exists()

    model, tokenizer = load_model_dir(run / "final")
    chatml = get_template("chatml")
    assert tokenizer.chat_template == chatml.jinja() and model.config.eos_token_ids() == chatml.stop_token_ids(
        tokenizer
    )

    # the scripted chat answers exactly what the engine generates for the rendered prompt, stopping at <|im_end|>
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What colour does Tom like?\nWhat colour does 小明 like?\n", encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    assert (
        main(
            [
                "chat",
                str(run / "final"),
                "--prompts",
                str(prompts),
                "--output",
                str(out),
                "--temperature",
                "0",
                "--max-new-tokens",
                "24",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    engine = Engine(model, tokenizer)
    for record in records:
        ids = chatml.encode(tokenizer, [{"role": "user", "content": record["prompt"]}], add_generation_prompt=True)[0]
        expected = engine.run(
            [ids], SamplingSettings(max_new_tokens=24, temperature=0, stop_token_ids=chatml.stop_token_ids(tokenizer))
        )[0]
        assert record["answer"] == expected.text.strip() and record["finish_reason"] == expected.finish_reason
    assert any(r["finish_reason"] == "stop" for r in records)  # it learned to end its turn


def test_transformers_runs_the_saved_chat_model_the_same_way(base_and_chats, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, base, chats = base_and_chats
    run = tmp_path / "chat"
    assert (
        main(
            [
                "sft",
                "--init",
                str(base),
                "--data",
                str(chats),
                "--out",
                str(run),
                *TRAIN,
                "--train.max_steps=30",
                "--template",
                "vicuna",
                "--train.seq_len=256",
            ]
        )
        == 0
    )  # with 300 tokens, vicuna's default system sentence alone is ~150
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(run / "final")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour does Ann like?"}]
    encoded = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    model, tokenizer = load_model_dir(run / "final")
    ours = get_template("vicuna").encode(tokenizer, messages, add_generation_prompt=True)[0]
    assert encoded["input_ids"] == ours
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ours]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
            0, len(ours) :
        ].tolist()
    mine = Engine(model, tokenizer).generate(
        [ours], SamplingSettings(max_new_tokens=12, temperature=0, stop_token_ids=model.config.eos_token_ids())
    )[0]
    assert mine == theirs[: len(mine)]


def test_continued_pretraining_starts_from_the_given_model(base_and_chats, tmp_path):
    root, base, _ = base_and_chats
    run = tmp_path / "more"
    assert (
        main(
            [
                "pretrain",
                "--init",
                str(base),
                "--out",
                str(run),
                *TRAIN,
                "--train.max_steps=3",
                "--data.source=files",
                f"--data.files=[{root / 'text.jsonl'}]",
            ]
        )
        == 0
    )
    before, tokenizer_before = load_model_dir(base)
    after, tokenizer_after = load_model_dir(run / "final")
    assert tokenizer_after.fingerprint() == tokenizer_before.fingerprint()  # the model's own tokenizer, not a new one
    assert before.config.hidden_size == after.config.hidden_size == 32
    difference = max(
        (a - b).abs().max().item() for a, b in zip(before.state_dict().values(), after.state_dict().values())
    )
    assert 0 < difference < 0.1  # a few small steps away from the base, not a fresh initialisation


def test_bad_conversations_are_one_clear_line_and_can_be_skipped(base_and_chats, tmp_path, capsys):
    _, base, chats = base_and_chats
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        chats.read_text(encoding="utf-8")
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
        + "\n",
        encoding="utf-8",
    )
    code = main(
        ["sft", "--init", str(base), "--data", str(bad), "--out", str(tmp_path / "run"), *TRAIN, "--train.max_steps=2"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:301" in err and "Traceback" not in err
    assert (
        main(
            [
                "sft",
                "--init",
                str(base),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "run"),
                *TRAIN,
                "--train.max_steps=2",
                "--skip-bad",
            ]
        )
        == 0
    )
    assert "skipped" in capsys.readouterr().err


def test_chat_formats_follow_the_models_template():
    from tinylm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["hello there 你好"] * 10, vocab_size=300)
    assert chat_format_for(tokenizer) is PLAIN  # a base model: labelled lines
    chatml = get_template("chatml")
    own = chat_format_for(chatml.attach(tokenizer))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert own.render(messages) == chatml.render(messages, add_generation_prompt=True)
    assert own.stop_strings == ("<|im_end|>",) and 2 in own.stop_token_ids
    # a foreign template (not one of ours) is rendered by Jinja in a sandbox, stopping at the model's eos
    foreign = chatml.jinja().replace("<|im_start|>", "<|im_start|> ")
    rendered = chat_format_for(tokenizer.with_chat_template(foreign), eos_token_ids=[7]).render(messages)
    assert rendered == chatml.render(messages, add_generation_prompt=True).replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(ValueError, match="refused the conversation"):
        jinja_renderer("{{ raise_exception('no system prompts') }}", tokenizer)(messages)


def test_sft_fine_tunes_a_local_transformers_qwen2_directory(base_and_chats, tmp_path):
    """An existing model saved by transformers (here a tiny random Qwen2 with our tokenizer) is
    fine-tuned by the same command, and the result is still a Qwen2 that transformers loads."""
    transformers = pytest.importorskip("transformers")
    _, base, chats = base_and_chats
    _, tokenizer = load_model_dir(base)
    qwen = tiny_qwen2_dir(tmp_path / "qwen", tokenizer)
    run = tmp_path / "run"
    assert (
        main(["sft", "--init", str(qwen), "--data", str(chats), "--out", str(run), *TRAIN, "--train.max_steps=5"]) == 0
    )
    saved = json.loads((run / "final" / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["architectures"] == ["Qwen2ForCausalLM"]
    tuned = transformers.AutoModelForCausalLM.from_pretrained(run / "final")
    ours, _ = load_model_dir(run / "final")
    ids = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.allclose(tuned(ids).logits, ours(ids), atol=1e-4)


def test_identity_recipe_mixes_in_the_name_and_measures_it(base_and_chats, tmp_path, capsys):
    _, base, chats = base_and_chats
    run = tmp_path / "nova"
    assert (
        main(
            [
                "sft",
                "--init",
                str(base),
                "--data",
                str(chats),
                "--out",
                str(run),
                *TRAIN,
                "--train.max_steps=3",
                "--train.seq_len=128",
                "--identity-name",
                "Nova",
                "--identity-author",
                "Ada Lab",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "identity: 240 conversations naming 'Nova' by 'Ada Lab'" in err
    measured = json.loads((run / "identity.json").read_text(encoding="utf-8"))
    assert measured["name"] == "Nova" and measured["identity_questions"] == 16 and measured["general_questions"] > 100
    # three steps teach the name nothing yet (the replies are still empty), and the measurement credits nothing
    assert measured["identity_accuracy"] == 0 and measured["general_mentioning_name"] == 0
    # what the run measured is what the saved model does
    from tinylm.eval.questions import identity_report

    again = identity_report(Engine.from_dir(run / "final", device="cpu"), "Nova", "Ada Lab")
    assert again["identity_accuracy"] == measured["identity_accuracy"]
    assert again["general_mentioning_name"] == measured["general_mentioning_name"]
