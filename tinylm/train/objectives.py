"""Training objectives. Each returns the SUM of its per-target losses plus the number of targets, and
the trainer divides by the targets of the whole optimizer step (all micro-batches, all processes), so
gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that carry no loss (padding, prompts, ...)


class NextTokenLoss:
    """Cross-entropy of each next token: batch = {"input_ids": [B, T], "labels": [B, T]}."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> torch.Tensor:
        logits = model(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")


def shift_window(window: torch.Tensor) -> dict:
    """A packed window of T+1 tokens → inputs (the first T) and labels (the last T)."""
    return {"input_ids": window[:, :-1], "labels": window[:, 1:]}
