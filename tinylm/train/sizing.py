"""Size a pretraining run to its text and its time: ``tinylm pretrain --data FILES --minutes M``.

Everything follows from the corpus size, the budget and this machine's measured speed:

* vocabulary: about twice the square root of the corpus bytes, as a power of two in [512, 16384]
  (a 1 MB text gets 2,048 tokens; a small corpus cannot fill a big vocabulary with well-trained tokens);
* shape: one depth knob d, width 32·d, heads of 32 dimensions (d = 4 is cpu-tiny's 4 × 128). Each
  depth's training speed is measured here (a few optimizer steps, from d = 2 up), and the run takes
  the deepest model that still sees at least 3 tokens per parameter in the budget (fewer than the
  compute-optimal 20 of Hoffmann et al., 2022: with dropout, a small text seen many times over is
  learned best by a bigger model; see TOKENS_PER_PARAMETER);
* regularisation: data seen many times over is memorised, so dropout grows with the epochs the budget
  allows (0 up to 2 epochs, 0.1 up to 8, else 0.2), and the best evaluation is kept (``keep_best``);
* schedule: the budget sets the steps (``max_minutes``); about 20 evaluations; warmup over 6% of the
  steps (the same 1M-parameter model on the same text scored 1.290 bits per byte with 2%, 1.256 with 6%);
* optimizer: Muon for the blocks' matrices (``tinylm/train/optim.py``), which beat AdamW at the same
  budget (depth 4: 1.236 against 1.256 bits per byte; depth 3: 1.231 against 1.281).

Each choice is printed with its reason, and any of them can be overridden (``--model.hidden_size=...``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.config import TrainConfig
from tinylm.data.text import read_documents
from tinylm.device import resolve_device
from tinylm.io import source_size
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.train.optim import build_optimizer

SAMPLE_BYTES = 64 * 2**20  # the corpus is measured on up to this much text
MIN_DEPTH, MAX_DEPTH = 2, 12
SEQ_LEN, BATCH = 256, 16
# Tokens per parameter the budget must allow. Compute-optimal training on fresh data takes about 20
# (Hoffmann et al., 2022); a small text seen many times over with dropout does better with a bigger
# model: on a 1 MB story corpus in 10 minutes, depths 2, 3 and 4 (≈ 26, 11 and 3.5 tokens per
# parameter) scored 1.296, 1.281 and 1.256 bits per byte on held-out text (bench/own_text.py).
TOKENS_PER_PARAMETER = 3


@dataclass
class Sizing:
    overrides: list[str]  # --section.key=value, to go before the user's own
    reasons: list[str]  # one line per choice


def shape(depth: int, vocab_size: int, dropout: float = 0.0) -> ModelConfig:
    width = 32 * depth
    heads = max(1, width // 32)
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,  # grouped in pairs where they pair up
        max_position_embeddings=512,
        rope_theta=10000.0,
        hidden_dropout=dropout,
        attention_dropout=dropout,
    )


def measure_tokens_per_s(config: ModelConfig, device: torch.device, steps: int = 3) -> float:
    """Training tokens per second of ``config`` here: optimizer steps (Muon, as the sized run takes) on
    random tokens, after one warmup step."""
    torch.manual_seed(0)
    model = CausalLM(config).to(device).train()
    optimizer, _ = build_optimizer(model, TrainConfig(lr=1e-4, optimizer="muon"), device)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN + 1), device=device)
    for i in range(steps + 1):
        if i == 1:
            began = time.perf_counter()
        model(ids[:, :-1], labels=ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - began)


def corpus_bytes(files, text_field: str = "text", txt_split: str = "blank") -> int:
    """UTF-8 bytes of the corpus's documents (beyond SAMPLE_BYTES, extrapolated by file size, or a Hub
    dataset's by the size its card records)."""
    total, files = 0, list(files)
    for index, path in enumerate(files):
        for document in read_documents(path, text_field, txt_split):
            total += len(document.encode("utf-8"))
            if total > SAMPLE_BYTES:  # the rest by size, at the rate read so far
                sizes = [source_size(p) for p in files]
                return int(total * sum(sizes) / max(sum(sizes[: index + 1]), 1))
    return total


def vocabulary(n_bytes: int) -> int:
    return int(min(16384, max(512, 2 ** math.ceil(math.log2(2 * math.sqrt(max(n_bytes, 1)))))))


def size_run(files, minutes: float, device: str = "auto", text_field: str = "text", txt_split: str = "blank"):
    """The overrides that size a run on ``files`` to ``minutes`` on ``device``, and why."""
    device = resolve_device(device)
    files = [Path(f) for f in files]
    n_bytes = corpus_bytes(files, text_field, txt_split)
    vocab = vocabulary(n_bytes)
    tokens = n_bytes / 3.5  # a byte-level BPE of this size makes tokens of about 3-4 bytes (measured: 3.3-3.9)
    seconds = minutes * 60 * 0.9  # evaluations and checkpoints take about a tenth
    rate = {}  # measured tokens/s by depth, from the shallowest up while the depth still fits the budget
    for d in range(MIN_DEPTH, MAX_DEPTH + 1):
        rate[d] = measure_tokens_per_s(shape(d, vocab, dropout=0.1), device)  # dropout costs time too
        if rate[d] * seconds < TOKENS_PER_PARAMETER * shape(d, vocab).num_parameters():
            break
    fits = [d for d in rate if rate[d] * seconds >= TOKENS_PER_PARAMETER * shape(d, vocab).num_parameters()]
    depth = max(fits) if fits else MIN_DEPTH
    config = shape(depth, vocab)
    seen = rate[depth] * seconds
    epochs = seen / max(tokens, 1)
    dropout = 0.0 if epochs <= 2 else 0.1 if epochs <= 8 else 0.2
    steps = max(1, int(seen / (BATCH * SEQ_LEN)))
    lr = 4e-3 * min(1.0, 128 / config.hidden_size)
    overrides = [
        f"--data.vocab_size={vocab}",
        f"--model.hidden_size={config.hidden_size}",
        f"--model.num_hidden_layers={config.num_hidden_layers}",
        f"--model.num_attention_heads={config.num_attention_heads}",
        f"--model.num_key_value_heads={config.num_key_value_heads}",
        f"--model.hidden_dropout={dropout}",
        f"--model.attention_dropout={dropout}",
        f"--train.seq_len={SEQ_LEN}",
        f"--train.batch_size={BATCH}",
        f"--train.lr={lr:g}",
        f"--train.warmup_steps={max(10, steps // 16)}",
        f"--train.eval_every={max(10, steps // 20)}",
        f"--train.save_every={max(10, steps // 5)}",
        "--train.optimizer=muon",
        "--train.keep_best=true",
    ]
    reasons = [
        f"corpus: {n_bytes:,} bytes (about {tokens:,.0f} tokens) → a {vocab:,}-token vocabulary",
        f"speed here ({device.type}, measured): "
        + ", ".join(f"depth {d} {r:,.0f} tokens/s" for d, r in rate.items())
        + f"; in {minutes:g} minute{'' if minutes == 1 else 's'} depth {depth} sees about {seen:,.0f} tokens",
        f"model: depth {depth} (width {config.hidden_size}, {config.num_attention_heads} heads), "
        f"{config.num_parameters() / 1e6:.2f}M parameters: the deepest with ≥ {TOKENS_PER_PARAMETER} tokens per "
        "parameter in the budget",
        f"data seen about {epochs:.1f} times → dropout {dropout}; the best evaluation is kept as final/",
        f"schedule: about {steps:,} steps of {BATCH} × {SEQ_LEN} tokens, learning rate {lr:g}, "
        f"evaluated every {max(10, steps // 20)} steps; Muon for the blocks' matrices, AdamW for the rest",
    ]
    return Sizing(overrides, reasons)


def explain(sizing: Sizing) -> None:
    print("sized to the data and the budget (any of it can be overridden):", file=sys.stderr)
    for line in sizing.reasons:
        print(f"  {line}", file=sys.stderr)
