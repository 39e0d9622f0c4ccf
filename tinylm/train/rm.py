"""The reward model: a chat model's decoder with a score head, trained to rate answers as people did.

Reinforcement learning from human feedback needs a judge it can ask about every answer the policy
writes. People cannot be asked millions of times, so a model learns their judgement from preference
pairs, a prompt with a chosen and a rejected answer, the same data DPO reads (``tinylm.train.pairs``).
It reads the whole conversation, prompt and answer, and gives one number, the reward r. The
Bradley-Terry model (1952) says people prefer the chosen answer with probability
σ(r_chosen − r_rejected), so the loss is

    loss = −log σ( r_chosen − r_rejected )              (per pair; objectives.BradleyTerryLoss)

The reward model starts as the chat model itself (it already understands the conversations) with its
lm_head replaced by a zero ``score`` head (``tinylm.model.reward.RewardModel``): every reward starts
at 0, every pair as a tie (loss log 2). A conversation is scored as the chat template renders it,
everything ``apply_chat_template`` writes included (ChatML's "\\n" after <|im_end|>), at its last token.

Logged per step: loss, rewards/chosen, rewards/rejected, margin (chosen − rejected) and accuracy (the
share of pairs whose chosen answer scores higher; a tie counts as wrong). The held-out pairs are
measured before training and after; both go to ``RUN/rm.json`` and the model card.

The result is a reward-model directory that transformers loads as ``AutoModelForSequenceClassification``
(``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification``, one label) with the same
scores; with ``--lora`` a PEFT adapter of task_type SEQ_CLS holding the score head whole.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from tinylm.chat_template import find_template
from tinylm.config import LoRASection, TrainConfig, save_config
from tinylm.data.walk import Batches
from tinylm.device import autocast_dtype
from tinylm.io import atomic_write_json
from tinylm.model.reward import RewardModel
from tinylm.modelcard import CardFacts, add_evaluation
from tinylm.train.objectives import BradleyTerryLoss
from tinylm.train.pairs import (
    PreferenceDataConfig,
    chat_template_of,
    pair_evaluator,
    pairs_batch,
    training_pairs,
)
from tinylm.train.stage import load_to_fine_tune, prepare_lora, run_card, save_final, stage_run
from tinylm.train.trainer import FitResult, Task, fit

# -- the stage's config (the YAML sections and --section.key=value keys it takes) ----------------


@dataclass
class RMConfig:
    """No ``eval`` section: its benchmarks generate or score continuations with a language model's
    head, which a reward model no longer has; the held-out pairs are its evaluation."""

    init_from: str | None = None  # the chat model the reward model starts from (usually an SFT run's final/)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRASection = field(default_factory=LoRASection)


# -- the pad token, and scoring conversations -----------------------------------------------------


def reward_pad_id(tokenizer, template) -> int:
    """The pad id of the reward model: the first of <|endoftext|>, the end-of-document token and the
    other special tokens that the chat template never writes.

    transformers reads a sequence classifier's score at each row's rightmost token that is not
    config.json's pad_token_id. A conversation ends with what the template writes after the answer
    (<|im_end|> and "\\n" in ChatML), so a pad id the template writes could be where a real sequence
    ends, and its score would be read one token early. The end-of-document token is the usual choice
    and fits tinylm's tokenizers; Qwen2.5-Instruct's tokenizer names <|im_end|> as its end of document,
    which ChatML writes after every turn, so <|endoftext|> comes first (Qwen's own pad token)."""
    markup = [{"role": role, "content": "x"} for role in ("system", "user", "assistant")]
    written = set(template.encode(tokenizer, markup)[0])
    candidates = [tokenizer.token_to_id("<|endoftext|>"), tokenizer.eos_id, *sorted(tokenizer.special_ids.values())]
    for candidate in candidates:
        if candidate is not None and candidate not in written:
            return candidate
    raise ValueError(
        f"the tokenizer has no special token that the {template.name} template never writes, to pad the reward "
        "model's batches with (its score is read at the last token that is not the pad)"
    )


def conversation_ids(template, tokenizer, messages: list[dict], max_len: int) -> list[int]:
    """The ids a reward model scores for ``messages``: the whole conversation as the template renders
    it (as ``apply_chat_template`` does). One longer than ``max_len`` (the model's context) loses its
    start, the prompt's oldest tokens, and keeps the answer the score is read after; transformers would
    read it whole, past the context the model was made for."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a reward model scores the last answer of a conversation: it must end with an assistant turn")
    ids, _ = template.encode(tokenizer, messages)
    return ids[-max_len:]


@torch.no_grad()
def score_conversations(model: RewardModel, tokenizer, conversations: list[list[dict]], batch_size: int = 16):
    """The reward of each conversation (a list of messages ending with the answer to score) [N], on the
    CPU; rendered with the tokenizer's chat template and scored in right-padded batches."""
    template = find_template(tokenizer.chat_template)
    if template is None:
        raise ValueError("the reward model's tokenizer has no tinylm chat template to render conversations with")
    rows = [
        conversation_ids(template, tokenizer, messages, model.config.max_position_embeddings)
        for messages in conversations
    ]
    device, was_training, scores = next(model.parameters()).device, model.training, []
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        input_ids = torch.full((len(batch), max(map(len, batch))), model.config.pad_token_id, dtype=torch.long)
        for r, ids in enumerate(batch):
            input_ids[r, : len(ids)] = torch.tensor(ids)
        scores.append(model(input_ids.to(device)).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


# -- the stage ------------------------------------------------------------------------------------


def rm(cfg: RMConfig, out_dir: str | Path, *, resume: bool = False, callbacks=()) -> tuple[Path, FitResult]:
    """Train a reward model from the chat model in ``cfg.init_from`` on preference pairs; save
    ``out_dir/final`` (a reward-model directory, or with LoRA its adapter) and ``out_dir/rm.json``."""
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        chat, tokenizer = load_to_fine_tune(cfg.init_from, "the reward model", cfg.train.seq_len)
        template = chat_template_of(cfg, tokenizer)
        tokenizer = template.attach(tokenizer)
        pad = reward_pad_id(tokenizer, template)
        model = RewardModel.from_language_model(chat, pad)
        # The adapter goes in on the CPU, before anything is scored; the new score head trains whole.
        lora = prepare_lora(model, cfg.lora, cfg.train.seed, dist.is_main, train_in_full=("score",))
        model = model.to(dist.device)
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
        train_set, val_set = training_pairs(cfg, template, tokenizer, dist.is_main, for_reward_model=True)
        if dist.is_main:
            print(
                f"reward model: scores read at each conversation's last token; pad id {pad} "
                f"({tokenizer.id_to_token(pad)}), which the {template.name} template never writes",
                file=sys.stderr,
            )

        evaluate = pair_evaluator(val_set, pad, cfg.train, BradleyTerryLoss())
        amp = autocast_dtype(cfg.train.precision, dist.device)
        model.eval()
        with torch.autocast(dist.device.type, dtype=amp) if amp else contextlib.nullcontext():
            before = evaluate(model)  # the zero head: every reward 0, loss log 2, accuracy 0 (ties)
        model.train()
        collate = partial(pairs_batch, train_set, pad_id=pad)
        batches = Batches.for_run(len(train_set), collate, cfg.train, dist, "preference pairs")
        task = Task(model=model, batches=batches, objective=BradleyTerryLoss(), evaluate=evaluate)
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        model = result.model  # whole again (a sharded run gathers it on the main process)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            after = {k: v for k, v in result.last_metrics.items() if k.startswith("val_")}
            report = {"pairs": len(val_set), "steps": result.step, "seconds": result.elapsed_s}
            report |= {"before": before, "after": after}
            card = CardFacts(stage="reward modelling (Bradley-Terry, on preference pairs)", tags=["bradley-terry"])
            card = run_card(card, result, cfg.train, cfg.data, cfg.init_from, cfg.lora)
            save_final(model, tokenizer, final, lora, cfg.init_from, card)
            atomic_write_json(run_dir / "rm.json", report)
            add_evaluation(final, card_evaluation(report), "before and after training (rm.json)")
            print(describe(report), file=sys.stderr)
        return final, result


def card_evaluation(report: dict) -> dict[str, dict]:
    """rm.json's held-out measurements as model card evaluation rows."""
    before, after = report["before"], report["after"]
    if not before:
        return {}
    return {
        "held-out preference pairs": {
            "accuracy": after.get("val_accuracy"),
            "accuracy before": before.get("val_accuracy"),
            "loss": after.get("val_loss"),
            "loss before": before.get("val_loss"),
            "margin": after.get("val_margin"),
            "items": report["pairs"],
        }
    }


def describe(report: dict) -> str:
    before, after = report["before"], report["after"]
    if not before:
        return "no validation pairs: nothing held out to measure (data.val_fraction, or more pairs)"
    return (
        f"held-out pairs ({report['pairs']:,}): the chosen answer scores higher in "
        f"{before.get('val_accuracy', 0):.1%} before (a tie counts as wrong, and before training every "
        f"reward is 0), {after.get('val_accuracy', 0):.1%} after; loss {before.get('val_loss', 0):.4f} → "
        f"{after.get('val_loss', 0):.4f}, margin {before.get('val_margin', 0):.3f} → {after.get('val_margin', 0):.3f}"
    )
