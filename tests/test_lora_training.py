"""LoRA through the commands: `sft --lora` / `pretrain --lora` train only an adapter, save it in PEFT's
layout with the tokenizer, and chat, merge and resume work on it."""

import json
import os
import signal

import pytest
import torch
from conftest import TRAIN, logged
from safetensors.torch import load_file

from tinylm.cli import main
from tinylm.config import load_config
from tinylm.modeldir import load_model_dir
from tinylm.train.sft import SFTConfig, sft

LORA = ["--lora", "--lora-r", "4", "--lora-alpha", "8"]
IDS = torch.tensor([[5, 9, 30, 2, 77, 41]])


def test_sft_lora_trains_an_adapter_that_chats_and_merges(trained_base, base_and_chats, tmp_path, capsys):
    base, chats = trained_base, base_and_chats[2]
    base_weights = (base / "model.safetensors").read_bytes()
    run = tmp_path / "lora"
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
                *LORA,
                "--train.max_steps=60",
                "--train.lr=0.01",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "lora: rank 4 on 14 layers" in err and "trainable parameters" in err
    final = run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in final.iterdir()
    }
    assert not (final / "model.safetensors").exists() and (base / "model.safetensors").read_bytes() == base_weights
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4
    val = logged(run, "val_loss")
    assert val[-1] < 0.85 * val[0]  # the adapter alone learns the answers

    # the adapter directory loads as a model (base + adapter merged), with the chat template and stop tokens of the run
    model, tokenizer = load_model_dir(final)
    assert (
        tokenizer.chat_template
        and model.config.eos_token_ids() == json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What colour does 小明 like?\n", encoding="utf-8")
    assert main(["chat", str(final), "--prompts", str(prompts), "--temperature", "0", "--max-new-tokens", "12"]) == 0
    assert "小明 likes 黄色" in capsys.readouterr().out

    merged = tmp_path / "merged"
    assert main(["merge", str(base), str(final), str(merged)]) == 0
    plain, plain_tokenizer = load_model_dir(merged)
    assert (
        plain_tokenizer.chat_template == tokenizer.chat_template
        and plain.config.eos_token_ids() == model.config.eos_token_ids()
    )
    base_model, _ = load_model_dir(base)
    with torch.no_grad():
        assert torch.allclose(plain(IDS), model(IDS), atol=1e-5) and not torch.allclose(
            plain(IDS), base_model(IDS), atol=1e-3
        )


def test_lora_checkpoints_hold_the_adapter_only_and_resume_exactly(base_and_chats, tmp_path):
    _, base, chats = base_and_chats
    common = [
        "--data.source=files",
        f"--data.files=[{chats}]",
        *TRAIN,
        "--lora.enabled=true",
        "--lora.r=4",
        "--train.lr=0.01",
        "--train.max_steps=12",
        f"--init_from={base}",
    ]
    cfg = lambda: load_config(SFTConfig, None, common)  # noqa: E731

    def ctrl_c(step, _):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # stops after step 6 and saves a checkpoint there

    sft(cfg(), tmp_path / "whole")
    _, stopped = sft(cfg(), tmp_path / "split", callbacks=[ctrl_c])
    assert stopped.interrupted and stopped.step == 6
    saved = load_file(tmp_path / "split" / "checkpoints" / "step-000006" / "model.safetensors")
    # the frozen base is not copied into checkpoints: the adapter, and the chat markup's rows (the base
    # has no chat template, so --lora trains them: lora.train_rows auto)
    assert saved and all(".lora_A." in k or ".lora_B." in k or ".token_adapter." in k for k in saved)
    assert "model.embed_tokens.token_adapter.trainable_tokens_delta" in saved
    sft(cfg(), tmp_path / "split", resume=True)
    whole = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    split = load_file(tmp_path / "split" / "final" / "adapter_model.safetensors")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


def test_pretrain_lora_continues_a_model_and_needs_one(base_and_chats, tmp_path, capsys):
    root, base, _ = base_and_chats
    texts = root / "text.jsonl"
    args = ["pretrain", "--data.source=files", f"--data.files=[{texts}]", *TRAIN, "--train.max_steps=10", *LORA]
    assert main([*args, "--out", str(tmp_path / "scratch")]) == 2
    assert "needs a model to adapt" in capsys.readouterr().err
    assert (
        main([*args, "--init", str(base), "--out", str(tmp_path / "cpt"), "--lora.target_modules=[q_proj,v_proj]"]) == 0
    )
    config = json.loads((tmp_path / "cpt" / "final" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]


def test_lora_options_are_checked(base_and_chats, tmp_path, capsys):
    _, base, chats = base_and_chats
    args = ["sft", "--init", str(base), "--data", str(chats), "--out", str(tmp_path / "x"), *TRAIN]
    assert main([*args, "--lora.quantize=nf4"]) == 2
    assert "lora.enabled is not" in capsys.readouterr().err
    assert main([*args, "--lora", "--lora.target_modules=[lm_head]"]) == 2
    assert "['lm_head'] are not decoder linear layers" in capsys.readouterr().err
    assert main([*args, "--lora-r", "4"]) == 2  # a LoRA option without --lora would silently fine-tune everything
    assert "--lora-r given without --lora" in capsys.readouterr().err
    assert main([*args, "--lora", "--double-quant"]) == 2
    assert "use it with --qlora" in capsys.readouterr().err
    assert main([*args, "--lora", "--lora-r", "0"]) == 2
    assert "rank >= 1" in capsys.readouterr().err


def test_qlora_trains_an_adapter_over_a_4bit_base(trained_base, base_and_chats, tmp_path, capsys):
    base, chats = trained_base, base_and_chats[2]
    run = tmp_path / "qlora"
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
                "--qlora",
                "--double-quant",
                "--lora-r",
                "4",
                "--lora-alpha",
                "8",
                "--train.max_steps=60",
                "--train.lr=0.01",
                "--lora.block_size=32",
            ]
        )
        == 0
    )
    assert "over a 4-bit NF4 base (double quantized)" in capsys.readouterr().err
    val = logged(run, "val_loss")
    assert val[-1] < 0.85 * val[0]
    assert json.loads((run / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert main(["merge", str(base), str(run / "final"), str(tmp_path / "merged")]) == 0


def test_lora_over_nf4_disables_and_merges():
    from tinylm.model.llama import CausalLM, ModelConfig
    from tinylm.model.lora import LoRAConfig, adapters_disabled, add_lora, merge_lora
    from tinylm.model.quant import NF4Linear, quantize_linear_layers

    torch.manual_seed(0)
    model = CausalLM(
        ModelConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
        )
    ).eval()
    quantize_linear_layers(model, ["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():
        quantized_base = model(IDS)
    add_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        adapted = model(IDS)
        with adapters_disabled(model):
            assert torch.equal(model(IDS), quantized_base)  # adapter off: exactly the 4-bit base
        merged = merge_lora(model)(IDS)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # merging dequantizes
    assert torch.allclose(adapted, merged, atol=1e-4) and not torch.allclose(adapted, quantized_base, atol=1e-3)


def test_peft_loads_the_adapter_a_run_wrote(trained_base, base_and_chats, tmp_path):
    """The output of `tinylm sft --lora` is a PEFT adapter: PeftModel on the transformers-loaded base
    (the path adapter_config.json names) gives tinylm's logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, chats = trained_base, base_and_chats[2]
    run = tmp_path / "lora"
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
                *LORA,
                "--lora.rslora=true",
                "--train.max_steps=10",
                "--train.lr=0.01",
            ]
        )
        == 0
    )
    named = json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(named)
    peft_model = peft.PeftModel.from_pretrained(hf, run / "final").eval()
    ours, _ = load_model_dir(run / "final")
    with torch.no_grad():
        theirs, mine = peft_model(IDS).logits, ours(IDS)
    assert torch.allclose(theirs, mine, atol=1e-5), (theirs - mine).abs().max()
