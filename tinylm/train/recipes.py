"""Recipes: a stage's config → model, data, objective → the one training loop → a model directory.

Each recipe is a plain function (``pretrain(cfg, out_dir)``); the CLI only parses arguments and calls it.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from tinylm.chat_template import get_template
from tinylm.config import ConfigError, PretrainConfig, SFTConfig, save_config
from tinylm.data import builtin, builtin_chat
from tinylm.data.chat import Conversation, read_conversations
from tinylm.data.chat_rows import RowBatches, encode_conversations, pack, real_tokens, rows_batch
from tinylm.data.text import (
    PackedWindows,
    build_token_shards,
    iter_eval_windows,
    sources_fingerprint,
    train_tokenizer_from_files,
)
from tinylm.eval.questions import answer, chat_accuracy, tally
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.io import atomic_write_text
from tinylm.model.llama import CausalLM
from tinylm.model.lora import add_lora
from tinylm.model.quant import quantize_linear_layers
from tinylm.modeldir import load_model_dir, save_adapter, save_model_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train.objectives import NextTokenLoss, shift_window
from tinylm.train.stage import stage_run
from tinylm.train.trainer import FitResult, Task, fit, move

TOKENIZER_STAMP = "trained_on.sha256"  # in the run's tokenizer/: the key of the corpus and settings it came from


class WindowBatches:
    """Packed pretraining windows as trainer batches: {"input_ids", "labels"}."""

    def __init__(self, windows, batch_size: int):
        self.windows, self.batch_size = windows, batch_size

    def next_batch(self) -> dict:
        return shift_window(self.windows.next_batch(self.batch_size))

    def state_dict(self) -> dict:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)


def corpus_files(cfg: PretrainConfig, run_dir: Path) -> list[Path]:
    """The text files to train on: the configured ones, or the built-in corpus written into the run."""
    if cfg.data.source == "builtin":
        return builtin.write_pretrain_corpus(run_dir / "data" / "builtin", seed=cfg.data.builtin_seed)
    if cfg.data.source != "files":
        raise ValueError(f"data.source {cfg.data.source!r}: expected builtin or files")
    if not cfg.data.files:
        raise ValueError("data.source is files but data.files is empty: list .txt/.jsonl/.json/.parquet files")
    return [Path(f) for f in cfg.data.files]


def prepare_tokenizer(cfg: PretrainConfig, files: list[Path], run_dir: Path, main: bool):
    """Load the configured tokenizer, the one of ``init_from``, the run's own, or train a new one."""
    source = cfg.data.tokenizer or cfg.init_from
    if source:
        return Tokenizer.load(source)
    own = run_dir / "tokenizer"
    # the run's tokenizer is reused only while the corpus and the settings it was trained with are unchanged
    key = sources_fingerprint(
        files, vocab_size=cfg.data.vocab_size, text_field=cfg.data.text_field, txt_split=cfg.data.txt_split
    )
    stamp = own / TOKENIZER_STAMP
    if main and not (stamp.exists() and stamp.read_text(encoding="utf-8").strip() == key):
        print(f"training a {cfg.data.vocab_size}-token BPE tokenizer on {len(files)} file(s)", file=sys.stderr)
        tokenizer = train_tokenizer_from_files(
            files, cfg.data.vocab_size, text_field=cfg.data.text_field, txt_split=cfg.data.txt_split
        )
        tokenizer.save(own)
        atomic_write_text(stamp, key + "\n")
    distributed_barrier()
    return Tokenizer.load(own)


def distributed_barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def build_model(cfg: PretrainConfig, vocab_size: int, eos_id: int) -> CausalLM:
    if cfg.init_from:
        model, _ = load_model_dir(cfg.init_from, with_tokenizer=False)
        return model.float().train()
    cfg.model.vocab_size = vocab_size
    cfg.model.eos_token_id = eos_id
    torch.manual_seed(cfg.train.seed)
    return CausalLM(cfg.model)


def evaluator(val_bin: Path, meta: dict, seq_len: int, max_windows: int, dtype):
    """Validation loss (nats/token) and bits per byte over a fixed set of validation windows."""
    windows = list(iter_eval_windows(val_bin, seq_len, dtype, max_windows))
    tokens_per_byte = meta["val_tokens"] / max(meta["val_bytes"], 1)

    @torch.no_grad()
    def evaluate(model) -> dict:
        if not windows:
            return {}
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for window in windows:
            batch = shift_window(window.to(device)[None] if window.ndim == 1 else window.to(device))
            total += NextTokenLoss()(model, batch).item()
            count += batch["labels"].numel()
        loss = total / count
        return {"val_loss": loss, "val_bpb": loss * tokens_per_byte / math.log(2)}

    return evaluate


def unigram_bpb(train_bin: Path, val_bin: Path, meta: dict, vocab_size: int, dtype) -> float:
    """Bits per byte of the validation text under the training set's unigram distribution (add-one
    smoothed): the score of a model that learned token frequencies and nothing else."""
    train = np.memmap(train_bin, dtype=dtype, mode="r")
    val = np.memmap(val_bin, dtype=dtype, mode="r")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    nats = -log_probs[val].sum()
    return float(nats / max(meta["val_bytes"], 1) / math.log(2))


def prepare_lora(model: CausalLM, section, seed: int, main: bool = True):
    """With ``--lora``: (QLoRA: hold the targeted layers in 4-bit NF4, then) wrap them with LoRA so that
    only the adapter trains. Returns the LoRAConfig, or None for full fine-tuning."""
    if not section.enabled:
        return None

    config = section.lora_config()
    total = model.num_parameters()
    if section.quantize == "nf4":
        quantize_linear_layers(
            model, config.target_modules, block_size=section.block_size, double_quant=section.double_quant
        )
    torch.manual_seed(seed)  # A's random start: the same run gives the same adapter
    wrapped = add_lora(model, config)
    if main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = (
            "a 4-bit NF4 base" + (" (double quantized)" if section.double_quant else "")
            if section.quantize == "nf4"
            else "a frozen base"
        )
        print(
            f"lora: rank {config.r} on {len(wrapped)} layers over {base}: {trainable:,} trainable parameters "
            f"({trainable / total:.2%} of {total:,})",
            file=sys.stderr,
        )
    return config


def save_final(model, tokenizer, final: Path, lora, base_dir: str | None) -> None:
    """The run's result: a model directory, or, for a LoRA run, an adapter directory (PEFT layout, with
    the tokenizer and stop tokens) over ``base_dir``."""
    model = model.cpu()
    if lora is None:
        save_model_dir(model, final, tokenizer=tokenizer)
    else:
        save_adapter(
            model,
            lora,
            final,
            base_model=str(Path(base_dir).resolve()),
            tokenizer=tokenizer,
            eos_token_id=model.config.eos_token_id,
        )
    print(
        f"saved {final}" + (" (a LoRA adapter; tinylm merge folds it into the base)" if lora else ""), file=sys.stderr
    )


def pretrain(
    cfg: PretrainConfig, out_dir: str | Path, *, resume: bool = False, callbacks=(), objective=None
) -> tuple[Path, FitResult]:
    """Tokenize the corpus, train a model from scratch (or continue one), save ``out_dir/final``.
    ``objective``: the loss (default: next-token cross-entropy; distillation passes its own)."""
    if cfg.lora.enabled and not cfg.init_from:
        raise ConfigError("lora.enabled needs a model to adapt: continue pretraining one with --init MODEL_DIR")
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        if dist.is_main:  # the built-in corpus is written once, then every process reads it
            corpus_files(cfg, run_dir)
        distributed_barrier()
        files = corpus_files(cfg, run_dir)
        tokenizer = prepare_tokenizer(cfg, files, run_dir, dist.is_main)
        shards = functools.partial(
            build_token_shards,
            files,
            tokenizer,
            run_dir / "data" / "shards",
            text_field=cfg.data.text_field,
            txt_split=cfg.data.txt_split,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.builtin_seed,
        )
        if dist.is_main:  # the main process builds the shards; then every process finds them cached
            shards()
        distributed_barrier()
        info = shards()
        model = build_model(cfg, tokenizer.vocab_size, tokenizer.eos_id)
        cfg.model = model.config  # with init_from, the loaded model's shape is the one that trains
        lora = prepare_lora(model, cfg.lora, cfg.train.seed, dist.is_main)
        check_context(cfg.train.seq_len, model.config)
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
            print(
                f"model: {model.config.model_type}, {model.num_parameters() / 1e6:.2f}M parameters; "
                f"data: {info.train_tokens:,} training tokens",
                file=sys.stderr,
            )
        windows = PackedWindows(
            info.train_bin,
            cfg.train.seq_len,
            info.dtype,
            seed=cfg.train.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        evaluate = evaluator(info.val_bin, info.meta, cfg.train.seq_len, cfg.train.eval_batches, info.dtype)
        task = Task(
            model=model,
            batches=WindowBatches(windows, cfg.train.batch_size),
            objective=objective or NextTokenLoss(),
            evaluate=evaluate,
        )
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            save_final(model, tokenizer, final, lora, cfg.init_from)
        return final, result


# -- supervised fine-tuning ---------------------------------------------------------------------


def chat_conversations(cfg: SFTConfig, run_dir: Path) -> tuple[list, str]:
    """The conversations to fine-tune on, validated, and a line saying where they came from.

    With ``data.identity_name`` set (the identity recipe), the identity templates filled with that name
    and author are mixed in, and the built-in conversations answer "who are you?" with it too.
    """
    name, author = identity(cfg)
    if cfg.data.source == "builtin" and name:
        found = builtin_chat.sft_conversations(builtin.World(cfg.data.builtin_seed), name=name, author=author)
        conversations, summary = (
            [Conversation(m, f"built-in conversation {i}") for i, m in enumerate(found)],
            f"built-in: {len(found):,} conversations",
        )
    elif cfg.data.source in ("builtin", "files"):
        if cfg.data.source == "builtin":
            files = builtin_chat.write_sft_corpus(run_dir / "data" / "builtin", seed=cfg.data.builtin_seed)
        elif not cfg.data.files:
            raise ValueError(
                "data.source is files but data.files is empty: list .json/.jsonl/.parquet conversation files"
            )
        else:
            files = [Path(f) for f in cfg.data.files]
        conversations, report = read_conversations(files, format=cfg.data.format, skip_bad=cfg.data.skip_bad)
        summary = report.summary()
    else:
        raise ValueError(f"data.source {cfg.data.source!r}: expected builtin or files")
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


def identity_report(engine, cfg: SFTConfig) -> dict:
    """How well the identity took: held-out paraphrased "who are you / who made you" questions answered
    with the new name or author, and how often replies to general questions mention the name (they
    should not: the model must not answer everything with its name)."""
    name, author = identity(cfg)
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    asked = chat_accuracy(engine, builtin_chat.identity_questions(name, author), chat_format)
    questions = builtin_chat.general_questions(builtin.World(cfg.data.builtin_seed))
    replies = answer(engine, questions, chat_format)
    general = tally(questions, [builtin_chat.score_reply(q, r) for q, r in zip(questions, replies)], [])
    mentions = sum(name.lower() in reply.lower() for reply in replies)
    return {
        "name": name,
        "author": author,
        "identity_accuracy": asked["accuracy"],
        "identity_questions": asked["total"],
        "general_accuracy": general["accuracy"],
        "general_questions": general["total"],
        "general_mentioning_name": mentions / max(general["total"], 1),
        "examples": asked["examples"],
    }


def check_context(seq_len: int, config) -> None:
    """Training rows must fit the (language) model's context."""
    if seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len is {seq_len} but the model's context (max_position_embeddings) is "
            f"{config.max_position_embeddings}: lower one or raise the other"
        )


def load_to_fine_tune(model_dir: str, stage: str):
    """(model in fp32, its tokenizer) of a model directory that ``stage`` starts from."""
    model, tokenizer = load_model_dir(model_dir)
    if tokenizer is None:
        raise ConfigError(f"{model_dir}: has no tokenizer.json; {stage} needs the model's tokenizer")
    return model.float().train(), tokenizer


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` of the items (none when there are fewer than 20)."""
    count = int(len(items) * fraction) if len(items) >= 20 else 0
    chosen = set(np.random.default_rng(seed).permutation(len(items))[:count].tolist())
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


def row_evaluator(rows, batch_size: int, max_batches: int):
    """Validation loss (nats per assistant token) over packed validation rows."""
    return loss_evaluator(len(rows), lambda picks: rows_batch(rows, picks), batch_size, max_batches)


def loss_evaluator(size: int, make_batch, batch_size: int, max_batches: int):
    """Validation loss (nats per labelled token) over the first ``max_batches`` batches of ``size`` items
    in order; ``make_batch(indices)`` builds a batch."""
    batches = [list(range(i, min(i + batch_size, size))) for i in range(0, size, batch_size)][:max_batches]

    @torch.no_grad()
    def evaluate(model) -> dict:
        if not batches:
            return {}
        device = next(model.parameters()).device
        total = count = 0
        for picks in batches:
            batch = move(make_batch(picks), device)
            total += NextTokenLoss()(model, batch).item()
            count += NextTokenLoss().count(batch)
        return {"val_loss": total / max(count, 1)}

    return evaluate


def sft(
    cfg: SFTConfig, out_dir: str | Path, *, resume: bool = False, callbacks=(), objective=None
) -> tuple[Path, FitResult]:
    """Fine-tune the model in ``cfg.init_from`` on conversations; save a chat model in ``out_dir/final``.
    ``objective``: the loss (default: cross-entropy of the assistant's tokens; distillation passes its own)."""
    if not cfg.init_from:
        raise ValueError("init_from is not set: give the model directory to fine-tune (--init MODEL_DIR)")
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        model, tokenizer = load_to_fine_tune(cfg.init_from, "SFT")
        check_context(cfg.train.seq_len, model.config)
        template = get_template(cfg.data.template)
        tokenizer = template.attach(tokenizer)
        model.config.eos_token_id = template.stop_token_ids(tokenizer)  # generate stops at the end of the answer
        lora = prepare_lora(model, cfg.lora, cfg.train.seed, dist.is_main)

        conversations, data_summary = chat_conversations(cfg, run_dir)
        train_set, val_set = split_validation(conversations, cfg.data.val_fraction, cfg.train.seed)
        train_examples, fit_report = encode_conversations(train_set, template, tokenizer, cfg.train.seq_len)
        if not train_examples:
            raise ValueError(
                f"no conversation fits in train.seq_len={cfg.train.seq_len} tokens with the {template.name} template "
                f"({fit_report.summary()}): raise train.seq_len"
            )
        val_examples, _ = encode_conversations(val_set, template, tokenizer, cfg.train.seq_len)
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
        batches = RowBatches(
            train_rows, cfg.train.batch_size, seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size
        )
        evaluate = row_evaluator(val_rows, cfg.train.batch_size, cfg.train.eval_batches)
        task = Task(
            model=model,
            batches=batches,
            objective=objective or NextTokenLoss(),
            evaluate=evaluate,
            tokens_per_batch=real_tokens,
        )
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            save_final(model, tokenizer, final, lora, cfg.init_from)
            if cfg.data.identity_name:
                measured = identity_report(Engine(model.eval(), tokenizer), cfg)
                atomic_write_text(run_dir / "identity.json", json.dumps(measured, indent=2, ensure_ascii=False) + "\n")
                print(
                    f"identity: {measured['identity_accuracy']:.0%} of {measured['identity_questions']} held-out "
                    "questions answered "
                    f"as {measured['name']!r} / {measured['author']!r}; {measured['general_mentioning_name']:.1%} of "
                    f"{measured['general_questions']} general answers mention the name (accuracy on them "
                    f"{measured['general_accuracy']:.0%}); details in {run_dir / 'identity.json'}",
                    file=sys.stderr,
                )
        return final, result
