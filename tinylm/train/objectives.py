"""Training objectives. Each returns the SUM of its per-target losses plus the number of targets, and
the trainer divides by the targets of the whole optimizer step (all micro-batches, all processes), so
gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import torch

from tinylm.model.llama import segment_mask
from tinylm.model.loss import IGNORE


class NextTokenLoss:
    """Cross-entropy of each labelled next token: batch = {"input_ids": [B, T], "labels": [B, T]}.

    Pretraining labels every position; SFT labels only the assistant's tokens (the rest are IGNORE).
    Rows that pack several conversations also carry "position_ids" and "segments" [B, T]: positions
    restart for each conversation, and attention stays inside it.
    """

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> torch.Tensor:
        packed = {}
        if "segments" in batch:
            packed = {"position_ids": batch["position_ids"], "mask": segment_mask(batch["segments"])}
        # the model computes the loss block by block from its hidden states (no [B, T, vocab] logits)
        return model(batch["input_ids"], labels=batch["labels"], **packed)


def shift_window(window: torch.Tensor) -> dict:
    """A packed window of T+1 tokens → inputs (the first T) and labels (the last T)."""
    return {"input_ids": window[:, :-1], "labels": window[:, 1:]}
