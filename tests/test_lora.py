"""LoRA: only the adapter trains, adapters round-trip with PEFT both ways, merging changes nothing."""

import json

import pytest
import torch

from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.model.lora import LoRAConfig, LoRALinear, add_lora, merge_lora
from tinylm.modeldir import (
    ModelDirError,
    load_adapter,
    load_model_dir,
    read_adapter_config,
    save_adapter,
    save_model_dir,
)

IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 61]])


def make_model(seed=0, tied: bool = False) -> CausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        tie_word_embeddings=tied,
    )
    return CausalLM(config).eval()


def randomize_lora(model, seed=1):
    """Give B non-zero values (it starts at zero), so the adapter changes the output and a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_only_the_adapter_trains_and_starts_as_the_base_model():
    model = make_model()
    before = model(IDS)
    wrapped = add_lora(model, LoRAConfig(r=4, alpha=8))
    assert len(wrapped) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    assert torch.equal(model(IDS), before)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())  # base names unchanged
    model(IDS).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("rslora", [False, True])
def test_merging_gives_the_same_logits(rslora):
    model = make_model()
    add_lora(model, LoRAConfig(r=4, alpha=8, rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(IDS)
        merged = merge_lora(model)(IDS)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(adapted, merged, atol=1e-5) and not torch.allclose(adapted, make_model()(IDS), atol=1e-3)


def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = make_model()
    save_model_dir(base, tmp_path / "base")
    model = make_model()
    config = LoRAConfig(r=4, alpha=16, rslora=True)
    add_lora(model, config)
    randomize_lora(model)
    save_adapter(model, config, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(IDS).logits, model(IDS), atol=1e-5)


def test_a_peft_adapter_loads_here_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    save_model_dir(make_model(), tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    ours, _ = load_model_dir(tmp_path / "base")
    config = load_adapter(ours, tmp_path / "peft_adapter")
    assert config.r == 4 and sorted(config.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    with torch.no_grad():
        assert torch.allclose(peft_model.eval()(IDS).logits, ours.eval()(IDS), atol=1e-5)


def test_unsupported_adapter_options_are_refused_by_name(tmp_path):
    model = make_model()
    config = LoRAConfig(r=2)
    add_lora(model, config)
    save_adapter(model, config, tmp_path / "a")
    settings = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(ModelDirError, match="use_dora"):
        read_adapter_config(tmp_path / "a")
    with pytest.raises(ValueError, match="no linear layer is named like"):
        add_lora(make_model(), LoRAConfig(target_modules=["c_attn"]))


def test_merge_command_writes_a_plain_model_with_the_adapters_logits(tmp_path):
    from tinylm.cli import main
    from tinylm.tokenizer import train_tokenizer

    base = make_model()
    save_model_dir(base, tmp_path / "base", tokenizer=train_tokenizer(["hello world 你好"] * 5, vocab_size=300))
    model, _ = load_model_dir(tmp_path / "base")
    config = LoRAConfig(r=4, alpha=8)
    add_lora(model, config)
    randomize_lora(model)
    save_adapter(model, config, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged, tokenizer = load_model_dir(tmp_path / "merged")
    assert tokenizer is not None and not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged.eval()(IDS), model(IDS), atol=1e-5)
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")
    assert (
        main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged2")]) == 2
    )  # SHA-256 check
