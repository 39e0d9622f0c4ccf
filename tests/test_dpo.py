"""DPO and its reference-free relatives: the losses, the pair encoding, and `tinylm dpo` end to end on a
tiny chat model (full, LoRA, precomputed reference, SimPO, ORPO)."""

import json
import math
import random

import pytest
import torch
from conftest import NAMES, TRAIN, read_metrics

from tinylm.chat_template import TEMPLATES, find_template, get_template
from tinylm.cli import main
from tinylm.config import load_config
from tinylm.modeldir import load_model_dir
from tinylm.train.dpo import DPOConfig
from tinylm.train.objectives import PreferenceLoss, preference_losses
from tinylm.train.pairs import encode_pairs, final_answer_only, pairs_batch


@pytest.fixture(scope="module")
def chat_and_pairs(trained_base, base_and_chats, tmp_path_factory):
    """A tiny chat model that knows who likes which colour (the shared trained base, fine-tuned), and
    pairs preferring the right colour."""
    _, _, chats = base_and_chats
    root = tmp_path_factory.mktemp("dpo")
    chat = root / "chat"
    assert (
        main(
            [
                "sft",
                "--init",
                str(trained_base),
                "--data",
                str(chats),
                "--out",
                str(chat),
                *TRAIN,
                "--train.max_steps=40",
                "--train.lr=0.005",
            ]
        )
        == 0
    )
    rng = random.Random(1)
    pairs = root / "pairs.jsonl"
    with open(pairs, "w", encoding="utf-8") as f:
        for _ in range(200):
            name = rng.choice(list(NAMES))
            wrong = rng.choice([c for c in NAMES.values() if c != NAMES[name]])
            f.write(
                json.dumps(
                    {
                        "conversations": [{"from": "human", "value": f"What colour does {name} like?"}],
                        "chosen": {"from": "gpt", "value": f"{name} likes {NAMES[name]}."},
                        "rejected": {"from": "gpt", "value": f"{name} likes {wrong}. Whatever."},
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return chat / "final", pairs


def dpo_args(chat, pairs, out, *extra):
    return [
        "dpo",
        "--init",
        str(chat),
        "--data",
        str(pairs),
        "--out",
        str(out),
        *TRAIN,
        "--train.eval_batches=4",
        "--data.val_fraction=0.1",
        "--train.lr=0.0005",
        "--train.weight_decay=0",
        "--dpo.sft_weight=0",
        *extra,
    ]


def test_sigmoid_loss_is_the_dpo_formula():
    logps = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # chosen of pairs 0 and 1, then rejected of pairs 0 and 1
    ref = torch.tensor([-3.5, -5.0, -3.0, -4.0])
    losses, chosen, rejected = preference_losses("sigmoid", 0.5, logps, torch.tensor([3, 4, 3, 4]), ref)
    expected_margin = [0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0)), 0.5 * ((-5.0 + 5.0) - (-4.5 + 4.0))]
    assert torch.allclose(chosen - rejected, torch.tensor(expected_margin))
    assert torch.allclose(losses, torch.tensor([math.log1p(math.exp(-m)) for m in expected_margin]))
    simpo, c, r = preference_losses("simpo", 2.0, logps, torch.tensor([3, 5, 2, 5]), None, simpo_gamma=0.5)
    assert torch.allclose(c - r, torch.tensor([2 * (-1 - -2.0), 2 * (-1 - -0.9)]))
    assert torch.allclose(simpo, -torch.nn.functional.logsigmoid(c - r - 0.5))
    orpo, _, _ = preference_losses("orpo", 0.1, logps, torch.tensor([3, 5, 2, 5]), None)
    mean = [-1.0, -1.0, -2.0, -0.9]  # mean token log-probabilities: chosen of pairs 0, 1, then rejected
    log_odds = [m - math.log(1 - math.exp(m)) for m in mean]
    expected = [-mean[i] + 0.1 * math.log1p(math.exp(-(log_odds[i] - log_odds[i + 2]))) for i in range(2)]
    assert torch.allclose(orpo, torch.tensor(expected), atol=1e-6)


def test_only_the_final_answer_is_scored():
    assert final_answer_only([False, True, True, False, False, True, True, False]) == [False] * 5 + [True, True, False]


def test_pairs_encode_prompt_plus_answer(base_and_chats):
    from tinylm.data.preference import PreferencePair
    from tinylm.tokenizer import Tokenizer

    _, base, _ = base_and_chats
    tokenizer, template = Tokenizer.load(base), get_template("chatml")
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tom?"},
    ]
    (pair,), truncated = encode_pairs([PreferencePair(prompt, "Tom likes red.", "No.", "x")], template, tokenizer, 64)
    assert not truncated
    batch = pairs_batch([pair], [0], pad_id=tokenizer.eos_id)
    for row, answer in zip(batch["labels"], ["Tom likes red.", "No."]):
        assert (
            tokenizer.decode([t for t in row.tolist() if t != -100]) == answer + "<|im_end|>"
        )  # not "Hello!": it is context
    long_prompt = [{"role": "user", "content": "Tom? " * 60}]
    (cut,), truncated = encode_pairs(
        [PreferencePair(long_prompt, "red " * 80, "No.", "file:3")], template, tokenizer, 64
    )
    assert truncated == ["file:3"] and len(cut.chosen) <= 64 and len(cut.rejected) <= 64
    first_label = next(i for i, label in enumerate(cut.chosen.labels) if label != -100)  # input i predicts token i + 1
    assert tokenizer.decode(cut.chosen.input_ids[: first_label + 1]).endswith(
        "<|im_start|>assistant\n"
    )  # the prompt lost its start, not its end


def test_dpo_raises_the_margin_and_logs_rewards(chat_and_pairs, tmp_path, capsys):
    chat, pairs = chat_and_pairs
    run = tmp_path / "dpo"
    assert main(dpo_args(chat, pairs, run, "--train.max_steps=40")) == 0
    err = capsys.readouterr().err
    assert "read llamafactory 200" in err and "held-out pairs: the model prefers the chosen answer" in err
    logged = read_metrics(run)
    train = [r for r in logged if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "margin", "accuracy", "prefers_chosen"} <= train[-1].keys()
    assert train[-1]["margin"] > train[0]["margin"] and train[-1]["loss"] < math.log(2)
    val = [r for r in logged if "val_accuracy" in r]
    assert val[-1]["val_accuracy"] >= 0.9 and val[-1]["val_margin"] > 0.5
    report = json.loads((run / "dpo.json").read_text())
    assert report["after"]["val_prefers_chosen"] >= report["before"]["val_prefers_chosen"]
    # the aligned model still answers, and now through `tinylm chat`
    prompts = tmp_path / "p.txt"
    prompts.write_text("What colour does Ann like?\n", encoding="utf-8")
    assert (
        main(["chat", str(run / "final"), "--prompts", str(prompts), "--temperature", "0", "--max-new-tokens", "12"])
        == 0
    )
    assert "Ann likes blue" in capsys.readouterr().out


def test_precomputed_reference_trains_like_the_live_one(chat_and_pairs, tmp_path):
    chat, pairs = chat_and_pairs
    assert main(dpo_args(chat, pairs, tmp_path / "live", "--train.max_steps=6")) == 0
    assert main(dpo_args(chat, pairs, tmp_path / "pre", "--train.max_steps=6", "--precompute-ref")) == 0
    live, pre = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")
    for a, b in zip(live, pre):
        for key in ("loss", "margin", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("method", [["--lora"], ["--qlora", "--double-quant"], ["--qlora", "--precompute-ref"]])
def test_dpo_with_lora_uses_the_base_as_reference(chat_and_pairs, tmp_path, method):
    chat, pairs = chat_and_pairs
    run = tmp_path / "lora"
    assert (
        main(
            dpo_args(
                chat,
                pairs,
                run,
                "--train.max_steps=30",
                *method,
                "--lora-r",
                "8",
                "--lora-alpha",
                "16",
                "--train.lr=0.01",
                "--train.log_every=1",
                "--lora.block_size=32",
            )
        )
        == 0
    )
    assert (run / "final" / "adapter_config.json").exists() and not (run / "final" / "model.safetensors").exists()
    train = [r for r in read_metrics(run) if "loss" in r]
    # step 1 is scored before any update: the reference is the adapter-free (for QLoRA: 4-bit) base, so
    # every reward is exactly 0, whether it is scored live or was scored up front
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and train[0]["rewards/chosen"] == pytest.approx(
        0, abs=1e-6
    )
    assert train[-1]["margin"] > 1.0


def test_a_lora_stage_can_start_from_an_adapter(chat_and_pairs, tmp_path):
    """sft --lora → adapter A; dpo --init A --lora → adapter B over A: B loads (the chain is followed),
    and merging B into A's merged model gives the same model."""
    chat, pairs = chat_and_pairs
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(dpo_args(chat, pairs, first, "--train.max_steps=4", "--lora")) == 0
    assert main(dpo_args(first / "final", pairs, second, "--train.max_steps=4", "--lora")) == 0
    model, tokenizer = load_model_dir(second / "final")
    assert find_template(tokenizer.chat_template) is TEMPLATES["chatml"]
    assert main(["merge", str(first / "final"), str(second / "final"), str(tmp_path / "merged")]) == 0
    merged, merged_tokenizer = load_model_dir(tmp_path / "merged")
    ids = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        assert torch.allclose(merged(ids), model(ids), atol=1e-5)
    assert (
        find_template(merged_tokenizer.chat_template) is TEMPLATES["chatml"]
        and merged.config.eos_token_ids() == model.config.eos_token_ids()
    )


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_train(chat_and_pairs, tmp_path, loss):
    chat, pairs = chat_and_pairs
    beta = "2.0" if loss == "simpo" else "0.5"
    assert main(dpo_args(chat, pairs, tmp_path / loss, "--train.max_steps=30", "--loss", loss, "--beta", beta)) == 0
    val = [r for r in read_metrics(tmp_path / loss) if "val_accuracy" in r]
    assert val[-1]["val_margin"] > val[0]["val_margin"] and val[-1]["val_accuracy"] >= 0.9


def test_dpo_errors_name_the_problem(chat_and_pairs, base_and_chats, tmp_path, capsys):
    chat, _ = chat_and_pairs
    _, base, _ = base_and_chats
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            }
        )
        + "\n"
    )
    assert main(["dpo", "--init", str(chat), "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["dpo", "--init", str(base), "--out", str(tmp_path / "y")]) == 2  # a base model: no chat template
    assert "has no tinylm chat template" in capsys.readouterr().err
    with pytest.raises(ValueError, match="loss: expected sigmoid, orpo or simpo"):
        load_config(DPOConfig, None, ["--dpo.loss=ppo"])
    with pytest.raises(ValueError, match="uses no reference model"):
        load_config(DPOConfig, None, ["--dpo.loss=simpo", "--dpo.reference=precomputed"])
    with pytest.raises(ValueError, match="ORPO already includes"):
        load_config(DPOConfig, None, ["--dpo.loss=orpo", "--dpo.sft_weight=1"])
    assert load_config(DPOConfig, None, ["--dpo.loss=simpo"]).dpo.beta == 2.0  # each loss its own default beta
    assert load_config(DPOConfig, None, []).dpo.beta == 0.1


def test_preference_loss_counts_pairs():
    objective = PreferenceLoss("simpo", 1.0)
    assert objective.count({"input_ids": torch.zeros(6, 3)}) == 3
