"""Training objectives. Each returns the SUM of its per-target losses plus the number of targets, and
the trainer divides by the targets of the whole optimizer step (all micro-batches, all processes), so
gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinylm.model.llama import segment_mask
from tinylm.model.loss import IGNORE


class NextTokenLoss:
    """Cross-entropy of each labelled next token: batch = {"input_ids": [B, T], "labels": [B, T]}.

    Pretraining labels every position; SFT labels only the assistant's tokens (the rest are IGNORE).
    Rows that pack several conversations also carry "position_ids" and "segments" [B, T]: positions
    restart for each conversation, and attention stays inside it. Batches of a vision-language model
    carry "pixel_values", the images whose features replace the image tokens.
    """

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> torch.Tensor:
        # the model computes the loss block by block from its hidden states (no [B, T, vocab] logits)
        images = {"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {}
        return model(batch["input_ids"], labels=batch["labels"], **packing(batch), **images)


def packing(batch: dict) -> dict:
    """The model's keyword arguments for rows that pack several conversations: positions that restart
    for each, and attention kept inside each (none for plain rows)."""
    if "segments" not in batch:
        return {}
    return {"position_ids": batch["position_ids"], "mask": segment_mask(batch["segments"])}


def shift_window(window: torch.Tensor) -> dict:
    """A packed window of T+1 tokens → inputs (the first T) and labels (the last T)."""
    return {"input_ids": window[:, :-1], "labels": window[:, 1:]}


# -- preference optimisation --------------------------------------------------------------------


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens (the answer), and their number."""
    token_logps = model(batch["input_ids"], labels=batch["labels"], per_token=True)
    return token_logps.sum(-1), (batch["labels"] != IGNORE).sum(-1)


def preference_losses(
    kind: str,
    beta: float,
    logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of the chosen and the rejected answers.

    ``logps`` and ``lengths`` hold the chosen answers in the first half and the rejected in the second.
        sigmoid (DPO, Rafailov et al. 2023): reward = β · (log π(y|x) − log π_ref(y|x));
                 loss = −log σ(reward_chosen − reward_rejected)
        simpo   (Meng et al. 2024): reward = β · mean token log π(y|x), no reference;
                 loss = −log σ(reward_chosen − reward_rejected − γ)
        orpo    (Hong et al. 2024): the chosen answer's cross-entropy + β · −log σ(log-odds ratio),
                 where odds(y) = p / (1 − p) of the mean token probability p; reward = β · mean log π
    """
    pairs = logps.shape[0] // 2
    mean = logps / lengths.clamp(min=1)
    if kind == "sigmoid":
        rewards = beta * (logps - ref_logps)
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()
    rewards = beta * mean
    chosen, rejected = rewards[:pairs], rewards[pairs:]
    if kind == "simpo":
        return -F.logsigmoid(chosen - rejected - simpo_gamma), chosen.detach(), rejected.detach()
    if kind == "orpo":
        log_odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-6))
        odds_ratio = log_odds[:pairs] - log_odds[pairs:]
        return -mean[:pairs] - beta * F.logsigmoid(odds_ratio), chosen.detach(), rejected.detach()
    raise ValueError(f"preference loss {kind!r}: expected sigmoid, simpo or orpo")


class PairTotals:
    """What a pair objective adds up for the log: per pair the rewards of both answers, their margin
    (chosen − rejected) and whether it is positive (accuracy: a tie counts as wrong), summed since the
    last ``pop_metrics`` with their "count"; the trainer averages them over all processes."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def add_pairs(self, chosen: torch.Tensor, rejected: torch.Tensor, **more: torch.Tensor) -> None:
        margin = chosen - rejected
        for key, value in {
            "count": chosen.shape[0],
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "margin": margin.sum(),
            "accuracy": (margin > 0).sum(),
            **more,
        }.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)

    def pop_metrics(self) -> dict[str, float]:
        """Sums since the last call ("count" pairs); the caller averages them over all processes."""
        totals, self.totals = self.totals, {}
        return totals


class PreferenceLoss(PairTotals):
    """DPO and its reference-free relatives on batches of answer pairs.

    batch = {"input_ids", "labels"} [2P, T]: rows 0..P-1 are the prompts with their chosen answers,
    rows P..2P-1 the same prompts with the rejected ones; labels mark the final answer only. The
    reference log-probabilities come with the batch ("ref_logps" [2P], precomputed) or from
    ``reference(batch)``. Adds up rewards, margins and accuracy for the log (``pop_metrics``).
    """

    def __init__(
        self,
        kind: str = "sigmoid",
        beta: float = 0.1,
        *,
        sft_weight: float = 0.0,
        simpo_gamma: float = 0.5,
        reference=None,
    ):
        super().__init__()
        self.kind, self.beta, self.sft_weight, self.simpo_gamma, self.reference = (
            kind,
            beta,
            sft_weight,
            simpo_gamma,
            reference,
        )

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # the loss is per pair

    def __call__(self, model, batch: dict) -> torch.Tensor:
        logps, lengths = sequence_logps(model, batch)
        ref_logps = None
        if self.kind == "sigmoid":
            ref_logps = batch["ref_logps"] if "ref_logps" in batch else self.reference(batch)
        losses, chosen, rejected = preference_losses(self.kind, self.beta, logps, lengths, ref_logps, self.simpo_gamma)
        pairs = logps.shape[0] // 2
        if self.sft_weight:
            losses = losses - self.sft_weight * logps[:pairs] / lengths[:pairs].clamp(min=1)
        self.add_pairs(chosen, rejected, prefers_chosen=(logps[:pairs] > logps[pairs:]).sum())
        return losses.sum()


# -- reward models ------------------------------------------------------------------------------


class BradleyTerryLoss(PairTotals):
    """A reward model learns from answer pairs (Bradley & Terry, 1952; InstructGPT's reward model):
    the chance that people prefer the chosen answer is modelled as σ(r_chosen − r_rejected), and the
    loss is its negative log, −log σ(r_chosen − r_rejected) per pair. Only the margin counts, so the
    rewards' level is free (adding a constant to every reward changes nothing).

    batch = {"input_ids"} [2P, T]: rows 0..P-1 the prompts with their chosen answers, rows P..2P-1
    the same prompts with the rejected ones, right-padded with the model's pad id; the model gives
    one reward per row (``tinylm.model.reward.RewardModel``). Adds up rewards, margin and accuracy.
    """

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # the loss is per pair

    def __call__(self, model, batch: dict) -> torch.Tensor:
        rewards = model(batch["input_ids"])
        pairs = rewards.shape[0] // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        self.add_pairs(chosen.detach(), rejected.detach())
        return -F.logsigmoid(chosen - rejected).sum()


# -- reinforcement learning ---------------------------------------------------------------------


class GRPOLoss:
    """Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath) on a batch of rollouts.

    batch = {"input_ids", "labels"} [R, T]: each row a prompt with one sampled reply, the reply's tokens
    labelled (its end-of-turn token too); "advantages" [R], the reply's reward relative to its group's;
    "ref_logps" [R, T] (with a KL term), the reference model's log-probability of each labelled token;
    "old_logps" [R, T] (with several updates per rollout), the policy's when it sampled. Per token,

        ratio = π(token) / π_old(token)
        loss  = −min(ratio · A, clip(ratio, 1 − ε, 1 + ε) · A) + β · KL
        KL    = π_ref/π − log(π_ref/π) − 1        (Schulman's k3 estimator: unbiased, never negative)

    summed over every reply token: the trainer divides by the tokens of the whole step (the token-level
    mean of DAPO, so a long reply weighs by its length, not one reply's mean per row). With one update
    per rollout, π_old is π itself (detached): the ratio is 1, only its gradient counts, and nothing
    is clipped. Adds up per reply: reward, its group's spread, length, KL and the share of clipped tokens.
    """

    def __init__(self, beta: float, epsilon: float):
        self.beta, self.epsilon = beta, epsilon
        self.totals: dict[str, float] = {}

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> torch.Tensor:
        logps = model(batch["input_ids"], labels=batch["labels"], per_token=True)
        mask = (batch["labels"] != IGNORE).to(logps.dtype)
        old = batch.get("old_logps", logps.detach())
        ratio = torch.exp(logps - old)
        advantages = batch["advantages"].to(logps.dtype)[:, None]
        clipped = ratio.clamp(1 - self.epsilon, 1 + self.epsilon)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        kl = torch.zeros_like(logps)
        if self.beta:
            log_ratio = batch["ref_logps"] - logps
            kl = torch.exp(log_ratio) - log_ratio - 1
            per_token = per_token + self.beta * kl
        with torch.no_grad():
            lengths = mask.sum(-1).clamp(min=1)
            was_clipped = (clipped * advantages < ratio * advantages).to(logps.dtype)
            self.add(
                count=len(lengths),
                reward=batch["rewards"].sum(),
                reward_std=batch["group_std"].sum(),
                length=mask.sum(),
                kl=((kl * mask).sum(-1) / lengths).sum(),
                clip_fraction=((was_clipped * mask).sum(-1) / lengths).sum(),
            )
        return (per_token * mask).sum()

    def add(self, **values) -> None:
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)

    def pop_metrics(self) -> dict[str, float]:
        """Sums since the last call ("count" replies); the caller averages them over all processes."""
        totals, self.totals = self.totals, {}
        return totals


# -- distillation -------------------------------------------------------------------------------


class DistillLoss:
    """Knowledge distillation (Hinton et al., 2015): the student learns the data's next tokens AND the
    teacher's whole next-token distribution, which says how plausible every other token is too.

    Per labelled token: (1 − w) · cross-entropy(student, label) + w · T² · KL(teacher_T ‖ student_T),
    where _T means softmax(logits / T). A temperature above 1 softens both distributions, so the
    teacher's small probabilities carry signal; T² keeps the gradient's size independent of T.
    The teacher is frozen and only ever runs forward.
    """

    def __init__(self, teacher, temperature: float = 1.0, kl_weight: float = 0.5, vocab_size: int | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.kl_weight, self.vocab_size = temperature, kl_weight, vocab_size

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def __call__(self, model, batch: dict) -> torch.Tensor:
        packed = packing(batch)
        labels = batch["labels"]
        labelled = labels != IGNORE
        if next(self.teacher.parameters()).device != labels.device:
            self.teacher.to(labels.device)
        # Models may pad their vocabulary (Qwen: 151,936 rows for 151,665 tokens): the distributions are
        # compared over the shared tokenizer's ids only.
        with torch.no_grad():
            teacher_logits = self.teacher(batch["input_ids"], logits_at=labelled, **packed)[
                :, : self.vocab_size
            ].float()
        student_logits = model(batch["input_ids"], logits_at=labelled, **packed)[:, : self.vocab_size].float()
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"the teacher predicts over {teacher_logits.shape[-1]:,} token ids, the student over "
                f"{student_logits.shape[-1]:,}: give DistillLoss the shared tokenizer's vocab_size"
            )
        t = self.temperature
        ce = F.cross_entropy(student_logits, labels[labelled], reduction="sum")
        kl = F.kl_div(
            F.log_softmax(student_logits / t, -1),
            F.log_softmax(teacher_logits / t, -1),
            log_target=True,
            reduction="sum",
        )
        return (1 - self.kl_weight) * ce + self.kl_weight * t * t * kl
