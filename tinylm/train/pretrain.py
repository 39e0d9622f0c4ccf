"""Pretraining (and continued pretraining): text files → a tokenizer → token shards → packed windows →
the one training loop → a model directory.

    tinylm pretrain --data corpus.txt more.jsonl.gz --out runs/mine
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinylm.config import ConfigError, EvalSection, LoRASection, TrainConfig, resolve_source, save_config
from tinylm.data import builtin
from tinylm.data.text import (
    PackedWindows,
    build_token_shards,
    iter_eval_windows,
    sources_fingerprint,
    train_tokenizer_from_files,
)
from tinylm.io import atomic_write_text
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.modelcard import CardFacts
from tinylm.modeldir import load_model_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train.distributed import Distributed
from tinylm.train.objectives import NextTokenLoss, shift_window
from tinylm.train.stage import (
    check_context,
    prepare_lora,
    run_card,
    save_final,
    stage_run,
    with_benchmarks,
)
from tinylm.train.trainer import FitResult, Task, fit

# -- the stage's config (the YAML sections and --section.key=value keys it takes) ----------------


@dataclass
class DataConfig:
    source: str | None = None  # "builtin" (the generated offline corpus) or "files"; unset: files if any are given
    files: list[str] = field(default_factory=list)  # .txt / .jsonl / .json / .parquet (plain or .gz)
    text_field: str = "text"  # the field holding the text in .jsonl / .json / .parquet
    txt_split: str = "blank"  # .txt documents: "blank" (blank-line separated), "line" or "file"
    val_fraction: float = 0.01
    val_files: list[str] = field(default_factory=list)  # the validation text (then nothing of files is held out)
    tokenizer: str | None = None  # a tokenizer (or model) directory; None trains one on the corpus
    vocab_size: int = 6400  # when training a tokenizer
    builtin_seed: int = 0

    def __post_init__(self):
        resolve_source(self, ("builtin", "files"))


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init_from: str | None = None  # a model directory to continue pretraining from
    lora: LoRASection = field(default_factory=LoRASection)
    eval: EvalSection = field(default_factory=EvalSection)  # benchmarks at each evaluation (none by default)


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
    if cfg.data.source == "builtin":  # the config checked the source and its files (resolve_source)
        return builtin.write_pretrain_corpus(run_dir / "data" / "builtin", seed=cfg.data.builtin_seed)
    return [Path(f) for f in cfg.data.files]


def prepare_tokenizer(cfg: PretrainConfig, files: list[Path], run_dir: Path, dist: Distributed):
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
    if dist.is_main and not (stamp.exists() and stamp.read_text(encoding="utf-8").strip() == key):
        print(f"training a {cfg.data.vocab_size}-token BPE tokenizer on {len(files)} file(s)", file=sys.stderr)
        tokenizer = train_tokenizer_from_files(
            files, cfg.data.vocab_size, text_field=cfg.data.text_field, txt_split=cfg.data.txt_split
        )
        tokenizer.save(own)
        atomic_write_text(stamp, key + "\n")
    dist.barrier()
    return Tokenizer.load(own)


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


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks=(),
    objective=None,
    card: CardFacts | None = None,
) -> tuple[Path, FitResult]:
    """Tokenize the corpus, train a model from scratch (or continue one), save ``out_dir/final``.
    ``objective``: the loss (default: next-token cross-entropy; distillation passes its own), ``card``:
    the stage's words on the model card (distillation's, likewise)."""
    if cfg.lora.enabled and not cfg.init_from:
        raise ConfigError("lora.enabled needs a model to adapt: continue pretraining one with --init MODEL_DIR")
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        if dist.is_main:  # the built-in corpus is written once, then every process reads it
            corpus_files(cfg, run_dir)
        dist.barrier()
        files = corpus_files(cfg, run_dir)
        tokenizer = prepare_tokenizer(cfg, files, run_dir, dist)
        shards = functools.partial(
            build_token_shards,
            files,
            tokenizer,
            run_dir / "data" / "shards",
            text_field=cfg.data.text_field,
            txt_split=cfg.data.txt_split,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.data.builtin_seed,
            val_paths=cfg.data.val_files,
        )
        if dist.is_main:  # the main process builds the shards; then every process finds them cached
            shards()
        dist.barrier()
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
        evaluate = with_benchmarks(evaluate, cfg.eval, tokenizer, dist)
        task = Task(
            model=model,
            batches=WindowBatches(windows, cfg.train.batch_size),
            objective=objective or NextTokenLoss(),
            evaluate=evaluate,
        )
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        model = result.model  # whole again (a sharded run gathers it on the main process)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            card = card or CardFacts(
                stage="continued pretraining" if cfg.init_from else "pretraining", tags=["pretraining"]
            )
            card = run_card(card, result, cfg.train, cfg.data, cfg.init_from, cfg.lora)
            save_final(model, tokenizer, final, lora, cfg.init_from, card)
        return final, result
