"""GRPO: reinforcement learning from rewards the policy earns with its own answers.

Each step the policy (the chat model being trained) answers a batch of prompts G times each, sampling;
a reward scores every reply (a built-in verifier, a reward model or the user's function; see
``tinylm.train.rewards``); and each reply's *advantage* is its reward against its own group's,

    A = (r − mean(group)) / (std(group) + 1e-4)          (or r − mean(group) with scale_rewards off)

so replies better than their siblings become more likely and worse ones less: no value model, no
critic, the group is the baseline (Shao et al., 2024). The loss is PPO's clipped surrogate with a KL
penalty to a frozen reference, the model before this stage (``objectives.GRPOLoss``); with ``--lora``
the reference is the same model with its adapter switched off, as in DPO. ``grpo.updates`` > 1 takes
that many optimizer steps on each batch of rollouts, where the ratio to the sampling policy and its
clipping start to matter.

Rollouts are the expensive part: the engine samples a group in one batch whose prompt is prefilled
once and copied to every row (``Engine.shared_prefill``). Logged per step: reward, reward_std (the
mean spread within a group: 0 means the group teaches nothing), length (reply tokens), KL to the
reference, clip_fraction. Each evaluation answers the held-out prompts greedily: for the built-in
prompts every held-out question of the chat model by kind (``heldout/arithmetic/en``, ...), which shows
what training on one kind costs the others; for files the mean reward of the held-out share.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinylm.config import ConfigError, EvalSection, LoRASection, TrainConfig, resolve_source, save_config
from tinylm.data.builtin import World
from tinylm.data.builtin_chat import score_reply
from tinylm.data.rl_prompts import (
    BUILTIN_KINDS,
    KIND_OF_PROMPT,
    RLPrompt,
    builtin_prompts,
    heldout_prompts,
    read_prompts,
)
from tinylm.data.walk import SeededWalk
from tinylm.device import autocast_dtype
from tinylm.eval.questions import REPLY_TOKENS, answer, tally
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.io import DataError, atomic_write_json
from tinylm.model.loss import IGNORE
from tinylm.modelcard import CardFacts, add_evaluation
from tinylm.train.metrics import plot_rewards
from tinylm.train.objectives import GRPOLoss
from tinylm.train.pairs import chat_template_of
from tinylm.train.rewards import Reward, build_reward
from tinylm.train.sharding import full_weights
from tinylm.train.stage import (
    load_to_fine_tune,
    prepare_lora,
    reference_scorer,
    run_card,
    save_final,
    split_validation,
    stage_run,
    with_benchmarks,
)
from tinylm.train.trainer import FitResult, Task, fit, move

# -- the stage's config (the YAML sections and --section.key=value keys it takes) ----------------


@dataclass
class PromptDataConfig:
    source: str | None = None  # "builtin" (the built-in world's training prompts) or "files"; unset: files if given
    files: list[str] = field(default_factory=list)  # .json / .jsonl / .parquet prompts (rl_prompts' layouts)
    # built-in: which kinds of prompt (rl_prompts.BUILTIN_KINDS), each "KIND" or "KIND:WEIGHT" (its
    # prompts walked WEIGHT times per epoch: "arithmetic:4" asks arithmetic four times as often)
    kinds: list[str] = field(default_factory=lambda: ["arithmetic"])
    template: str | None = None  # None: the model's own chat template
    skip_bad: bool = False  # skip invalid prompts, and prompts too long for the context, and count them
    val_fraction: float = 0.05  # files only; the built-in prompts are evaluated on the held-out questions
    builtin_seed: int = 0

    def __post_init__(self):
        resolve_source(self, ("builtin", "files"))
        self.weights = {}
        for entry in self.kinds:
            kind, _, weight = str(entry).partition(":")
            if kind not in BUILTIN_KINDS or (weight and not (weight.isdigit() and int(weight) > 0)):
                raise ConfigError(
                    f"kinds: expected KIND or KIND:WEIGHT, KIND one of {', '.join(BUILTIN_KINDS)} and WEIGHT a whole "
                    f"number above 0, got {entry!r}"
                )
            self.weights[kind] = int(weight or 1)


@dataclass
class GRPOSection:
    reward: str = "arithmetic"  # built-in verifiers joined by + (arithmetic, facts, think), rm:DIR, python:MOD:FN
    group_size: int = 8  # replies sampled per prompt (train.batch_size prompts per micro-batch)
    max_new_tokens: int = 32  # a reply's length limit
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0
    beta: float = 0.04  # the KL penalty's weight (0: no reference model)
    epsilon: float = 0.2  # the clip range of the policy ratio
    updates: int = 1  # optimizer steps on each batch of rollouts (PPO's epochs; the ratio is 1 when 1)
    scale_rewards: bool = True  # divide advantages by the group's standard deviation (off: Dr. GRPO)

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(f"group_size: a group needs at least 2 replies to compare, got {self.group_size}")
        if self.max_new_tokens < 1 or self.updates < 1:
            raise ConfigError(f"max_new_tokens and updates must be >= 1 (got {self.max_new_tokens}, {self.updates})")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"temperature must be > 0 (rollouts sample) and top_p in (0, 1] (got {self.temperature}, {self.top_p})"
            )
        if self.beta < 0 or not 0 < self.epsilon < 1:
            raise ConfigError(f"beta must be >= 0 and epsilon in (0, 1) (got {self.beta}, {self.epsilon})")


@dataclass
class GRPOConfig:
    init_from: str | None = None  # the chat model to train (usually an SFT run's final/)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    eval: EvalSection = field(default_factory=EvalSection)  # benchmarks at each evaluation (none by default)


# -- prompts ---------------------------------------------------------------------------------------


@dataclass
class EncodedPrompt:
    prompt: RLPrompt
    ids: list[int]


def prompt_sets(cfg: GRPOConfig) -> tuple[list[RLPrompt], list[RLPrompt], str]:
    """(training prompts, held-out prompts, a line saying where they came from)."""
    if cfg.data.source == "builtin":
        world = World(cfg.data.builtin_seed)
        weights = cfg.data.weights
        train = [p for p in builtin_prompts(world, tuple(weights)) for _ in range(weights[KIND_OF_PROMPT[p.kind]])]
        heldout = heldout_prompts(world)
        kinds = ", ".join(f"{k} ×{w}" if w > 1 else k for k, w in weights.items())
        return (
            train,
            heldout,
            f"built-in {kinds}: {len(train)} prompts; {len(heldout)} held-out questions of every kind",
        )
    prompts, report = read_prompts(cfg.data.files, skip_bad=cfg.data.skip_bad)
    train, val = split_validation(prompts, cfg.data.val_fraction, cfg.train.seed)
    return train, val, report.summary()


def encode_prompts(prompts: list[RLPrompt], template, tokenizer, context: int, room: int, skip_bad: bool):
    """Each prompt rendered up to where the reply begins, as ids; a prompt that leaves fewer than
    ``room`` tokens of the context for its reply is an error naming it (skipped and counted with
    ``skip_bad``). Returns (encoded prompts, skipped count)."""
    encoded, skipped = [], 0
    for prompt in prompts:
        ids, _ = template.encode(tokenizer, prompt.messages, add_generation_prompt=True)
        if len(ids) + room > context:
            if not skip_bad:
                raise DataError(
                    f"{prompt.source}: the prompt is {len(ids)} tokens and its reply may be {room} "
                    f"(grpo.max_new_tokens), more than the model's context of {context}: shorten it, lower "
                    "grpo.max_new_tokens, or pass --skip-bad to leave such prompts out",
                    "too_long",
                )
            skipped += 1
            continue
        encoded.append(EncodedPrompt(prompt, ids))
    return encoded, skipped


# -- rollouts: the batches the trainer reads ------------------------------------------------------


class Rollouts:
    """The trainer's batches for GRPO: each round samples ``group_size`` replies to each of
    ``grad_accum`` × ``batch_size`` prompts with the policy as it is, scores them, and serves the
    ``grad_accum`` micro-batches ``updates`` times. The prompts are walked like every stage's items
    (``SeededWalk``: seeded, sharded across processes); a round's seeds come from (seed, rank, round).
    ``state_dict`` keeps the walk's position and a round still being served, so a resumed run takes
    the very same steps."""

    def __init__(
        self, prompts, policy, tokenizer, template, reward, cfg: GRPOConfig, dist, reference=None, autocast=None
    ):
        self.prompts, self.policy, self.tokenizer, self.reward = prompts, policy, tokenizer, reward
        self.autocast = autocast or contextlib.nullcontext  # the precision the loss runs in, for its log-probabilities
        self.section, self.reference = cfg.grpo, reference
        self.grad_accum, self.seed, self.rank = cfg.train.grad_accum, cfg.train.seed, dist.rank
        self.walk = SeededWalk(
            len(prompts),
            cfg.train.batch_size,
            seed=cfg.train.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            what="prompts",
        )
        self.pad = tokenizer.eos_id
        self.settings = SamplingSettings(
            max_new_tokens=cfg.grpo.max_new_tokens,
            temperature=cfg.grpo.temperature,
            top_p=cfg.grpo.top_p,
            stop_token_ids=template.stop_token_ids(tokenizer),
            stop_strings=template.stop_strings,
        )
        self.rounds = 0  # rounds sampled so far
        self.round: list[dict] = []  # the micro-batches of the round being served
        self.served = 0  # of the round's grad_accum × updates micro-batches

    def next_batch(self) -> dict:
        if self.served == len(self.round) * self.section.updates:
            self.round = [self.rollout(self.walk.next_picks(), part) for part in range(self.grad_accum)]
            self.rounds += 1
            self.served = 0
        batch = self.round[self.served % len(self.round)]
        self.served += 1
        return batch

    def seed_of(self, part: int) -> int:
        return ((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.rounds * self.grad_accum + part) * 4096

    @torch.no_grad()
    def rollout(self, picks: list[int], part: int) -> dict:
        """Sample, score and encode one micro-batch: every picked prompt ``group_size`` times."""
        group = self.section.group_size
        chosen = [self.prompts[i] for i in picks for _ in range(group)]
        engine = Engine(self.policy, self.tokenizer)
        # sharded (train.strategy fsdp): each process gathers the whole policy to sample its own replies
        with full_weights(self.policy):
            try:
                settings = SamplingSettings(**{**self.settings.__dict__, "seed": self.seed_of(part)})
                replies = engine.run([p.ids for p in chosen], settings)
            finally:
                self.policy.train()
        texts = [c.text for c in replies]  # reasoning markers included, the end of turn left out
        rewards = torch.tensor(self.reward([p.prompt for p in chosen], texts), dtype=torch.float32)
        grouped = rewards.view(-1, group)
        spread = grouped.std(-1, keepdim=True)
        advantages = grouped - grouped.mean(-1, keepdim=True)
        if self.section.scale_rewards:
            advantages = advantages / (spread + 1e-4)
        rows = [p.ids + c.token_ids for p, c in zip(chosen, replies)]
        width = max(len(r) for r in rows) - 1
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (p, row) in enumerate(zip(chosen, rows)):
            input_ids[r, : len(row) - 1] = torch.tensor(row[:-1])
            labels[r, len(p.ids) - 1 : len(row) - 1] = torch.tensor(row[len(p.ids) :])
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "advantages": advantages.flatten(),
            "rewards": rewards,
            "group_std": spread.expand(-1, group).flatten(),
        }
        on_device = move(batch, next(self.policy.parameters()).device)
        with self.autocast():
            if self.reference is not None:
                batch["ref_logps"] = self.reference(on_device).float().cpu()
            if self.section.updates > 1:
                batch["old_logps"] = token_logps(self.policy, on_device).float().cpu()
        return batch

    def state_dict(self) -> dict:
        state = {"walk": self.walk.state_dict(), "rounds": self.rounds, "served": self.served}
        state["round"] = [{k: v.tolist() for k, v in b.items()} for b in self.round] if self.pending() else []
        return state

    def pending(self) -> bool:
        return bool(self.round) and self.served < len(self.round) * self.section.updates

    def load_state_dict(self, state: dict) -> None:
        self.walk.load_state_dict(state["walk"])
        self.rounds, self.served = state["rounds"], state["served"]
        self.round = [{k: torch.tensor(v) for k, v in b.items()} for b in state["round"]]
        for batch in self.round:
            for key in ("input_ids", "labels"):
                batch[key] = batch[key].long()
        if not self.round:
            self.served = 0


def token_logps(model, batch: dict) -> torch.Tensor:
    """The log-probability of each labelled token of a batch [rows, T] (0 where there is no label)."""
    return model(batch["input_ids"], labels=batch["labels"], per_token=True)


# -- evaluation -------------------------------------------------------------------------------------


def heldout_evaluator(heldout: list[EncodedPrompt], tokenizer, reward: Reward, builtin: bool, cfg):
    """The held-out prompts answered greedily (``questions.answer``, in the model's own chat format):
    for the built-in world, the share of right answers per kind and language (``heldout/arithmetic/en``,
    ...) and overall; for files, the mean reward."""
    prompts = [p.prompt for p in heldout]

    def evaluate(model) -> dict:
        if not prompts:
            return {}
        engine = Engine(model, tokenizer)
        chat_format = chat_format_for(tokenizer, model.config.eos_token_ids())
        replies = answer(engine, prompts, chat_format, max(cfg.grpo.max_new_tokens, REPLY_TOKENS))
        if builtin:
            found = tally(prompts, [score_reply(p, r) for p, r in zip(prompts, replies)], [])
            metrics = {"heldout/accuracy": found["accuracy"]}
            metrics |= {f"heldout/{kind}": share for kind, share in found["by_kind"].items()}
        else:
            scores = reward(prompts, replies)
            metrics = {"val_reward": sum(scores) / len(scores)}
        metrics["val_length"] = sum(len(tokenizer.encode(r)) for r in replies) / len(replies)
        return metrics

    return evaluate


# -- the stage --------------------------------------------------------------------------------------


def grpo(cfg: GRPOConfig, out_dir: str | Path, *, resume: bool = False, callbacks=()) -> tuple[Path, FitResult]:
    """Train the chat model in ``cfg.init_from`` with GRPO on ``cfg.grpo.reward``; save ``out_dir/final``
    and ``out_dir/grpo.json`` (held-out results before and after, and at each evaluation)."""
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        model, tokenizer = load_to_fine_tune(cfg.init_from, "GRPO")
        without_dropout(model)
        lora = prepare_lora(model, cfg.lora, cfg.train.seed, dist.is_main)
        model = model.to(dist.device)
        template = chat_template_of(cfg, tokenizer)
        tokenizer = template.attach(tokenizer)
        model.config.eos_token_id = template.stop_token_ids(tokenizer)
        reward = build_reward(cfg.grpo.reward, tokenizer)
        train_prompts, heldout, where = prompt_sets(cfg)
        reward.check(train_prompts + (heldout if cfg.data.source == "files" else []))
        context, room = model.config.max_position_embeddings, cfg.grpo.max_new_tokens
        # the built-in prompts are tinylm's own, so one too long for a small context is left out and counted
        skip = cfg.data.skip_bad or cfg.data.source == "builtin"
        train_set, skipped = encode_prompts(train_prompts, template, tokenizer, context, room, skip)
        heldout_set, skipped_val = encode_prompts(heldout, template, tokenizer, context, room, skip)
        if not train_set:
            raise DataError("no prompts left to train on", "empty")
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
            print(where, file=sys.stderr)
            if skipped or skipped_val:
                print(
                    f"left out {skipped} training and {skipped_val} held-out prompts too long for the context "
                    f"({context} tokens, {room} of them for the reply)",
                    file=sys.stderr,
                )
            g, p = cfg.grpo.group_size, cfg.train.batch_size
            print(
                f"GRPO: reward {reward.name}; {p} prompts × {g} replies per micro-batch, "
                f"{cfg.grpo.updates} update(s) per rollout, KL weight {cfg.grpo.beta}",
                file=sys.stderr,
            )
        builtin = cfg.data.source == "builtin"
        evaluate = heldout_evaluator(heldout_set, tokenizer, reward, builtin, cfg)
        amp = autocast_dtype(cfg.train.precision, dist.device)
        model.eval()
        with torch.no_grad(), torch.autocast(dist.device.type, dtype=amp) if amp else contextlib.nullcontext():
            before = evaluate(model)
        model.train()
        reference = reference_scorer(model, lora, token_logps) if cfg.grpo.beta > 0 else None
        autocast = (lambda: torch.autocast(dist.device.type, dtype=amp)) if amp else None
        batches = Rollouts(train_set, model, tokenizer, template, reward, cfg, dist, reference, autocast)
        evaluate = with_benchmarks(evaluate, cfg.eval, tokenizer, dist)
        objective = GRPOLoss(cfg.grpo.beta, cfg.grpo.epsilon)
        task = Task(model=model, batches=batches, objective=objective, evaluate=evaluate)
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        model = result.model  # whole again (a sharded run gathers it on the main process)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            after = {k: v for k, v in result.last_metrics.items() if k.startswith(("heldout/", "val_"))}
            report = {
                "reward": reward.name,
                "prompts": len(train_set),
                "heldout": len(heldout_set),
                "steps": result.step,
                "seconds": result.elapsed_s,
                "before": before,
                "after": after,
                "curve": [{"step": 0, "seconds": 0.0, **before}, *curve(run_dir / "metrics.jsonl")],
            }
            card = CardFacts(stage=f"reinforcement learning (GRPO, reward {reward.name})", tags=["grpo"])
            card = run_card(card, result, cfg.train, cfg.data, cfg.init_from, cfg.lora)
            save_final(model, tokenizer, final, lora, cfg.init_from, card)
            atomic_write_json(run_dir / "grpo.json", report)
            plot_rewards(run_dir / "metrics.jsonl", run_dir / "rewards.png", f"GRPO: {run_dir.name}", before)
            add_evaluation(final, card_evaluation(report), "before and after GRPO (grpo.json)")
            print(describe(report), file=sys.stderr)
        return final, result


def without_dropout(model) -> None:
    """GRPO compares the policy's probabilities at sampling and at training: dropout would make them
    differ for no reason, so it is off (as RL trainers commonly do)."""
    for name in ("attention_dropout", "hidden_dropout"):
        if getattr(model.config, name, 0):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0


def curve(metrics_path: Path) -> list[dict]:
    """Each evaluation of the run: its step, the training seconds so far, and its held-out results."""
    points, seconds = [], 0.0
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "elapsed_s" in record:
            seconds = record["elapsed_s"]
        held = {k: v for k, v in record.items() if k.startswith(("heldout/", "val_"))}
        if held and "loss" not in record:
            points.append({"step": record["step"], "seconds": seconds, **held})
    return points


def card_evaluation(report: dict) -> dict[str, dict]:
    before, after = report["before"], report["after"]
    rows = {}
    for key, value in after.items():
        if key.startswith("heldout/") or key == "val_reward":
            rows[key.removeprefix("heldout/")] = {"after GRPO": value, "before": before.get(key)}
    return rows


def describe(report: dict) -> str:
    before, after = report["before"], report["after"]
    lines = [f"GRPO: {report['steps']} steps, {report['seconds']:.0f} s of training; held-out, before → after:"]
    for key in sorted(k for k in after if k.startswith("heldout/") or k in ("val_reward", "val_length")):
        if key in before:
            lines.append(f"  {key.removeprefix('heldout/')}: {before[key]:.3g} → {after[key]:.3g}")
    return "\n".join(lines)
