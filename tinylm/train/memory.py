"""How much memory one training process needs, by strategy: the arithmetic behind docs/scale.md.

What tinylm's trainer holds, per process, for a model of P parameters (T of them trained) on N
processes, with autocast in bf16 (2 bytes an activation) or fp32 (4):

    weights       fp32 master weights, 4·P; FSDP: 4·P/N, plus the unit being used gathered in the
                  compute precision (the root unit, embeddings and head, for the whole step, and up
                  to two layers as one is used and the next fetched); QLoRA: the targeted layers in
                  4-bit NF4 (half a byte and a little for the block scales)
    gradients     4·T; FSDP: 4·T/N
    optimizer     AdamW's two moments, 8·T; FSDP: 8·T/N
    activations   kept for the backward pass, per token and layer: the inputs and outputs of the
                  norms, projections and SwiGLU, about f = 10·h + 2·kv + 4·i values (h the hidden
                  size, kv the key/value width, i the MLP width); attention itself keeps no T×T matrix
                  (scaled_dot_product_attention); the loss is computed in blocks, so the logits are
                  small. The backward pass holds one layer's activation gradients at a time on top (f
                  more). With activation checkpointing each layer keeps only its input (h values), and
                  one layer at a time is recomputed in full (f) for its backward (f).

The arithmetic was checked against this machine's measured peak (tests/test_fsdp.py: 8 layers,
h = 128, i = 512, 16 × 512 tokens in fp32): 1,008 MiB computed and 946 MiB measured; recomputing,
256 and 261. Real runs add the CUDA context (about 0.5 GiB), the allocator's slack and temporary
buffers, so leave 10-20% room.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinylm.model.llama import ModelConfig

GIB = 2**30
NF4_BYTES = 0.5 + 4 / 64  # a 4-bit code per weight and an fp32 absmax per block of 64


@dataclass(frozen=True)
class Plan:
    """One way to train: the strategy and what else shrinks memory."""

    strategy: str = "ddp"  # single | ddp | fsdp | lora | qlora
    processes: int = 1
    activation_checkpointing: bool = False
    batch_size: int = 4  # sequences per micro-batch, per process
    seq_len: int = 1024
    precision: str = "bf16"  # the activations' precision under autocast
    lora_rank: int = 16

    def describe(self) -> str:
        name = {"single": "1 process", "lora": "LoRA", "qlora": "QLoRA"}.get(self.strategy, self.strategy.upper())
        if self.strategy in ("ddp", "fsdp"):
            name += f" × {self.processes}"
        return name + (" + act. ckpt" if self.activation_checkpointing else "")


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters of the embeddings, the head (0 when tied), one decoder layer, and the whole model."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = h * q + 2 * h * kv + q * h
    attention += (q + 2 * kv if config.attention_bias else 0) + (h if config.attention_out_bias else 0)
    attention += 2 * config.head_dim if config.qk_norm else 0
    mlp = 3 * h * i + (2 * i + h if config.mlp_bias else 0)
    layer = attention + mlp + 2 * h  # and the two norms
    embed = config.vocab_size * h
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return {"embed": embed, "head": head, "layer": layer, "total": embed + head + layers * layer + h}


def lora_parameters(config: ModelConfig, rank: int) -> int:
    """A rank-``rank`` adapter on every projection of every layer (q, k, v, o, gate, up, down)."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    pairs = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return config.num_hidden_layers * rank * sum(a + b for a, b in pairs)


def activation_values(config: ModelConfig, checkpointing: bool) -> tuple[int, int]:
    """(values per token kept by all layers for the backward pass, values per token the backward pass
    holds on top of them: one layer's activation gradients, and its recomputed activations)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * config.head_dim
    full_layer = 10 * h + 2 * kv + 4 * i
    if checkpointing:
        return config.num_hidden_layers * h, 2 * full_layer
    return config.num_hidden_layers * full_layer, full_layer


def estimate(config: ModelConfig, plan: Plan) -> dict[str, float]:
    """Bytes per process: weights, gradients, optimizer, activations and their total."""
    counts = parameter_counts(config)
    total, n = counts["total"], plan.processes if plan.strategy == "fsdp" else 1
    compute_bytes = 2 if plan.precision == "bf16" else 4
    if plan.strategy in ("lora", "qlora"):
        trained = lora_parameters(config, plan.lora_rank)
        if plan.strategy == "qlora":  # the layers' projections in NF4, embeddings, head and norms in fp32
            in_layers = config.num_hidden_layers * counts["layer"]
            weights = in_layers * NF4_BYTES + (total - in_layers) * 4 + trained * 4
        else:
            weights = (total + trained) * 4
    else:
        trained = total
        weights = 4 * total / n
        if plan.strategy == "fsdp":  # gathered: the root unit all step, and two layers
            weights += compute_bytes * (counts["embed"] + counts["head"] + 2 * counts["layer"])
    kept, backward = activation_values(config, plan.activation_checkpointing)
    tokens = plan.batch_size * plan.seq_len
    result = {
        "weights": weights,
        "gradients": 4 * trained / n,
        "optimizer": 8 * trained / n,
        "activations": compute_bytes * tokens * (kept + backward),
    }
    result["total"] = sum(result.values())
    return result


def table(shapes: dict[str, ModelConfig], plans: list[Plan]) -> str:
    """A Markdown table: one row per shape, one column per plan, GiB per process."""
    header = "| model | parameters | " + " | ".join(p.describe() for p in plans) + " |"
    lines = [header, "|" + "---|" * (len(plans) + 2)]
    for name, config in shapes.items():
        cells = [f"{estimate(config, p)['total'] / GIB:.1f}" for p in plans]
        lines.append(f"| {name} | {parameter_counts(config)['total'] / 1e6:,.0f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)
