"""Trainable token rows and modules trained whole beside a LoRA adapter (PEFT's trainable_token_indices
and modules_to_save): only what was chosen trains, adapters round-trip with PEFT both ways with the same
logits, merging keeps them, and ``--lora`` trains the chat markup's rows of a base that never saw a chat."""

import pytest
import torch
from test_lora import make_model as make_lora_test_model

from tinylm.model.llama import CausalLM
from tinylm.model.lora import (
    LoRAConfig,
    RowAdapted,
    adapters_disabled,
    add_lora,
    add_modules_to_save,
    add_token_rows,
    merge_lora,
)
from tinylm.modeldir import load_adapter, load_model_dir, save_adapter, save_model_dir

IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 1, 2]])
ROWS = [1, 2, 5]  # rows that train (ids 1 and 2 appear in IDS, 5 too)


def make_model(tied: bool, seed=0) -> CausalLM:
    return make_lora_test_model(seed, tied)


def adapted(config: LoRAConfig, tied: bool) -> CausalLM:
    """A model with ``config``'s adapter, every trained tensor moved away from where it started."""
    model = make_model(tied)
    add_lora(model, config)
    add_token_rows(model, config)
    add_modules_to_save(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


CASES = {
    "tied, embedding rows": (True, LoRAConfig(r=4, alpha=8, trainable_token_indices={"embed_tokens": ROWS})),
    "untied, both rows": (
        False,
        LoRAConfig(r=4, alpha=8, trainable_token_indices={"embed_tokens": ROWS, "lm_head": ROWS}),
    ),
    "untied, head whole": (
        False,
        LoRAConfig(r=4, alpha=8, trainable_token_indices={"embed_tokens": ROWS}, modules_to_save=["lm_head"]),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_only_the_chosen_rows_train_and_start_as_the_base(case):
    tied, config = CASES[case]
    model = make_model(tied)
    before = model(IDS)
    add_lora(model, config)
    add_token_rows(model, config)
    add_modules_to_save(model, config)
    assert torch.equal(model(IDS), before)  # rows start as copies, B at zero: the base model exactly
    model(IDS, labels=IDS).backward()
    embed = model.model.embed_tokens
    assert isinstance(embed, RowAdapted) and embed.base_layer.weight.grad is None  # the matrix is frozen
    assert embed.token_adapter.trainable_tokens_delta.grad.abs().sum() > 0
    if tied:  # one set of rows serves the embedding and the head
        assert model.lm_head.token_adapter is embed.token_adapter


@pytest.mark.parametrize("case", CASES)
def test_merging_and_switching_the_adapter_off(case):
    tied, config = CASES[case]
    model = adapted(config, tied)
    with torch.no_grad():
        with adapters_disabled(model):
            off = model(IDS)
        on = model(IDS)
        merged = merge_lora(model)(IDS)
    assert not any(isinstance(m, RowAdapted) for m in model.modules())
    assert torch.allclose(on, merged, atol=1e-5)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again after merging
    if not config.modules_to_save:  # a module trained whole stays trained with the adapter off
        assert torch.allclose(off, make_model(tied)(IDS), atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tied, config = CASES[case]
    save_model_dir(make_model(tied), tmp_path / "base")
    model = adapted(config, tied)
    save_adapter(model, config, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(IDS)
        assert torch.allclose(peft_model(IDS).logits, ours, atol=1e-5)
        assert not torch.allclose(ours, make_model(tied)(IDS), atol=1e-3)  # the adapter does change the output


@pytest.mark.parametrize("case", CASES)
def test_a_peft_adapter_loads_here_with_the_same_logits(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tied, config = CASES[case]
    save_model_dir(make_model(tied), tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    settings |= dict(trainable_token_indices=config.trainable_token_indices, modules_to_save=config.modules_to_save)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**settings))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    ours, _ = load_model_dir(tmp_path / "base")
    loaded = load_adapter(ours, tmp_path / "peft_adapter")
    assert loaded.trainable_token_indices == config.trainable_token_indices
    assert loaded.modules_to_save == config.modules_to_save
    with torch.no_grad():
        assert torch.allclose(peft_model.eval()(IDS).logits, ours.eval()(IDS), atol=1e-5)


def test_what_cannot_be_chosen_is_refused():
    with pytest.raises(ValueError, match="tied"):
        add_token_rows(make_model(True), LoRAConfig(trainable_token_indices={"lm_head": ROWS}))
    with pytest.raises(ValueError, match="tied"):
        add_modules_to_save(make_model(True), LoRAConfig(modules_to_save=["embed_tokens"]))
    with pytest.raises(ValueError, match="beyond the 128 rows"):
        add_token_rows(make_model(False), LoRAConfig(trainable_token_indices=[1, 500]))
    with pytest.raises(ValueError, match="are not embed_tokens or lm_head"):
        LoRAConfig(trainable_token_indices={"q_proj": [1]})


def test_lora_sft_from_a_base_trains_the_rows_of_the_markup_and_the_replies(base_and_chats, tmp_path):
    """The tiny base has no chat template: --lora trains the rows of the chat markup and of every token
    the replies use (lora.train_rows auto → replies); a chat model's own rows stay frozen (auto → none);
    markup and none do what they say."""
    import json

    from conftest import TRAIN

    from tinylm.cli import main
    from tinylm.tokenizer import Tokenizer

    _, base, chats = base_and_chats
    markup = {Tokenizer.load(base).special_ids[t] for t in ("<|im_start|>", "<|im_end|>")}
    reply = Tokenizer.load(base).encode(" likes")  # in every reply of chats.jsonl ("Tom likes red.")
    common = ["--data", str(chats), *TRAIN, "--train.max_steps=2", "--lora"]
    rows = {}
    for mode in ("auto", "markup", "none"):
        out = tmp_path / mode
        assert main(["sft", "--init", str(base), "--out", str(out), *common, f"--lora.train_rows={mode}"]) == 0
        config = json.loads((out / "final" / "adapter_config.json").read_text())
        rows[mode] = set((config["trainable_token_indices"] or {}).get("embed_tokens", []))
    assert markup | set(reply) <= rows["auto"] and len(rows["auto"]) > len(rows["markup"])
    assert markup <= rows["markup"] and not set(reply) & rows["markup"]
    assert rows["none"] == set()
    chat = tmp_path / "auto" / "final"  # an adapter whose tokenizer has a chat template: a chat model
    assert main(["sft", "--init", str(chat), "--out", str(tmp_path / "again"), *common]) == 0
    again = json.loads((tmp_path / "again" / "final" / "adapter_config.json").read_text())
    assert not again["trainable_token_indices"]


def test_stages_that_pick_no_rows_refuse_a_row_mode(base_and_chats, tmp_path, capsys):
    from conftest import TRAIN

    from tinylm.cli import main

    _, base, _ = base_and_chats
    argv = ["pretrain", "--init", str(base), "--out", str(tmp_path / "p"), *TRAIN, "--train.max_steps=1", "--lora"]
    assert main([*argv, "--lora.train_rows=replies"]) == 2
    assert "lora.train_rows replies is tinylm sft's" in capsys.readouterr().err
