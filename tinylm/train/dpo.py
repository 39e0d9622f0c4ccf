"""Preference optimisation: teach a chat model which of two answers people prefer.

Each example is a prompt with a chosen and a rejected answer. DPO (Rafailov et al., 2023) needs no
reward model: it raises the chosen answer's log-probability relative to a frozen *reference* (the
model before this stage) and lowers the rejected one's,

    loss = −log σ( β·[log π(chosen) − log π_ref(chosen)] − β·[log π(rejected) − log π_ref(rejected)] )

where each bracket, times β, is an answer's implicit *reward*. The reference is a frozen copy of the
starting model, or, when training a LoRA adapter, the same model with its adapter switched off (no
second copy); ``dpo.reference: precomputed`` scores every pair with it once, before training, and
keeps only the numbers. SimPO and ORPO need no reference at all (see objectives.preference_losses).

Only the final answer's tokens are scored (the end-of-turn marker included); the prompt, and any
earlier turns of a multi-turn prompt, are context. Pairs longer than the context are truncated.
Logged per step: loss, rewards/chosen, rewards/rejected, margin, accuracy (the share of pairs whose
chosen reward is higher) and prefers_chosen (the share where the model itself gives the chosen answer
the higher probability).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from tinylm.config import ConfigError, EvalSection, LoRASection, TrainConfig, save_config
from tinylm.data.walk import Batches
from tinylm.device import autocast_dtype
from tinylm.eval.questions import heldout_qa
from tinylm.io import atomic_write_json
from tinylm.modelcard import CardFacts, add_evaluation
from tinylm.train.objectives import PreferenceLoss, sequence_logps
from tinylm.train.pairs import (
    EncodedPair,
    PreferenceDataConfig,
    chat_template_of,
    pair_evaluator,
    pairs_batch,
    training_pairs,
)
from tinylm.train.stage import (
    load_to_fine_tune,
    prepare_lora,
    reference_scorer,
    run_card,
    save_final,
    stage_run,
    with_benchmarks,
)
from tinylm.train.trainer import FitResult, Task, fit, move

# -- the stage's config (the YAML sections and --section.key=value keys it takes) ----------------


@dataclass
class DPOSection:
    loss: str = "sigmoid"  # sigmoid (DPO) | orpo | simpo; ORPO and SimPO need no reference model
    beta: float | None = None  # DPO/SimPO: the reward scale; ORPO: the odds-ratio weight (None: 0.1, SimPO 2.0)
    # DPO's reference: model (scored batch by batch: a frozen copy, or the base under a LoRA adapter)
    # | precomputed (scored once, before training)
    reference: str = "model"
    sft_weight: float = 0.0  # add this × the chosen answers' cross-entropy per token (keeps the answers likely)
    simpo_gamma: float = 0.5  # SimPO: the target reward margin

    def __post_init__(self):
        if self.loss not in ("sigmoid", "orpo", "simpo"):
            raise ConfigError(f"loss: expected sigmoid, orpo or simpo, got {self.loss!r}")
        if self.reference not in ("model", "precomputed"):
            raise ConfigError(f"reference: expected model or precomputed, got {self.reference!r}")
        if self.reference == "precomputed" and self.loss != "sigmoid":
            raise ConfigError(
                f"reference is precomputed but loss {self.loss} uses no reference model: drop one of them"
            )
        if self.loss == "orpo" and self.sft_weight:
            raise ConfigError(
                "sft_weight is set but ORPO already includes the chosen answers' cross-entropy: leave it at 0"
            )
        if self.beta is None:
            self.beta = 2.0 if self.loss == "simpo" else 0.1
        if self.beta <= 0 or self.sft_weight < 0 or self.simpo_gamma < 0:
            raise ConfigError(
                f"beta must be > 0, sft_weight and simpo_gamma >= 0 (got {self.beta}, {self.sft_weight}, "
                f"{self.simpo_gamma})"
            )


@dataclass
class DPOConfig:
    init_from: str | None = None  # the chat model to align (usually an SFT run's final/)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    dpo: DPOSection = field(default_factory=DPOSection)
    eval: EvalSection = field(default_factory=EvalSection)  # benchmarks at each evaluation (none by default)


@torch.no_grad()
def score_pairs(model, pairs: list[EncodedPair], pad_id: int, batch_size: int) -> torch.Tensor:
    """log π(chosen) and log π(rejected) of every pair under ``model``: [pairs, 2]."""
    device, scores = next(model.parameters()).device, []
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        picks = list(range(start, min(start + batch_size, len(pairs))))
        logps, _ = sequence_logps(model, move(pairs_batch(pairs, picks, pad_id), device))
        scores.append(logps.float().cpu().view(2, -1).T)
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0, 2)


def answer_logps(model, batch: dict) -> torch.Tensor:
    """Each row's summed log-probability of its answer: what DPO's reference scores."""
    return sequence_logps(model, batch)[0]


def dpo(cfg: DPOConfig, out_dir: str | Path, *, resume: bool = False, callbacks=()) -> tuple[Path, FitResult]:
    """Align the chat model in ``cfg.init_from`` with preference pairs; save ``out_dir/final``."""
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        model, tokenizer = load_to_fine_tune(cfg.init_from, "DPO", cfg.train.seq_len)
        # Adapters (and QLoRA's 4-bit base) go in first, on the CPU: B starts at zero, so the model
        # scored below as the reference is exactly the one the adapter-off reference will be.
        lora = prepare_lora(model, cfg.lora, cfg.train.seed, dist.is_main)
        model = model.to(dist.device)
        template = chat_template_of(cfg, tokenizer)
        tokenizer = template.attach(tokenizer)
        model.config.eos_token_id = template.stop_token_ids(tokenizer)
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
        train_set, val_set = training_pairs(cfg, template, tokenizer, dist.is_main)
        pad = tokenizer.eos_id

        # The reference is the model as it is now: score the validation pairs (and, if asked, the
        # training pairs) with it before anything changes, in the precision training will use.
        amp = autocast_dtype(cfg.train.precision, dist.device)
        with torch.autocast(dist.device.type, dtype=amp) if amp else contextlib.nullcontext():
            val_ref = score_pairs(model, val_set, pad, cfg.train.batch_size)
            train_ref = (
                score_pairs(model, train_set, pad, cfg.train.batch_size) if cfg.dpo.reference == "precomputed" else None
            )
            validation = PreferenceLoss(cfg.dpo.loss, cfg.dpo.beta, simpo_gamma=cfg.dpo.simpo_gamma)
            evaluate = pair_evaluator(val_set, pad, cfg.train, validation, val_ref)
            before = evaluate(model)
        reference = (
            reference_scorer(model, lora, answer_logps) if cfg.dpo.loss == "sigmoid" and train_ref is None else None
        )
        objective = PreferenceLoss(
            cfg.dpo.loss,
            cfg.dpo.beta,
            sft_weight=cfg.dpo.sft_weight,
            simpo_gamma=cfg.dpo.simpo_gamma,
            reference=reference,
        )
        collate = partial(pairs_batch, train_set, pad_id=pad, ref_logps=train_ref)
        batches = Batches.for_run(len(train_set), collate, cfg.train, dist, "preference pairs")
        evaluate = with_benchmarks(evaluate, cfg.eval, tokenizer, dist)
        task = Task(model=model, batches=batches, objective=objective, evaluate=evaluate)
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        model = result.model  # whole again (a sharded run gathers it on the main process)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            after = {k: v for k, v in result.last_metrics.items() if k.startswith("val_")}
            report = {"before": before, "after": after}
            if val_set:
                with torch.autocast(dist.device.type, dtype=amp) if amp else contextlib.nullcontext():
                    val_after = score_pairs(model, val_set, pad, cfg.train.batch_size)
                report["pairs"] = preferred_by_kind(val_set, val_ref, val_after)
            if cfg.data.source == "builtin":
                report["heldout_qa"] = {"before": heldout_qa(cfg.init_from, cfg.data.builtin_seed), "after": None}
            name = {"sigmoid": "DPO", "orpo": "ORPO", "simpo": "SimPO"}[cfg.dpo.loss]
            card = CardFacts(stage=f"preference optimisation ({name})", tags=[name.lower()])
            card = run_card(card, result, cfg.train, cfg.data, cfg.init_from, cfg.lora)
            save_final(model, tokenizer, final, lora, cfg.init_from, card)
            if cfg.data.source == "builtin":
                report["heldout_qa"]["after"] = heldout_qa(final, cfg.data.builtin_seed)
            atomic_write_json(run_dir / "dpo.json", report)
            add_evaluation(final, card_evaluation(report, len(val_set)), f"before and after {name} (dpo.json)")
            print(describe(report), file=sys.stderr)
        return final, result


def preferred_by_kind(pairs: list[EncodedPair], before: torch.Tensor, after: torch.Tensor) -> dict:
    """How often the model gives the chosen answer the higher probability, before and after, over all
    held-out pairs, over those it got wrong before ("wrong before": what training had to change), and
    by each pair's kind where the pairs have one: {group: {"pairs", "before", "after"}}."""
    was_right, is_right = (before[:, 0] > before[:, 1]).tolist(), (after[:, 0] > after[:, 1]).tolist()
    groups: dict[str, list[int]] = {"all": list(range(len(pairs))), "wrong before": []}
    for i, pair in enumerate(pairs):
        if not was_right[i]:
            groups["wrong before"].append(i)
        if pair.kind:
            groups.setdefault(pair.kind, []).append(i)
    return {
        group: {
            "pairs": len(picks),
            "before": sum(was_right[i] for i in picks) / len(picks),
            "after": sum(is_right[i] for i in picks) / len(picks),
        }
        for group, picks in groups.items()
        if picks
    }


def card_evaluation(report: dict, pairs: int) -> dict[str, dict]:
    """dpo.json's measurements as model card evaluation rows: the held-out pairs (and by kind), and the
    held-out questions of the built-in world (which DPO must not cost), by kind."""
    before, after = report["before"], report["after"]
    found = {}
    if before:
        found["held-out preference pairs"] = {
            "prefers chosen": after.get("val_prefers_chosen"),
            "prefers chosen before": before.get("val_prefers_chosen"),
            "reward accuracy": after.get("val_accuracy"),
            "reward margin": after.get("val_margin"),
            "items": pairs,
        }
    for group, row in report.get("pairs", {}).items():
        if group != "all":
            found[f"held-out pairs, {group}"] = {
                "prefers chosen": row["after"],
                "prefers chosen before": row["before"],
                "items": row["pairs"],
            }
    qa = report.get("heldout_qa")
    if qa:
        found["held-out questions"] = {"accuracy": qa["after"]["accuracy"], "accuracy before": qa["before"]["accuracy"]}
        for kind, share in qa["after"]["by_kind"].items():
            found[f"held-out questions: {kind}"] = {"accuracy": share, "accuracy before": qa["before"]["by_kind"][kind]}
    return found


def describe(report: dict) -> str:
    before, after = report["before"], report["after"]
    if not before:
        return "no validation pairs: nothing held out to measure (data.val_fraction, or more pairs)"
    lines = [
        f"held-out pairs: the model prefers the chosen answer in {before.get('val_prefers_chosen', 0):.1%} before, "
        f"{after.get('val_prefers_chosen', 0):.1%} after; reward accuracy {after.get('val_accuracy', 0):.1%}, "
        f"margin {after.get('val_margin', 0):.3f}"
    ]
    lines += [
        f"  {group}: {row['before']:.1%} → {row['after']:.1%} of {row['pairs']}"
        for group, row in report.get("pairs", {}).items()
        if group != "all"
    ]
    if "heldout_qa" in report:
        qa = report["heldout_qa"]
        before, after = qa["before"]["accuracy"], qa["after"]["accuracy"]
        lines.append(f"held-out questions answered right: {before:.1%} before, {after:.1%} after")
        if qa["after"].get("left_out"):
            lines.append(f"  ({qa['after']['left_out']} held-out questions too long for the model's context left out)")
        lines += [
            f"  {kind}: {qa['before']['by_kind'][kind]:.1%} → {share:.1%}"
            for kind, share in qa["after"]["by_kind"].items()
        ]
    return "\n".join(lines)
