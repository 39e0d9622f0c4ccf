"""Supervised fine-tuning: conversations → the chat template's ids and loss mask → packed rows → the
one training loop → a chat model (or a LoRA adapter) that stops where its template says.

    tinylm sft --init runs/tiny/final --data chats.jsonl --out runs/chat
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from tinylm.chat_template import get_template
from tinylm.config import ConfigError, EvalSection, LoRASection, TrainConfig, resolve_source, save_config
from tinylm.data import builtin, builtin_chat
from tinylm.data.chat import Conversation, read_conversations
from tinylm.data.chat_rows import encode_conversations, pack, real_tokens, rows_batch
from tinylm.data.walk import Batches
from tinylm.eval.questions import identity_report
from tinylm.infer.engine import Engine
from tinylm.io import atomic_write_json
from tinylm.modelcard import CardFacts, add_evaluation
from tinylm.train.objectives import NextTokenLoss
from tinylm.train.stage import (
    load_to_fine_tune,
    loss_evaluator,
    prepare_lora,
    rows_to_train,
    run_card,
    save_final,
    split_validation,
    stage_run,
    with_benchmarks,
)
from tinylm.train.trainer import FitResult, Task, fit

# -- the stage's config (the YAML sections and --section.key=value keys it takes) ----------------


@dataclass
class ChatDataConfig:
    source: str | None = None  # "builtin" (the built-in conversations) or "files"; unset: files if any are given
    files: list[str] = field(default_factory=list)  # .json / .jsonl / .parquet conversations (.json(l) may be .gz)
    format: str = "auto"  # auto | openai | sharegpt | alpaca (auto: detected per record)
    template: str = "chatml"  # chatml | vicuna | llama-chinese | raw
    skip_bad: bool = False  # skip invalid conversations (and report how many) instead of stopping
    packing: bool = True  # several conversations per row (attention kept inside each)
    identity_name: str | None = None  # teach the assistant this name ("who are you?"): the identity recipe
    identity_author: str | None = None  # ... and who made it
    val_fraction: float = 0.02
    builtin_seed: int = 0
    # built-in conversations: the share of sums worked out before the answer (1/3: the RL demos' cold start)
    builtin_reasoning: float = builtin_chat.REASONING_SHARE

    def __post_init__(self):
        resolve_source(self, ("builtin", "files"))
        if not 0.0 <= self.builtin_reasoning <= 1.0:
            raise ConfigError(f"data.builtin_reasoning: expected a share between 0 and 1, got {self.builtin_reasoning}")
        if self.builtin_reasoning != builtin_chat.REASONING_SHARE and self.source != "builtin":
            raise ConfigError(
                "data.builtin_reasoning shapes the built-in conversations; it has no effect on --data files"
            )


@dataclass
class SFTConfig:
    init_from: str | None = None  # the model directory to fine-tune (tinylm or a local transformers Llama/Qwen)
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    eval: EvalSection = field(default_factory=EvalSection)  # benchmarks at each evaluation (none by default)


def chat_conversations(cfg: SFTConfig, run_dir: Path) -> tuple[list, str]:
    """The conversations to fine-tune on, validated, and a line saying where they came from.

    With ``data.identity_name`` set (the identity recipe), the identity templates filled with that name
    and author are mixed in, and the built-in conversations answer "who are you?" with it too.
    """
    name, author = identity(cfg)
    if cfg.data.source == "builtin" and name:
        world = builtin.World(cfg.data.builtin_seed)
        found = builtin_chat.sft_conversations(
            world, name=name, author=author, reasoning_share=cfg.data.builtin_reasoning
        )
        conversations, summary = (
            [Conversation(m, f"built-in conversation {i}") for i, m in enumerate(found)],
            f"built-in: {len(found):,} conversations",
        )
    else:  # the config checked the source and its files (resolve_source)
        if cfg.data.source == "builtin":
            files = builtin_chat.write_sft_corpus(
                run_dir / "data" / "builtin", seed=cfg.data.builtin_seed, reasoning_share=cfg.data.builtin_reasoning
            )
        else:
            files = [Path(f) for f in cfg.data.files]
        conversations, report = read_conversations(files, format=cfg.data.format, skip_bad=cfg.data.skip_bad)
        summary = report.summary()
    if name:
        extra = builtin_chat.identity_conversations(name, author)
        conversations = conversations + [Conversation(m, f"identity template {i}") for i, m in enumerate(extra)]
        summary += f"; identity: {len(extra)} conversations naming {name!r} by {author!r}"
    return conversations, summary


def identity(cfg: SFTConfig) -> tuple[str | None, str | None]:
    """(name, author) of the identity recipe, or (None, None) when it is off."""
    if not cfg.data.identity_name:
        if cfg.data.identity_author:
            raise ConfigError("data.identity_author is set but data.identity_name is not: give both (--identity-name)")
        return None, None
    return cfg.data.identity_name, cfg.data.identity_author or builtin_chat.DEFAULT_AUTHOR


def identity_evaluation(measured: dict) -> dict[str, dict]:
    """The identity recipe's measurements as model card evaluation rows."""
    return {
        "identity questions": {"accuracy": measured["identity_accuracy"], "items": measured["identity_questions"]},
        "general questions": {
            "accuracy": measured["general_accuracy"],
            "share mentioning the name": measured["general_mentioning_name"],
            "items": measured["general_questions"],
        },
    }


def row_evaluator(rows, batch_size: int, max_batches: int):
    """Validation loss (nats per assistant token) over packed validation rows."""
    return loss_evaluator(len(rows), lambda picks: rows_batch(rows, picks), batch_size, max_batches)


def sft(
    cfg: SFTConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks=(),
    objective=None,
    card: CardFacts | None = None,
) -> tuple[Path, FitResult]:
    """Fine-tune the model in ``cfg.init_from`` on conversations; save a chat model in ``out_dir/final``.
    ``objective``: the loss (default: cross-entropy of the assistant's tokens; distillation passes its own),
    ``card``: the stage's words on the model card (distillation's, likewise)."""
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        model, tokenizer = load_to_fine_tune(cfg.init_from, "SFT", cfg.train.seq_len)
        template = get_template(cfg.data.template)
        base_had_template = tokenizer.chat_template is not None
        tokenizer = template.attach(tokenizer)
        model.config.eos_token_id = template.stop_token_ids(tokenizer)  # generate stops at the end of the answer

        conversations, data_summary = chat_conversations(cfg, run_dir)
        train_set, val_set = split_validation(conversations, cfg.data.val_fraction, cfg.train.seed)
        train_examples, fit_report = encode_conversations(train_set, template, tokenizer, cfg.train.seq_len)
        if not train_examples:
            raise ValueError(
                f"no conversation fits in train.seq_len={cfg.train.seq_len} tokens with the {template.name} template "
                f"({fit_report.summary()}): raise train.seq_len"
            )
        val_examples, _ = encode_conversations(val_set, template, tokenizer, cfg.train.seq_len)
        rows = rows_to_train(cfg.lora, template, tokenizer, base_had_template, train_examples)
        lora = prepare_lora(model, cfg.lora, cfg.train.seed, dist.is_main, rows=rows)
        pad = tokenizer.eos_id
        train_rows = pack(train_examples, cfg.train.seq_len, pad, packed=cfg.data.packing)
        val_rows = pack(val_examples, cfg.train.seq_len, pad, packed=cfg.data.packing)
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
            print(f"data: {data_summary}", file=sys.stderr)
            print(
                f"train: {fit_report.summary()} in {len(train_rows):,} rows of {cfg.train.seq_len} "
                f"({train_rows.real_tokens / max(train_rows.input_ids.size, 1):.0%} real tokens); "
                f"validation: {len(val_examples):,} conversations",
                file=sys.stderr,
            )
        batches = Batches.for_run(len(train_rows), partial(rows_batch, train_rows), cfg.train, dist, "packed rows")
        evaluate = with_benchmarks(
            row_evaluator(val_rows, cfg.train.batch_size, cfg.train.eval_batches), cfg.eval, tokenizer, dist
        )
        task = Task(
            model=model,
            batches=batches,
            objective=objective or NextTokenLoss(),
            evaluate=evaluate,
            tokens_per_batch=real_tokens,
        )
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        model = result.model  # whole again (a sharded run gathers it on the main process)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            name, author = identity(cfg)
            card = card or CardFacts(stage="supervised fine-tuning (SFT)", tags=["sft"])
            if name:
                card = replace(card, notes=[*card.notes, f"It was taught to call itself {name}, made by {author}."])
            card = run_card(card, result, cfg.train, cfg.data, cfg.init_from, cfg.lora)
            save_final(model, tokenizer, final, lora, cfg.init_from, card)
            if name:
                measured = identity_report(Engine(model.eval(), tokenizer), name, author, cfg.data.builtin_seed)
                atomic_write_json(run_dir / "identity.json", measured)
                add_evaluation(final, identity_evaluation(measured), "held-out identity questions (identity.json)")
                print(
                    f"identity: {measured['identity_accuracy']:.0%} of {measured['identity_questions']} held-out "
                    "questions answered "
                    f"as {measured['name']!r} / {measured['author']!r}; {measured['general_mentioning_name']:.1%} of "
                    f"{measured['general_questions']} general answers mention the name (accuracy on them "
                    f"{measured['general_accuracy']:.0%}); details in {run_dir / 'identity.json'}",
                    file=sys.stderr,
                )
        return final, result
