"""Model directories: every kind tinylm reads and writes, in one place.

    model     config.json (model_type llama / qwen2 / qwen3), model.safetensors (or shards),
              generation_config.json, the tokenizer files, SHA256SUMS          → CausalLM + Tokenizer
    adapter   adapter_config.json, adapter_model.safetensors (PEFT's layout), usually the tokenizer;
              its base model is the directory adapter_config.json names         → the base, adapter merged
    llava     config.json with model_type llava (transformers' LLaVA layout), the tokenizer,
              preprocessor_config.json, processor_config.json                   → VisionLanguageModel
    reward    config.json with architectures [Llama/Qwen2/Qwen3ForSequenceClassification], one label
              and a pad_token_id, model.safetensors (the decoder and score.weight), the tokenizer,
              SHA256SUMS; or an adapter with task_type SEQ_CLS, its score head whole    → RewardModel
    vision    a SigLIP or CLIP vision tower (alone, or inside a whole SigLIP/CLIP/LLaVA model)

``load(path)`` tells them apart and loads any; ``save_model_dir``, ``save_adapter`` and ``save_vlm_dir``
write them (the first two a language model or a reward model, whichever they are given). Every loader
takes a Hugging Face Hub id too (``org/name``, ``org/name@revision``) where it takes a directory: it
reads the id's verified snapshot in the Hub's cache (``resolve_model``, of ``tinylm.hub.models``; a
local path always wins, and an adapter's base may be an id as PEFT writes it). Every directory
is written beside its destination and renamed into place only when complete, so a crash never leaves a
half-written model where a good one was, and carries a SHA256SUMS manifest that loading verifies, and a
README.md model card (``tinylm.modelcard``; the stage that saved the model passes its facts as ``card``).
Directories saved by transformers or PEFT (no manifest, perhaps sharded weights) load too.

The modules in ``tinylm.model`` know tensors only; the file formats live here: ``files`` (names, kinds,
weights and their checks), ``quantized`` (integer weights), ``language`` (language and reward models,
whole or as adapters) and ``vision`` (LLaVA models and vision towers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinylm.hub.models import HubError, model_reference, resolve_model
from tinylm.image_processor import ImageProcessor
from tinylm.modeldir.files import CONFIG, ModelDirError, directory_kind, is_reward_dir, read_weights
from tinylm.modeldir.language import (
    load_adapter,
    load_model_dir,
    load_reward_dir,
    merge_adapter_dir,
    read_adapter_config,
    read_model_config,
    save_adapter,
    save_model_dir,
)
from tinylm.modeldir.quantized import read_quantization
from tinylm.modeldir.vision import is_vlm_dir, load_vision_tower, load_vlm_dir, save_vlm_dir
from tinylm.tokenizer import Tokenizer

__all__ = [
    "CONFIG",
    "HubError",
    "Loaded",
    "ModelDirError",
    "directory_kind",
    "is_reward_dir",
    "is_vlm_dir",
    "load",
    "load_adapter",
    "load_model_dir",
    "load_reward_dir",
    "load_vision_tower",
    "load_vlm_dir",
    "merge_adapter_dir",
    "model_reference",
    "read_adapter_config",
    "read_model_config",
    "read_quantization",
    "read_weights",
    "resolve_model",
    "save_adapter",
    "save_model_dir",
    "save_vlm_dir",
]


@dataclass
class Loaded:
    """What ``load`` gives: the model, its tokenizer (None if the directory has none) and, for a
    vision-language model, its image processor."""

    model: nn.Module
    tokenizer: Tokenizer | None
    processor: ImageProcessor | None = None


def load(path: str | Path, device=None, dtype: torch.dtype | None = None) -> Loaded:
    """Any model directory tinylm can run: a model, an adapter (merged into its base), a LLaVA model or
    a reward model, from a local directory or a Hub id. ``dtype`` None keeps the dtype the weights were
    saved in."""
    path = resolve_model(path)
    if directory_kind(path) == "llava":
        return Loaded(*load_vlm_dir(path, device=device, dtype=dtype))
    if is_reward_dir(path):
        return Loaded(*load_reward_dir(path, device=device, dtype=dtype))
    return Loaded(*load_model_dir(path, device=device, dtype=dtype))
