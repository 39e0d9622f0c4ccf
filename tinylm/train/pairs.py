"""Preference pairs as training data, for every stage that learns from them (DPO, the reward model).

    template = chat_template_of(cfg, tokenizer)                 # the model's own chat template
    encoded, encoded_val = training_pairs(cfg, template, tokenizer, announce=True)
                                                                # read (preference_data), encoded (encode_pairs)
    batch = pairs_batch(encoded, picks, pad_id)                 # rows: chosen sides, then rejected sides
    evaluate = pair_evaluator(encoded_val, pad_id, cfg.train, objective)

A pair is a prompt (a conversation ending with the user) with a chosen and a rejected answer; each
side is encoded as one sequence, prompt + answer, as the chat template renders it. The ``cfg`` these
functions read is any stage config with ``init_from``, a ``data`` section (``PreferenceDataConfig``)
and a ``train`` section.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from tinylm.chat_template import find_template, get_template
from tinylm.config import ConfigError, TrainConfig, resolve_source
from tinylm.data.builtin import World
from tinylm.data.builtin_preference import preference_pairs
from tinylm.data.chat_rows import Encoded, encode_for_training
from tinylm.data.preference import read_preferences
from tinylm.model.loss import IGNORE
from tinylm.train.stage import split_validation
from tinylm.train.trainer import move


@dataclass
class PreferenceDataConfig:
    source: str | None = None  # "builtin" (the built-in preference pairs) or "files"; unset: files if any are given
    files: list[str] = field(default_factory=list)  # .json / .jsonl / .parquet pairs (.json(l) may be .gz)
    format: str = "auto"  # auto | minimind | llamafactory | hh-rlhf (auto: detected per record)
    template: str | None = None  # None: the model's own chat template (the one SFT attached)
    skip_bad: bool = False  # skip invalid pairs (and report how many) instead of stopping
    val_fraction: float = 0.05  # files only; the built-in pairs keep their own held-out set
    builtin_seed: int = 0

    def __post_init__(self):
        resolve_source(self, ("builtin", "files"))


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    source: str
    kind: str = ""


def preference_data(cfg) -> tuple[list, list, str]:
    """(training pairs, validation pairs, a line saying where they came from)."""
    if cfg.data.source == "builtin":
        train, heldout = preference_pairs(World(cfg.data.builtin_seed))
        return (
            train,
            heldout,
            f"built-in: {len(train)} pairs, {len(heldout)} held-out pairs in phrasings training never uses",
        )
    pairs, report = read_preferences(cfg.data.files, format=cfg.data.format, skip_bad=cfg.data.skip_bad)
    train, val = split_validation(pairs, cfg.data.val_fraction, cfg.train.seed)
    return train, val, report.summary()


def chat_template_of(cfg, tokenizer):
    """The template that renders the pairs: the one the config names, else the model's own."""
    if cfg.data.template:
        return get_template(cfg.data.template)
    template = find_template(tokenizer.chat_template)
    if template is None:
        raise ConfigError(
            f"{cfg.init_from}: its tokenizer has no tinylm chat template to score answers with; "
            "name one with --template (chatml, vicuna, llama-chinese, raw)"
        )
    return template


def final_answer_only(mask: list[bool]) -> list[bool]:
    """The loss mask of a whole conversation → the mask of its last assistant turn alone."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(mask))]


def encode_pairs(
    pairs, template, tokenizer, seq_len: int, *, for_reward_model: bool = False
) -> tuple[list[EncodedPair], list[str]]:
    """Each pair as two training sequences (prompt + chosen, prompt + rejected) whose labels mark the
    answer. A pair longer than ``seq_len`` is truncated, as preference trainers commonly do: the
    prompt loses tokens from its start (but keeps at least half the context when the answers are
    long), the answers lose their ends. Returns the pairs and the sources of the truncated ones.

    A side ends with the answer's end-of-turn marker, which DPO scores as the answer's last label.
    ``for_reward_model``: each side is instead the whole conversation exactly as the template renders
    it (``apply_chat_template``), what it writes after the marker included (ChatML's "\n"), as one
    unshifted row with no labels: a reward model reads every token and scores the last one."""
    budget = seq_len if for_reward_model else seq_len + 1  # inputs and shifted labels come from seq_len + 1
    encoded, truncated = [], []
    for pair in pairs:
        sides = []
        for answer in (pair.chosen, pair.rejected):
            ids, mask = template.encode(tokenizer, [*pair.prompt, {"role": "assistant", "content": answer}])
            mask = final_answer_only(mask)
            start, end = mask.index(True), len(mask) - mask[::-1].index(True)
            sides.append((ids[:start], ids[start:] if for_reward_model else ids[start:end]))
        prompt_len, answer_len = max(len(p) for p, _ in sides), max(len(a) for _, a in sides)
        if prompt_len + answer_len > budget:
            keep_prompt = min(prompt_len, max(budget - answer_len, budget // 2))
            sides = [(p[len(p) - min(len(p), keep_prompt) :], a[: budget - keep_prompt]) for p, a in sides]
            truncated.append(pair.source)
        if for_reward_model:
            rows = [Encoded(p + a, [IGNORE] * (len(p) + len(a))) for p, a in sides]
        else:
            rows = [encode_for_training(p + a, [False] * len(p) + [True] * len(a)) for p, a in sides]
        encoded.append(EncodedPair(*rows, pair.source, pair.kind))
    return encoded, truncated


def training_pairs(cfg, template, tokenizer, announce: bool, for_reward_model: bool = False):
    """(training pairs, validation pairs) read (``preference_data``) and encoded for the model, or one
    line saying there are none; with ``announce``, where they came from and how many were truncated."""
    train_pairs, val_pairs, summary = preference_data(cfg)
    seq_len = cfg.train.seq_len
    train_set, truncated = encode_pairs(train_pairs, template, tokenizer, seq_len, for_reward_model=for_reward_model)
    val_set, _ = encode_pairs(val_pairs, template, tokenizer, seq_len, for_reward_model=for_reward_model)
    if not train_set:  # the read report on one line: each file, and the first error of each kind
        raise ValueError(f"no preference pairs to train on ({'; '.join(map(str.strip, summary.splitlines()))})")
    if announce:
        print(f"data: {summary}", file=sys.stderr)
        note = f" ({len(truncated):,} truncated to train.seq_len={seq_len}, e.g. {', '.join(truncated[:2])})"
        print(
            f"train: {len(train_set):,} pairs{note if truncated else ''}; validation: {len(val_set):,} pairs",
            file=sys.stderr,
        )
    return train_set, val_set


def pairs_batch(pairs: list[EncodedPair], picks: list[int], pad_id: int, ref_logps: torch.Tensor | None = None) -> dict:
    """Rows 0..P-1: the picked pairs' chosen sides, rows P..2P-1: their rejected sides; right-padded
    to the longest (padding after the answer changes nothing under causal attention)."""
    rows = [pairs[i].chosen for i in picks] + [pairs[i].rejected for i in picks]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row.input_ids)
        labels[r, : len(row)] = torch.tensor(row.labels)
    batch = {"input_ids": input_ids, "labels": labels}
    if ref_logps is not None:
        batch["ref_logps"] = torch.cat([ref_logps[picks, 0], ref_logps[picks, 1]])
    return batch


def pair_evaluator(pairs: list[EncodedPair], pad_id: int, train: TrainConfig, objective, ref_logps=None):
    """Held-out loss per pair, and what ``objective`` adds up (rewards, margin, accuracy...), each with
    a ``val_`` prefix, over the first ``train.eval_batches`` batches of the validation pairs."""
    size = train.batch_size
    batches = [list(range(i, min(i + size, len(pairs)))) for i in range(0, len(pairs), size)][: train.eval_batches]

    @torch.no_grad()
    def evaluate(model) -> dict:
        if not batches:
            return {}
        device = next(model.parameters()).device
        loss = sum(
            objective(model, move(pairs_batch(pairs, picks, pad_id, ref_logps), device)).item() for picks in batches
        )
        totals = objective.pop_metrics()
        count = totals.pop("count")
        return {"val_loss": loss / count, **{f"val_{key}": value / count for key, value in totals.items()}}

    return evaluate
