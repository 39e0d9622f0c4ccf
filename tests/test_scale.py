"""The memory arithmetic behind docs/scale.md, and its real-size recipes run for a few steps on tiny
stand-ins (the recipes' own models are on the Hub, out of reach here)."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, TRAIN, tiny_qwen2_dir, write_jsonl

from tinylm.cli import main
from tinylm.config import load_config
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.train.memory import GIB, Plan, estimate, lora_parameters, parameter_counts
from tinylm.train.optim import build_optimizer
from tinylm.train.sft import SFTConfig
from tinylm.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.parametrize(
    "shape",
    [
        dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        dict(
            vocab_size=300,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
            qk_norm=True,
            tie_word_embeddings=False,
        ),
    ],
    ids=["llama", "every-bias-untied"],
)
def test_parameter_counts_are_the_models(shape):
    config = ModelConfig(**shape)
    assert parameter_counts(config)["total"] == CausalLM(config).num_parameters()


def test_weights_gradients_and_adamw_state_are_what_a_step_holds():
    config = ModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = CausalLM(config)
    optimizer, _ = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 16))
    model(ids, labels=ids).backward()
    optimizer.step()

    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    moments = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
    parts = estimate(config, Plan("single"))
    assert parts["weights"] == size(model.parameters())
    assert parts["gradients"] == size(p.grad for p in model.parameters())
    assert parts["optimizer"] == size(moments)


def test_lora_parameter_count_is_the_adapters():
    from tinylm.model.lora import LoRAConfig, add_lora

    config = ModelConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = CausalLM(config)
    add_lora(model, LoRAConfig(r=4))
    assert lora_parameters(config, 4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sharding_and_recomputation_shrink_what_they_should():
    from memory import shapes

    qwen = shapes()["qwen2.5-7b"]
    one, ddp = estimate(qwen, Plan("single")), estimate(qwen, Plan("ddp", 8))
    fsdp, both = estimate(qwen, Plan("fsdp", 8)), estimate(qwen, Plan("fsdp", 8, activation_checkpointing=True))
    assert one == ddp  # DDP copies everything into every process
    assert fsdp["optimizer"] == one["optimizer"] / 8 and fsdp["gradients"] == one["gradients"] / 8
    assert one["weights"] / 8 < fsdp["weights"] < one["weights"] / 2  # a share, plus the gathered units
    assert both["activations"] < one["activations"] / 10 and both["weights"] == fsdp["weights"]
    assert 7.6e9 < parameter_counts(qwen)["total"] < 7.65e9  # Qwen2.5-7B's published 7.61B


def test_the_docs_tables_are_the_arithmetics(capsys, monkeypatch):
    """docs/scale.md's tables are bench/memory.py's output, figure for figure."""
    import memory

    doc = (ROOT / "docs" / "scale.md").read_text(encoding="utf-8")
    for argv in ([], ["--detail", "qwen2.5-7b"]):
        monkeypatch.setattr(sys, "argv", ["memory.py", *argv])
        memory.main()
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
        assert len(rows) >= 7 and all(row in doc for row in rows), [row for row in rows if row not in doc]
    lora = estimate(memory.shapes()["qwen2.5-0.5b"], Plan("lora", batch_size=8, seq_len=1024))
    assert f"{lora['total'] / GIB:.1f} GiB, of which {lora['activations'] / GIB:.1f} is activations" in doc


# -- the recipes -----------------------------------------------------------------------------------


def test_the_qwen_recipes_fine_tune_a_qwen2_directory(tmp_path):
    """The two Qwen2.5-0.5B recipes as shipped (their model swapped for a tiny local Qwen2, their steps
    and rows cut): LoRA gives an adapter, full SFT a model, both with activation checkpointing's path."""
    from tinylm.tokenizer import train_tokenizer

    recipes = {
        name: load_config(SFTConfig, ROOT / "configs" / f"{name}.yaml")
        for name in ("qwen2.5-0.5b-lora", "qwen2.5-0.5b-sft")
    }
    assert {cfg.init_from for cfg in recipes.values()} == {"Qwen/Qwen2.5-0.5B-Instruct"}
    assert recipes["qwen2.5-0.5b-lora"].lora.enabled and recipes["qwen2.5-0.5b-sft"].train.activation_checkpointing
    tokenizer = train_tokenizer(["What is 2 + 3? It is 5.", "二加三等于五。"] * 30, vocab_size=300)
    qwen = tiny_qwen2_dir(tmp_path / "qwen", tokenizer)
    chats = [
        {"messages": [{"role": "user", "content": f"{a} + {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
        for a in range(6)
        for b in range(6)
    ]
    write_jsonl(tmp_path / "chats.jsonl", chats)
    short = ["--train.max_steps=2", "--train.eval_every=0", "--train.progress=false", "--train.device=cpu"]
    short += ["--train.seq_len=64", "--train.batch_size=2", "--train.grad_accum=1", "--train.keep_best=false"]
    for name in recipes:
        out = tmp_path / name
        argv = [
            "sft",
            "--config",
            name,
            "--init",
            str(qwen),
            "--data",
            str(tmp_path / "chats.jsonl"),
            "--out",
            str(out),
        ]
        assert main([*argv, "--train.activation_checkpointing=true", *short]) == 0
    assert (tmp_path / "qwen2.5-0.5b-lora" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "qwen2.5-0.5b-sft" / "final" / "model.safetensors").is_file()


def test_the_minimind2_recipe_pretrains_on_text_files(tmp_path):
    from tinylm.train.pretrain import PretrainConfig

    recipe = load_config(PretrainConfig, ROOT / "configs" / "minimind2.yaml", ["--data.files=[corpus.txt]"])
    assert 103e6 < recipe.model.num_parameters() < 105e6  # MiniMind2's 104M
    assert recipe.data.vocab_size == 6400 and recipe.data.source == "files"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Day {i}: the fox ran {i % 9} miles. 狐狸跑了{i % 7}里。" for i in range(300)))
    out = tmp_path / "run"
    argv = ["pretrain", "--config", "minimind2", "--data", str(corpus), "--out", str(out), *TINY_MODEL, *TRAIN]
    assert main([*argv, "--train.max_steps=2", "--train.device=cpu", "--model.max_position_embeddings=64"]) == 0
    assert (out / "final" / "model.safetensors").is_file()
    ran = load_config(PretrainConfig, out / "config.yaml")  # the recipe's schedule, the stand-in's shape
    assert ran.train.lr == 5e-4 and ran.train.weight_decay == 0.1 and ran.model.hidden_size == 32
