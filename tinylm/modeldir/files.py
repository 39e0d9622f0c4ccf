"""What every kind of model directory shares: the file names, the error, telling the kinds apart, reading
and checking weights.

Each loader takes a local directory or a Hugging Face Hub id (``org/name``, ``org/name@revision``) and
starts with ``resolve_model`` (``tinylm.hub.models``): a local path stays itself, an id becomes its
verified snapshot in the Hugging Face cache. Past that line every function reads plain files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.hub.models import resolve_model
from tinylm.io import (
    DataError,
    missing_directory,
    read_json,
)
from tinylm.model.quant import QuantizedLinear
from tinylm.tokenizer import Tokenizer

CONFIG, WEIGHTS, GENERATION = "config.json", "model.safetensors", "generation_config.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PROCESSOR_CONFIG = "processor_config.json"  # LlavaProcessor's settings (the image processor has its own file)
REWARD_ARCHITECTURES = {  # model_type → the transformers class of a reward model (one score per sequence)
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}
CLASSIFIER_KEYS = ("num_labels", "id2label", "label2id", "problem_type")  # config.json keys of a classifier
REWARD_TASK = "SEQ_CLS"  # PEFT's task_type of an adapter for a sequence classifier
REWARD_HEADS = {"score", "classifier"}  # what PEFT keeps whole in such an adapter (modules_to_save)


class ModelDirError(DataError):
    """A model directory is missing, incomplete or does not fit its config; the message names the file."""


def directory_kind(path: str | Path) -> str:
    """ "model", "adapter", "llava" or "reward"; a ModelDirError when ``path`` is none of them. (An
    adapter may be a reward model's: ``is_reward_dir`` tells.)"""
    directory = resolve_model(path)
    if not directory.exists():
        raise ModelDirError(missing_directory(path, "model directory"), "missing_file")
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: not a model directory (it is a file{_gguf_note(directory)})")
    if (directory / CONFIG).is_file():
        try:
            hf = read_json(directory / CONFIG)
        except DataError:  # loading it will say what is wrong (its checksum, or where the JSON breaks)
            hf = {}
        hf = hf if isinstance(hf, dict) else {}
        if hf.get("model_type") == "llava":
            return "llava"
        classifier = any(str(name).endswith("ForSequenceClassification") for name in hf.get("architectures") or [])
        return "reward" if classifier else "model"
    if (directory / ADAPTER_CONFIG).is_file():
        return "adapter"
    raise ModelDirError(f"{directory / CONFIG}: missing (a model directory holds config.json and its weights)")


def _gguf_note(path: Path) -> str:
    """What to say about a GGUF file given where a model directory belongs."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "; a GGUF file is for llama.cpp and Ollama: give tinylm the model directory it was exported from"
    if path.suffix.lower() == ".gguf":
        return f"; not even a valid GGUF file: it starts with {magic!r}, not b'GGUF' (truncated or corrupted?)"
    return ""


def is_reward_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a reward model: a model directory with a one-score classifier head, or a
    PEFT adapter for one (task_type SEQ_CLS)."""
    directory = resolve_model(path)
    kind = directory_kind(directory)
    if kind == "adapter":
        return read_json(directory / ADAPTER_CONFIG).get("task_type") == REWARD_TASK
    return kind == "reward"


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json. Never a pickle."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else [WEIGHTS]
    state = {}
    for name in files:
        state.update(read_safetensors(directory / name))
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelDirError(f"{path}: missing (only safetensors weights are loaded, never pickles)")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ModelDirError(f"{path}: cannot be read as safetensors ({e})") from None


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, path, metadata={"format": "pt"})


def parameter_count(model: nn.Module) -> int:
    """Every weight of ``model``, a quantized layer's counted as the float weights it stands for."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in quantized)


def has_chat_template(tokenizer: Tokenizer | None) -> bool:
    return tokenizer is not None and bool(tokenizer.chat_template)


def saved_dtype(state: dict[str, torch.Tensor]) -> str:
    """The float dtype of the weights (a quantized model's integers aside)."""
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")
