"""Conversations → training rows: encode with the chat template, fit to the context, pack.

Supervised fine-tuning trains on whole conversations, and only the assistant's tokens carry loss.
Conversations are short and of very different lengths, so giving each its own row of ``seq_len``
tokens would spend most of the compute on padding. Packing puts several conversations into one row:

    row:       [ conv A ........ | conv B .... | conv C ...... | pad ]
    positions:   0 1 2 ... 41      0 1 ... 17    0 1 ... 30      0 ...
    attention:   A sees only A,    B only B,     C only C        (pad: only pad)

Each conversation keeps its own positions (RoPE starts again at 0) and attends only to itself, so its
loss is exactly the loss it would have in a row of its own (tests/test_chat_rows.py checks this). The
attention mask is built from the per-token segment ids on the device (``segment_mask``).

A conversation longer than the context loses whole exchanges (a user turn and its answer) from the
left, keeping the system prompt; it is never cut inside an answer. One whose last exchange alone
does not fit is skipped and counted.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tinylm.model.loss import IGNORE

PAD_SEGMENT = -1  # segment id of the padding at the end of a row


@dataclass
class Encoded:
    """One conversation as training data: ``input_ids`` [n] and ``labels`` [n] (the next token where
    it is an assistant token to learn, else IGNORE)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class FitReport:
    """What fitting conversations to the context did to them."""

    kept: int = 0
    shortened: int = 0  # lost exchanges from the left
    dropped_exchanges: int = 0
    skipped_too_long: int = 0  # even the last exchange alone does not fit
    skipped_examples: list[str] = field(default_factory=list)  # a few of their sources, for the message

    def summary(self) -> str:
        text = f"{self.kept:,} conversations"
        if self.shortened:
            text += f" ({self.shortened:,} shortened by {self.dropped_exchanges:,} exchanges from the left)"
        if self.skipped_too_long:
            examples = ", ".join(self.skipped_examples)
            text += (
                f"; {self.skipped_too_long:,} skipped: their last exchange alone exceeds the context (e.g. {examples})"
            )
        return text


def encode_for_training(ids: Sequence[int], mask: Sequence[bool]) -> Encoded:
    """Template ids + loss mask → inputs and next-token labels: position t learns ids[t+1] when that
    token is in the mask (an assistant token, or the end-of-turn marker that teaches it to stop)."""
    labels = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)]
    return Encoded(list(ids[:-1]), labels)


def fit_conversation(
    template, tokenizer, messages: list[dict], max_tokens: int
) -> tuple[list[int], list[bool], int] | None:
    """Encode ``messages``, dropping whole exchanges from the left (after any system prompt) until it is
    at most ``max_tokens`` long. Returns (ids, mask, exchanges dropped), or None if nothing fits."""
    ids, mask = template.encode(tokenizer, messages)
    if len(ids) <= max_tokens:
        return ids, mask, 0  # the usual case: it fits whole
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    exchange_starts = [i for i, message in enumerate(turns) if message["role"] == "user"]
    # Grow from the newest exchange leftwards while it fits: as many encodes as exchanges kept, not dropped.
    fitted = None
    for kept, start in enumerate(reversed(exchange_starts[1:]), 1):
        ids, mask = template.encode(tokenizer, system + turns[start:])
        if len(ids) > max_tokens:
            break
        fitted = ids, mask, len(exchange_starts) - kept
    return fitted


def encode_conversations(conversations, template, tokenizer, seq_len: int) -> tuple[list[Encoded], FitReport]:
    """Every conversation (``.messages`` and ``.source``, or a plain message list) as training data of
    at most ``seq_len`` inputs."""
    report, encoded = FitReport(), []
    for conversation in conversations:
        messages = getattr(conversation, "messages", conversation)
        fitted = fit_conversation(template, tokenizer, messages, seq_len + 1)
        if fitted is None:
            report.skipped_too_long += 1
            if len(report.skipped_examples) < 3:
                report.skipped_examples.append(
                    getattr(conversation, "source", f"conversation {report.kept + report.skipped_too_long}")
                )
            continue
        ids, mask, dropped = fitted
        encoded.append(encode_for_training(ids, mask))
        report.kept += 1
        report.shortened += dropped > 0
        report.dropped_exchanges += dropped
    return encoded, report


# -- packing -----------------------------------------------------------------------------------


@dataclass
class PackedRows:
    """Rows of ``seq_len`` tokens, each holding one or more whole conversations and then padding.

    Arrays [rows, seq_len]: ``input_ids``, ``labels``, ``positions`` (restarting at 0 for each
    conversation) and ``segments`` (0, 1, 2, ... per conversation in the row; PAD_SEGMENT for padding).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    segments: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def real_tokens(self) -> int:
        return int((self.segments != PAD_SEGMENT).sum())


def pack(examples: list[Encoded], seq_len: int, pad_id: int = 0, packed: bool = True) -> PackedRows:
    """Place conversations into rows of ``seq_len`` by best fit, longest first (each goes into the
    fullest row that still has room). ``packed=False`` gives each conversation a row of its own."""
    rows: list[list[int]] = []  # example indices per row
    if packed:
        free: list[tuple[int, int]] = []  # (room left, row index), sorted
        for index in sorted(range(len(examples)), key=lambda i: -len(examples[i])):
            need = len(examples[index])
            slot = bisect.bisect_left(free, (need, -1))
            if slot < len(free):
                room, row = free.pop(slot)
            else:
                room, row = seq_len, len(rows)
                rows.append([])
            rows[row].append(index)
            if room - need > 0:
                bisect.insort(free, (room - need, row))
    else:
        rows = [[index] for index in range(len(examples))]

    shape = (len(rows), seq_len)
    out = PackedRows(
        input_ids=np.full(shape, pad_id, dtype=np.int64),
        labels=np.full(shape, IGNORE, dtype=np.int64),
        positions=np.zeros(shape, dtype=np.int64),
        segments=np.full(shape, PAD_SEGMENT, dtype=np.int64),
    )
    for r, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members):
            example = examples[index]
            end = start + len(example)
            out.input_ids[r, start:end] = example.input_ids
            out.labels[r, start:end] = example.labels
            out.positions[r, start:end] = np.arange(len(example))
            out.segments[r, start:end] = segment
            start = end
    return out


def rows_batch(rows: PackedRows, picks: Sequence[int]) -> dict:
    """The chosen rows as a batch of LongTensors: input_ids, labels, position_ids, segments."""
    picks = np.asarray(picks)
    return {
        "input_ids": torch.from_numpy(rows.input_ids[picks]),
        "labels": torch.from_numpy(rows.labels[picks]),
        "position_ids": torch.from_numpy(rows.positions[picks]),
        "segments": torch.from_numpy(rows.segments[picks]),
    }


def real_tokens(batch: dict) -> int:
    """Tokens of a batch that belong to a conversation (not padding): the useful work."""
    return int((batch["segments"] != PAD_SEGMENT).sum())
