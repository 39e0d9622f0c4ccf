"""Run configs: dataclasses filled from a YAML file, then from dotted ``--section.key=value`` overrides.

    tinylm pretrain --config configs/cpu-tiny.yaml --train.max_steps=200 --model.num_hidden_layers=2

Every key is checked against the dataclass: an unknown key or a value of the wrong type is an error that
names the key and where it came from. The fully resolved config is saved in the run directory.

This module holds the loader and the sections every stage shares (``train``, ``lora``); each stage's own
config lives beside its recipe (``tinylm.train.pretrain.PretrainConfig``, ``tinylm.train.sft.SFTConfig``,
``tinylm.train.dpo.DPOConfig``, ``tinylm.train.rm.RMConfig``, ``tinylm.train.distill.DistillConfig``,
``tinylm.train.vlm.VLMStageConfig``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tinylm.io import atomic_write_text
from tinylm.model.lora import ALL_LINEAR, LoRAConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and what was expected."""


def resolve_source(section, sources: tuple[str, ...]) -> None:
    """A data section's ``source`` left unset means "files" when files are given, else "builtin"; files
    with the built-in data, or a source that needs files without any, is an error rather than a surprise."""
    if section.source is None:
        section.source = "files" if section.files else "builtin"
    if section.source not in sources:
        raise ConfigError(f"source: expected one of {', '.join(sources)}, got {section.source!r}")
    if section.source == "builtin" and section.files:
        raise ConfigError(
            f"files are given ({', '.join(section.files[:3])}) but source is builtin: "
            "drop source (or set it to files) to train on the files, or drop the files"
        )
    if section.source != "builtin" and not section.files:
        raise ConfigError(f"source is {section.source} but no files are given: set files: [...] (or --data FILE ...)")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    # > 0: train for this many minutes of wall-clock time (evaluations and checkpoints included) instead
    # of max_steps; the cosine decays over the time, so the run ends on time with its schedule complete
    max_minutes: float = 0.0
    batch_size: int = 16  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to norms, embeddings and biases
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | mps
    # how several processes (torchrun) share the work: ddp (each holds the whole model) | fsdp (the
    # model, its gradients and the optimizer's moments are split across them: tinylm.train.sharding)
    strategy: str = "ddp"
    cpu_offload: bool = False  # fsdp: keep the parameter shards and optimizer moments in CPU memory
    # recompute each block's activations in the backward pass instead of keeping them: less memory,
    # about a third more compute; the same gradients
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 16
    save_every: int = 500  # 0: only at the end (and on Ctrl-C)
    keep_checkpoints: int = 2  # 0 keeps them all
    keep_best: bool = False  # the weights saved as final/ are those of the evaluation with the lowest val_loss
    patience: int = 0  # stop after this many evaluations in a row without a lower val_loss (0: never); keeps the best
    progress: bool = True
    # live tracking besides metrics.jsonl: none | tensorboard | wandb (comma-separated for both; wandb
    # runs offline unless WANDB_MODE says otherwise); see tinylm.train.tracking
    report_to: str = "none"

    def __post_init__(self):
        at_least = {
            "max_steps": 1,
            "batch_size": 1,
            "grad_accum": 1,
            "seq_len": 1,
            "log_every": 1,
            "eval_batches": 1,
            "warmup_steps": 0,
            "eval_every": 0,
            "save_every": 0,
            "keep_checkpoints": 0,
            "patience": 0,
        }
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {getattr(self, name)}")
        ranges = {
            "lr": (0, None),
            "min_lr_ratio": (0, 1),
            "weight_decay": (0, None),
            "beta1": (0, 1),
            "beta2": (0, 1),
            "grad_clip": (0, None),
            "max_minutes": (0, None),
        }
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high) or (name == "lr" and value == 0):
                expected = f"in [{low}, {high}]" if high is not None else ("> 0" if name == "lr" else f">= {low}")
                raise ConfigError(f"{name}: expected a number {expected}, got {value}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"optimizer: expected adamw or muon, got {self.optimizer!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision: expected auto, fp32 or bf16, got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy: expected ddp or fsdp, got {self.strategy!r}")
        if self.cpu_offload and self.strategy != "fsdp":
            raise ConfigError("cpu_offload: offloading is part of the fsdp strategy; set strategy: fsdp with it")
        trackers = [n.strip() for n in self.report_to.split(",") if n.strip()]
        if not trackers or any(n not in ("none", "tensorboard", "wandb") for n in trackers):
            raise ConfigError(
                f"report_to: expected none, tensorboard, wandb or tensorboard,wandb; got {self.report_to!r}"
            )


@dataclass
class EvalSection:
    """Benchmarks run at every evaluation of a training run (``train.eval_every``), beside the validation
    loss: ``tinylm eval``'s tasks and settings (see docs/eval.md); their metrics are logged as
    ``<task>/<metric>`` (``mmlu/acc``). By default none run."""

    tasks: list[str] = field(default_factory=list)
    data_dir: str | None = None
    shots: int | None = None
    limit: int | None = 100  # items per task (per subject of MMLU, C-Eval, CMMLU): a quick look, not the full set
    batch_size: int = 16
    chat: bool = False
    max_new_tokens: int = 128


TRAIN_ROWS = ("auto", "none", "markup", "replies")


@dataclass
class LoRASection(LoRAConfig):
    """Train a LoRA adapter instead of the whole model (``--lora``); the run's output is the adapter.
    The adapter's own settings (r, alpha, dropout, target_modules, rslora) are ``LoRAConfig``'s."""

    enabled: bool = False
    quantize: str = "none"  # "nf4": QLoRA, the frozen base held in 4-bit NormalFloat
    double_quant: bool = False  # QLoRA: quantize the 4-bit blocks' scales too
    block_size: int = 64  # QLoRA: weights per 4-bit block
    # tinylm sft: embedding rows that train with the adapter (PEFT's trainable_token_indices), unless
    # trainable_token_indices names its own: none | markup (the chat template's special tokens, which a
    # base never saw) | replies (those, and every token the training replies use) | auto (replies when
    # the base has no chat template, none otherwise; in the other stages, none)
    train_rows: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.train_rows not in TRAIN_ROWS:
            raise ConfigError(f"train_rows: expected one of {', '.join(TRAIN_ROWS)}, got {self.train_rows!r}")
        if self.quantize not in ("none", "nf4"):
            raise ConfigError(f"quantize: expected none or nf4, got {self.quantize!r}")
        if self.double_quant and self.quantize != "nf4":
            raise ConfigError(
                "double_quant is set but quantize is not nf4: double quantization is part of QLoRA (--qlora)"
            )
        if unknown := sorted(set(self.target_modules) - set(ALL_LINEAR)):
            raise ConfigError(
                f"target_modules: {unknown} are not decoder linear layers; expected some of {ALL_LINEAR} "
                "(the lm_head computes the loss from its weight directly, so an adapter there would not train)"
            )
        if self.block_size < 2 or self.block_size % 2:
            raise ConfigError(f"block_size: expected an even integer >= 2, got {self.block_size}")
        if (self.quantize != "none" or self.double_quant) and not self.enabled:
            raise ConfigError(
                "lora.quantize / lora.double_quant are set but lora.enabled is not: QLoRA trains an adapter (--lora)"
            )

    def lora_config(self) -> LoRAConfig:
        """The adapter's settings alone."""
        return LoRAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoRAConfig)})


# -- building dataclasses from plain data -------------------------------------------------------


def _check_value(value, annotation, where: str):
    """Return ``value`` converted to ``annotation`` (int → float is allowed), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        for option in typing.get_args(annotation):
            if option is type(None):
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is typing.Any:
        return value
    if annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    return value


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass ``cls`` from nested plain data, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key {key!r} ({hint}known: {', '.join(sorted(known))})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = from_dict(annotation, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_value(value, annotation, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# -- YAML files and overrides -------------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict:
    """``["--train.max_steps=200", "--model.qk_norm=true"]`` → nested dict; values are parsed as YAML."""
    nested: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        dotted, _, raw = arg[2:].partition("=")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {arg!r}: value is not valid YAML ({e})") from None
        node = nested
        *parents, leaf = dotted.replace("-", "_").split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {part} is both a value and a section")
        node[leaf] = value
    return nested


def merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return data or {}


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """File (optional) → overrides → a checked dataclass of type ``cls``."""
    data = load_yaml(path) if path else {}
    where = str(path) if path else "config"
    if overrides:
        data = merge(data, parse_overrides(overrides))
        where += " + overrides"
    return from_dict(cls, data, where)


def to_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def save_config(config, path: str | Path) -> None:
    atomic_write_text(path, to_yaml(config))
