"""Memory per training process, by strategy, for tinylm's shipped shapes and Qwen2.5's: the table in
docs/scale.md, computed with tinylm.train.memory (whose activation arithmetic tests/test_fsdp.py checks
against this machine's measured peak).

    python bench/memory.py                          # the table: GiB per process, micro-batch 4 × 1024
    python bench/memory.py --batch 1 --seq-len 4096 --processes 4
    python bench/memory.py --detail qwen2.5-7b      # weights, gradients, optimizer, activations apart

Qwen2.5's shapes are those of its published config.json files (hidden size, layers, heads, key/value
heads, MLP width, vocabulary, tied embeddings), written out here since nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tinylm.config import load_config
from tinylm.model.llama import ModelConfig
from tinylm.train.memory import GIB, Plan, estimate, parameter_counts, table
from tinylm.train.pretrain import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

QWEN = {  # hidden, layers, heads, kv heads, MLP width, vocabulary, tied
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
}


def shapes() -> dict[str, ModelConfig]:
    shipped = ("cpu-tiny", "minimind2-small", "minimind2")  # (minimind2 wants text files: any will do here)
    found = {
        name: load_config(PretrainConfig, CONFIGS / f"{name}.yaml", ["--data.source=builtin"]).model for name in shipped
    }
    for name, (h, layers, heads, kv, i, vocab, tied) in QWEN.items():
        found[name] = ModelConfig(
            vocab_size=vocab,
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            intermediate_size=i,
            tie_word_embeddings=tied,
            attention_bias=True,
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch, per process")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=8, help="for DDP and FSDP")
    parser.add_argument("--detail", help="one shape's parts, per plan")
    args = parser.parse_args()
    common = {"batch_size": args.batch, "seq_len": args.seq_len}
    n = args.processes
    plans = [
        Plan("single", **common),
        Plan("ddp", n, **common),
        Plan("fsdp", n, **common),
        Plan("fsdp", n, activation_checkpointing=True, **common),
        Plan("lora", **common),
        Plan("qlora", **common),
        Plan("qlora", activation_checkpointing=True, **common),
    ]
    found = shapes()
    if args.detail:
        config = found[args.detail]
        print(f"{args.detail}: {parameter_counts(config)['total'] / 1e6:,.0f}M parameters; GiB per process\n")
        print("| plan | weights | gradients | optimizer | activations | total |\n|---|---|---|---|---|---|")
        for plan in plans:
            parts = estimate(config, plan)
            cells = " | ".join(f"{parts[k] / GIB:.2f}" for k in ("weights", "gradients", "optimizer", "activations"))
            print(f"| {plan.describe()} | {cells} | {parts['total'] / GIB:.1f} |")
        return
    print(f"GiB per process; micro-batch {args.batch} × {args.seq_len} tokens, bf16 autocast, AdamW\n")
    print(table(found, plans))


if __name__ == "__main__":
    main()
