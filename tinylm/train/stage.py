"""What every training stage does around its work, and the pieces stages share.

    with stage_run(run_dir, cfg.train.device) as dist:
        model, tokenizer = load_to_fine_tune(cfg.init_from, "SFT", cfg.train.seq_len)  # or a new model
        lora = prepare_lora(model, cfg.lora, cfg.train.seed, dist.is_main)
        ...                                                               # the stage's own data and objective
        result = fit(task, cfg.train, run_dir, dist)
        card = run_card(CardFacts(stage="..."), result, cfg.train, cfg.data, cfg.init_from, cfg.lora)
        save_final(model, tokenizer, run_dir / "final", lora, cfg.init_from, card)

Under ``torchrun`` it joins the process group (and waits for the other processes before leaving it);
the run directory is created, and the main process holds its lock for the whole run, so a second run
into the same ``--out`` stops at once with "in use by process N" instead of clearing the first one's
scratch files under it.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tinylm.config import ConfigError
from tinylm.io import directory_lock, source_name
from tinylm.model.intquant import IntLinear
from tinylm.model.llama import DecoderModel
from tinylm.model.lora import adapters_disabled, add_lora, add_modules_to_save, add_token_rows
from tinylm.model.quant import quantize_linear_layers
from tinylm.modelcard import BUILTIN_LANGUAGES, CardFacts, builtin_dataset
from tinylm.modeldir import load_model_dir, model_reference, save_adapter, save_model_dir
from tinylm.train import distributed
from tinylm.train.objectives import NextTokenLoss
from tinylm.train.trainer import move


@contextmanager
def stage_run(run_dir: str | Path, device_name: str) -> Iterator[distributed.Distributed]:
    with distributed.process_group(device_name) as dist:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with directory_lock(run_dir) if dist.is_main else nullcontext():
            yield dist


def check_context(seq_len: int, config) -> None:
    """Training rows must fit the (language) model's context."""
    if seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len is {seq_len} but the model's context (max_position_embeddings) is "
            f"{config.max_position_embeddings}: lower one or raise the other"
        )


def load_to_fine_tune(model_dir: str | None, stage: str, seq_len: int | None = None):
    """(model in fp32, its tokenizer) of the model directory that ``stage`` starts from (the config's
    init_from); ``seq_len``: the training rows' length, which must fit the model's context."""
    if not model_dir:
        raise ConfigError(f"init_from is not set: give the model directory {stage} starts from (--init MODEL_DIR)")
    model, tokenizer = load_model_dir(model_dir)
    if tokenizer is None:
        raise ConfigError(f"{model_dir}: has no tokenizer.json; {stage} needs the model's tokenizer")
    if seq_len is not None:
        check_context(seq_len, model.config)
    return model.float().train(), tokenizer


def rows_to_train(section, template, tokenizer, base_had_template: bool, examples=()) -> list[int]:
    """The token ids whose embedding rows train with a LoRA adapter (``lora.train_rows``). A frozen
    embedding cannot learn what the base never saw: the chat markup, for a base that had no chat
    template, and the words of replies its pretraining text never held (the quickstart's identity
    answers, its refusals); "replies" adds every token the training replies (``examples``' labels) use."""
    mode = section.train_rows
    if mode == "auto":
        mode = "none" if base_had_template else "replies"
    if not section.enabled or mode == "none":
        return []
    rows = set(template.markup_token_ids(tokenizer))
    if mode == "replies":
        rows |= {t for example in examples for t in example.labels if t >= 0}
    return sorted(rows)


def prepare_lora(
    model: DecoderModel,
    section,
    seed: int,
    main: bool = True,
    train_in_full: tuple[str, ...] = (),
    rows: list[int] | None = None,
):
    """With ``--lora``: (QLoRA: hold the targeted layers in 4-bit NF4, then) wrap them with LoRA so that
    only the adapter trains, and the modules named in ``train_in_full`` (a reward model's new score
    head: PEFT's ``modules_to_save``) with it, whole; the embedding rows of the ``rows`` token ids train
    too (``rows_to_train``; of the head as well when it is not tied), unless the config names its own.
    Stages that pick no rows (``rows`` None) leave ``lora.train_rows`` at auto or none.
    Returns the LoRAConfig, or None for full fine-tuning."""
    quantized = quantized_scheme(model)
    if not section.enabled:
        if quantized:
            raise ConfigError(
                f"the model is quantized ({quantized}): its integer weights cannot be fine-tuned; train a LoRA "
                "adapter on it (--lora), or start from the float model it was made from"
            )
        return None
    if quantized and section.quantize == "nf4":
        raise ConfigError(f"the model is already quantized ({quantized}): use --lora without --qlora to train on it")

    config = section.lora_config()
    if rows is None and section.train_rows not in ("auto", "none"):  # a stage that does not choose rows
        raise ConfigError(
            f"lora.train_rows {section.train_rows} is tinylm sft's (it picks the rows from the conversations); "
            "here name them with lora.trainable_token_indices"
        )
    if rows and not config.trainable_token_indices:
        chosen = {"embed_tokens": list(rows)} | ({} if model.config.tie_word_embeddings else {"lm_head": list(rows)})
        config = replace(config, trainable_token_indices=chosen)
    total = model.num_parameters()
    if section.quantize == "nf4":
        quantize_linear_layers(
            model, config.target_modules, block_size=section.block_size, double_quant=section.double_quant
        )
    torch.manual_seed(seed)  # A's random start: the same run gives the same adapter
    wrapped = add_lora(model, config)
    try:
        add_token_rows(model, config)
        add_modules_to_save(model, config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in train_in_full:
        model.get_submodule(name).requires_grad_(True)
    if main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = (
            "a 4-bit NF4 base" + (" (double quantized)" if section.double_quant else "")
            if section.quantize == "nf4"
            else f"a frozen quantized base ({quantized})"
            if quantized
            else "a frozen base"
        )
        whole = [*train_in_full, *config.modules_to_save]
        whole = f" (and {', '.join(whole)} whole)" if whole else ""
        for kind, ids in config.trainable_token_indices.items():
            shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
            whole += f"; {len(ids)} rows of {kind} (token ids {shown})"
        print(
            f"lora: rank {config.r} on {len(wrapped)} layers{whole} over {base}: {trainable:,} trainable parameters "
            f"({trainable / total:.2%} of {total:,})",
            file=sys.stderr,
        )
    return config


def quantized_scheme(model) -> str | None:
    """How a model loaded from a quantized directory holds its weights ("int4, groups of 32"), or None."""
    schemes = {m.scheme.describe() for m in model.modules() if isinstance(m, IntLinear)}
    return ", ".join(sorted(schemes)) or None


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` of the items (none when there are fewer than 20)."""
    count = int(len(items) * fraction) if len(items) >= 20 else 0
    chosen = set(np.random.default_rng(seed).permutation(len(items))[:count].tolist())
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


def with_benchmarks(evaluate, section, tokenizer, dist):
    """``evaluate`` (the validation loss), then ``section.tasks`` (the config's ``eval`` section) run by
    ``tinylm eval`` on the model as it is, their metrics as ``<task>/<metric>``. The main process runs
    the tasks; the tasks' names and files are checked now, so a typo fails before training does."""
    if not section.tasks:
        return evaluate
    from tinylm.eval.harness import evaluate as run_tasks
    from tinylm.eval.harness import task_names
    from tinylm.infer.engine import Engine

    task_names(section.tasks)

    def with_tasks(model) -> dict:
        metrics = evaluate(model) if evaluate is not None else {}
        if dist.is_main:
            settings = {k: getattr(section, k) for k in ("data_dir", "shots", "limit", "batch_size", "chat")}
            found = run_tasks(
                Engine(model, tokenizer),
                section.tasks,
                **settings,
                max_new_tokens=section.max_new_tokens,
                progress=False,
            )
            for task, entry in found["tasks"].items():
                metrics.update({f"{task}/{k}": v for k, v in entry.items() if k in BENCHMARK_METRICS})
        return metrics

    return with_tasks


BENCHMARK_METRICS = {
    "acc",
    "acc_norm",
    "exact_match,strict-match",
    "exact_match,flexible-extract",
    "bits_per_byte",
    "word_perplexity",
}


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


def save_final(model, tokenizer, final: Path, lora, base_dir: str | None, card: CardFacts | None = None) -> None:
    """The run's result: a model directory, or, for a LoRA run, an adapter directory (PEFT layout, with
    the tokenizer and stop tokens) over ``base_dir``; ``card``: its model card's facts (see run_card)."""
    model = model.cpu()
    if lora is None:
        save_model_dir(model, final, tokenizer=tokenizer, card=card)
    else:
        base = model_reference(base_dir)  # a Hub id as given, a local directory as its absolute path
        card = card or CardFacts()
        card = replace(card, base_model=base, relation="adapter", tags=[*card.tags, "lora", "peft"])
        save_adapter(
            model,
            lora,
            final,
            base_model=base,
            tokenizer=tokenizer,
            eos_token_id=model.config.eos_token_id,
            card=card,
        )
    print(
        f"saved {final}" + (" (a LoRA adapter; tinylm merge folds it into the base)" if lora else ""), file=sys.stderr
    )


# -- the model card of a run's result ------------------------------------------------------------


def run_card(card: CardFacts, result, train, data=None, base: str | None = None, lora=None) -> CardFacts:
    """The model card's facts of a finished run: ``card`` (the stage's own words, tags and notes)
    completed with the run's numbers (steps, tokens, time, final losses, the benchmarks of its last
    evaluation), its data (the config's data section), the model it started from and its key settings."""
    last = result.last_metrics
    training = {
        "steps": result.step,
        "tokens": result.tokens,
        "seconds": result.elapsed_s,
        "tokens_per_s": result.tokens / result.elapsed_s if result.elapsed_s else None,
        "train_loss": last.get("loss"),
        "val_loss": last.get("val_loss"),
        "best_val_loss": result.best.get("val_loss") if result.best else None,
    }
    datasets, language = data_facts(data) if data is not None else ([], [])
    benchmarks: dict[str, dict] = {}
    for key, value in last.items():
        task, _, metric = key.rpartition("/")
        if task and metric in BENCHMARK_METRICS:
            benchmarks.setdefault(task, {})[metric] = value
    return replace(
        card,
        base_model=card.base_model or base,
        relation=card.relation or ("finetune" if base else None),
        datasets=card.datasets or datasets,
        language=card.language or language,
        training=training,
        settings={**train_settings(train, lora), **card.settings},
        evaluation={**benchmarks, **card.evaluation},
        evaluation_source=card.evaluation_source or ("the run's last evaluation" if benchmarks else ""),
    )


def data_facts(section) -> tuple[list[str], list[str]]:
    """(datasets, languages) of a stage's data section: the built-in world of its seed, in English and
    Chinese, or the names of its files and the ids of its Hub datasets, each once (whose languages the
    card leaves to the reader)."""
    if section.source == "builtin":
        return [builtin_dataset(section.builtin_seed)], list(BUILTIN_LANGUAGES)
    return list(dict.fromkeys(source_name(f) for f in section.files)), []


def train_settings(train, lora=None) -> dict[str, str]:
    """The settings a model card shows of a run (its config.yaml holds them all)."""
    accumulated = f" ({train.batch_size} × {train.grad_accum} accumulated)" if train.grad_accum > 1 else ""
    settings = {
        "batch": f"{train.batch_size * train.grad_accum} rows of {train.seq_len} tokens{accumulated}",
        "learning rate": f"{train.lr:g}, {train.warmup_steps} warmup steps, cosine to {train.min_lr_ratio:g}×",
        "optimizer": f"{train.optimizer}, weight decay {train.weight_decay:g}",
        "precision": train.precision,
    }
    if lora is not None and lora.enabled:
        base = ", over a 4-bit NF4 base (QLoRA)" if lora.quantize == "nf4" else ""
        settings["LoRA"] = f"rank {lora.r}, alpha {lora.alpha:g} on {', '.join(lora.target_modules)}{base}"
    return settings


def reference_scorer(model, lora, score: Callable):
    """``score(reference, batch)`` under no_grad for the reference model of a stage that stays close to
    where it started (DPO, GRPO): the model with its LoRA adapter switched off (no second copy), or a
    frozen copy of the model as it is now, moved to the batch's device when it first sees one."""
    if lora is not None:

        def with_adapter_off(batch):
            with torch.no_grad(), adapters_disabled(model):
                return score(model, batch)

        return with_adapter_off
    frozen = copy.deepcopy(model).eval().requires_grad_(False)

    def with_frozen_copy(batch):
        if next(frozen.parameters()).device != batch["input_ids"].device:
            frozen.to(batch["input_ids"].device)
        with torch.no_grad():
            return score(frozen, batch)

    return with_frozen_copy
