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
write them (the first two a language model or a reward model, whichever they are given). Every directory
is written beside its destination and renamed into place only when complete, so a crash never leaves a
half-written model where a good one was, and carries a SHA256SUMS manifest that loading verifies, and a
README.md model card (``tinylm.modelcard``; the stage that saved the model passes its facts as ``card``).
Directories saved by transformers or PEFT (no manifest, perhaps sharded weights) load too.

The modules in ``tinylm.model`` know tensors only; the file formats live here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.image_processor import ImageProcessor
from tinylm.io import (
    DataError,
    atomic_directory,
    atomic_write_json,
    json_text,
    missing_directory,
    read_json,
    verify_manifest,
    write_manifest,
)
from tinylm.model.intquant import IntLinear, IntScheme, decoder_linears, int_layers_for_loading
from tinylm.model.llama import CausalLM, ModelConfig, model_state_dict, rope_frequencies
from tinylm.model.lora import (
    ALL_LINEAR,
    KEY_PREFIX,
    LoRAConfig,
    adapter_state_dict,
    add_lora,
    load_adapter_state,
    merge_lora,
)
from tinylm.model.quant import QuantizedLinear
from tinylm.model.reward import RewardModel
from tinylm.model.vision import CLIP, VisionConfig, VisionTransformer
from tinylm.model.vlm import IMAGE_TOKEN, VisionLanguageModel, VLMConfig, llava_state_dict, vlm_from_state_dict
from tinylm.modelcard import CardFacts, SavedModel, derived_card, write_card
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


@dataclass
class Loaded:
    """What ``load`` gives: the model, its tokenizer (None if the directory has none) and, for a
    vision-language model, its image processor."""

    model: nn.Module
    tokenizer: Tokenizer | None
    processor: ImageProcessor | None = None


def directory_kind(path: str | Path) -> str:
    """ "model", "adapter", "llava" or "reward"; a ModelDirError when ``path`` is none of them. (An
    adapter may be a reward model's: ``is_reward_dir`` tells.)"""
    directory = Path(path)
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


def load(path: str | Path, device=None, dtype: torch.dtype | None = None) -> Loaded:
    """Any model directory tinylm can run: a model, an adapter (merged into its base), a LLaVA model or
    a reward model. ``dtype`` None keeps the dtype the weights were saved in."""
    if directory_kind(path) == "llava":
        return Loaded(*load_vlm_dir(path, device=device, dtype=dtype))
    if is_reward_dir(path):
        return Loaded(*load_reward_dir(path, device=device, dtype=dtype))
    return Loaded(*load_model_dir(path, device=device, dtype=dtype))


def is_reward_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a reward model: a model directory with a one-score classifier head, or a
    PEFT adapter for one (task_type SEQ_CLS)."""
    kind = directory_kind(path)
    if kind == "adapter":
        return read_json(Path(path) / ADAPTER_CONFIG).get("task_type") == REWARD_TASK
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


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, path, metadata={"format": "pt"})


def parameter_count(model: nn.Module) -> int:
    """Every weight of ``model``, a quantized layer's counted as the float weights it stands for."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return sum(p.numel() for p in model.parameters()) + sum(m.in_features * m.out_features for m in quantized)


def has_chat_template(tokenizer: Tokenizer | None) -> bool:
    return tokenizer is not None and bool(tokenizer.chat_template)


def _saved_dtype(state: dict[str, torch.Tensor]) -> str:
    """The float dtype of the weights (a quantized model's integers aside)."""
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


# -- quantized weights (compressed-tensors' pack-quantized layout) --------------------------------

QUANT_METHOD, QUANT_FORMAT = "compressed-tensors", "pack-quantized"
VLM_FLOAT_PARTS = ("re:.*vision_tower.*", "re:.*multi_modal_projector.*")  # a LLaVA model's vision side stays float


def quantization_config(model: nn.Module, prefix: str = "", ignore: tuple[str, ...] = ()) -> dict | None:
    """config.json's ``quantization_config`` for a language model with IntLinear layers (None without):
    the compressed-tensors block that transformers and vLLM read. Float linear layers are listed in
    ``ignore`` (their names after ``prefix``), with the patterns of ``ignore``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, IntLinear)}
    if not layers:
        return None
    schemes = {m.scheme for m in layers.values()}
    if len(schemes) > 1:
        raise ValueError(f"one quantization scheme per model is supported, this one mixes {sorted(map(str, schemes))}")
    scheme = schemes.pop()
    floats = [name for name in decoder_linears(model) if name not in layers]
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if scheme.group_size else "channel",
        "group_size": scheme.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    group = {"targets": ["Linear"], "format": QUANT_FORMAT, "weights": weights}
    group |= {"input_activations": None, "output_activations": None}
    return {
        "quant_method": QUANT_METHOD,
        "format": QUANT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ["lm_head", *ignore, *(prefix + name for name in floats)],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def read_quantization(path: Path, hf: dict) -> tuple[IntScheme, list[str]] | None:
    """(scheme, ignored module names or "re:" patterns) of config.json's quantization_config, None when
    the weights are float; a ModelDirError naming the field for a kind tinylm cannot run."""
    quant = hf.get("quantization_config")
    if quant is None:
        return None

    def field(name: str, value, expected: str):
        raise ModelDirError(
            f"{path}: quantization_config.{name} is {value!r}; tinylm runs {expected} (as `tinylm quantize` writes)"
        )

    if not isinstance(quant, dict):
        field("", quant, "a JSON object")
    if quant.get("quant_method") != QUANT_METHOD:
        field("quant_method", quant.get("quant_method"), f"{QUANT_METHOD!r} checkpoints")
    if quant.get("format") != QUANT_FORMAT:
        field("format", quant.get("format"), f"the {QUANT_FORMAT!r} format")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        field("config_groups", groups, "one group")
    ((key, group),) = groups.items()
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        field(f"config_groups.{key}.weights", weights, "integer weights")
    if group.get("input_activations") or group.get("targets") != ["Linear"]:
        field(
            f"config_groups.{key}",
            {k: group.get(k) for k in ("targets", "input_activations")},
            'weight-only quantization of every "Linear"',
        )
    expected = {"type": "int", "symmetric": True, "actorder": None, "dynamic": False}
    for name, value in expected.items():
        if weights.get(name, value) != value:
            field(f"config_groups.{key}.weights.{name}", weights.get(name), f"{name} {value!r}")
    strategy, size = weights.get("strategy"), weights.get("group_size")
    if strategy not in ("group", "channel") or (strategy == "group") != isinstance(size, int):
        field(f"config_groups.{key}.weights.strategy", strategy, 'strategy "group" (with a group_size) or "channel"')
    try:
        scheme = IntScheme(weights.get("num_bits"), size if strategy == "group" else None)
    except ValueError as e:
        raise ModelDirError(f"{path}: quantization_config.config_groups.{key}.weights: {e}") from None
    return scheme, list(quant.get("ignore") or [])


def ignored(name: str, ignore: list[str]) -> bool:
    return any(re.match(entry[3:], name) if entry.startswith("re:") else entry == name for entry in ignore)


# -- plain models ---------------------------------------------------------------------------------


def generation_config(config: ModelConfig, eos_token_id=None) -> dict:
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "do_sample": False,
    }


def save_model_dir(
    model: CausalLM | RewardModel,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    extra_files: dict[str, str] | None = None,
    card: CardFacts | None = None,
) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face model directory with a manifest and a model
    card (``card``: what the stage that made the model knows of it). A reward model is written as
    transformers' sequence classifier (``hf_config``), with no generation_config.json: it writes nothing."""
    out_dir = Path(out_dir)
    reward = isinstance(model, RewardModel)
    state = model_state_dict(model)
    hf_config = hf_config_of(model)
    hf_config["dtype"] = hf_config["torch_dtype"] = _saved_dtype(state)  # transformers 5 reads the first, 4 the second
    if (quant := quantization_config(model, ignore=("score",) if reward else ())) is not None:
        hf_config["quantization_config"] = quant
    with atomic_directory(out_dir) as scratch:
        _save_weights(state, scratch / WEIGHTS)
        (scratch / CONFIG).write_text(json_text(hf_config), encoding="utf-8")
        if not reward:
            (scratch / GENERATION).write_text(json_text(generation_config(model.config)), encoding="utf-8")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, scratch, model)
        for name, text in (extra_files or {}).items():
            (scratch / name).write_text(text, encoding="utf-8")
        kind = "reward" if reward else "model"
        saved = SavedModel(out_dir, kind, hf_config, parameter_count(model), has_chat_template(tokenizer))
        write_card(scratch, card, saved)
        write_manifest(scratch)
    return out_dir


def hf_config_of(model: CausalLM | RewardModel) -> dict:
    """The config.json of ``model``. A reward model's is the one transformers writes for its sequence
    classifier with a single label (``AutoModelForSequenceClassification`` then loads it); its
    ``pad_token_id`` marks where padded rows end, as the classifier reads each row's last other token."""
    hf = model.config.to_hf_dict()
    if isinstance(model, RewardModel):
        hf["architectures"] = [REWARD_ARCHITECTURES[hf["model_type"]]]
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def _save_tokenizer(tokenizer: Tokenizer, directory: Path, model: nn.Module) -> None:
    """The tokenizer files. A reward model's tokenizer names the model's pad id as its pad token, so that
    a batch padded by transformers' tokenizer pads with the very token config.json's pad_token_id names,
    and the classifier reads every row's own last token."""
    tokenizer.save(directory)
    if not isinstance(model, RewardModel):
        return
    pad_token = tokenizer.id_to_token(model.config.pad_token_id)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = read_json(directory / name)
        settings["pad_token"] = pad_token
        atomic_write_json(directory / name, settings)


def declared_pad_id(directory: Path, tokenizer: Tokenizer | None) -> int | None:
    """The id of the pad token ``directory``'s tokenizer_config.json names, None without one."""
    token = read_json(directory / "tokenizer_config.json", default={}).get("pad_token")
    token = token.get("content") if isinstance(token, dict) else token
    return tokenizer.token_to_id(token) if tokenizer is not None and isinstance(token, str) else None


def read_model_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a model directory's config.json."""
    path = Path(directory) / CONFIG
    try:
        return ModelConfig.from_hf_dict(read_json(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise ModelDirError(f"{path}: {e}") from None


def load_model_dir(path: str | Path, device=None, dtype: torch.dtype | None = None, with_tokenizer: bool = True):
    """A model directory → (CausalLM, Tokenizer or None). Verifies SHA256SUMS when present. An adapter
    directory loads as its base model with the adapter merged. ``dtype`` None keeps the saved dtype."""
    directory = Path(path)
    kind = directory_kind(directory)
    if is_reward_dir(directory):
        raise ModelDirError(
            f"{directory}: is a reward model (it scores conversations, it writes none); load it with "
            "tinylm.modeldir.load or load_reward_dir, and start a language-model stage from the chat model it was "
            "trained from"
        )
    if kind == "adapter":
        return load_adapter_dir(directory, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
    if kind == "llava":
        raise ModelDirError(
            f"{directory}: is a vision-language model (model_type llava); load it with tinylm.modeldir.load "
            "or load_vlm_dir, or start stage 2 from it with tinylm vlm sft --init"
        )
    return _load_decoder_dir(directory, CausalLM, device, dtype, with_tokenizer)


def load_reward_dir(path: str | Path, device=None, dtype: torch.dtype | None = None, with_tokenizer: bool = True):
    """A reward model directory, or a reward model's adapter over its base → (RewardModel, Tokenizer or
    None). Verifies SHA256SUMS when present; directories saved by transformers or PEFT load too."""
    directory = Path(path)
    if not is_reward_dir(directory):
        raise ModelDirError(
            f"{directory}: is not a reward model (expected config.json architectures [...ForSequenceClassification], "
            "or adapter_config.json task_type SEQ_CLS); train one with tinylm rm --init CHAT_MODEL"
        )
    if directory_kind(directory) == "adapter":
        return load_adapter_dir(directory, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
    hf = read_json(directory / CONFIG)
    id2label = hf.get("id2label")
    labels = hf.get("num_labels", len(id2label) if isinstance(id2label, dict) else 2)  # transformers' default: 2
    if labels != 1:
        raise ModelDirError(
            f"{directory / CONFIG}: a classifier of {labels} labels; a reward model gives one score (num_labels 1)"
        )
    return _load_decoder_dir(directory, RewardModel, device, dtype, with_tokenizer)


def _load_decoder_dir(directory: Path, model_class, device, dtype, with_tokenizer: bool):
    """The weights of ``directory`` in a ``model_class`` (CausalLM or RewardModel) built from its config.json."""
    verify_manifest(directory)
    config = read_model_config(directory)
    if model_class is RewardModel:  # the head's shape says what these said
        config.extra = {k: v for k, v in config.extra.items() if k not in CLASSIFIER_KEYS}
    quantized = read_quantization(directory / CONFIG, read_json(directory / CONFIG))
    state = read_weights(directory)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = model_class(config, device="meta")  # shapes only; the loaded tensors are assigned below
    if quantized:
        scheme, ignore = quantized
        names = [name for name in decoder_linears(model) if not ignored(name, ignore)]
        try:
            int_layers_for_loading(model, names, scheme)
        except ValueError as e:
            raise ModelDirError(f"{directory / CONFIG}: quantization_config: {e}") from None
    _check_tensors(directory, model, state, skip={"lm_head.weight"} if config.tie_word_embeddings else set())
    if dtype is not None:  # floats only: quantized weights keep their integers
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and model_class is CausalLM:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_frequencies(config)  # the one buffer that is derived, not loaded
    model = model.to(device) if device is not None else model
    tokenizer = None
    if with_tokenizer and (directory / "tokenizer.json").exists():
        tokenizer = Tokenizer.load(directory)
    return model.eval(), tokenizer


def _check_tensors(directory: Path, model: nn.Module, state: dict[str, torch.Tensor], skip: set[str]) -> None:
    """Every tensor ``model`` needs (but ``skip``), none it does not, each of the right shape."""
    own = model.state_dict()
    expected = set(own) - skip
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelDirError(
            f"{directory}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    _check_shapes(directory, own, state)


def _check_shapes(directory: Path, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise ModelDirError(
                f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(own[name].shape)}"
            )


# -- adapters (PEFT's layout) ---------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    config: LoRAConfig,
    out_dir: str | Path,
    base_model: str | None = None,
    tokenizer: Tokenizer | None = None,
    eos_token_id=None,
    card: CardFacts | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (+ SHA256SUMS and a model card),
    atomically, so ``peft.PeftModel.from_pretrained`` loads them onto the transformers model.

    A training run's adapter also carries the tokenizer (with its chat template) and a
    generation_config.json with the stop tokens, so ``tinylm chat ADAPTER_DIR`` works as for a model.

    A reward model's adapter is PEFT's for a sequence classifier (task_type SEQ_CLS): the LoRA
    matrices and, kept whole (``modules_to_save``), the score head that training made, which PEFT
    loads onto ``AutoModelForSequenceClassification`` of the base (with num_labels 1 and the pad id).
    """
    reward = isinstance(model, RewardModel)
    peft_config = {
        "peft_type": "LORA",
        "task_type": REWARD_TASK if reward else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "use_rslora": config.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": ["score"] if reward else None,
        "use_dora": False,
    }
    out_dir = Path(out_dir)
    state = adapter_state_dict(model)
    if reward:
        state[KEY_PREFIX + "score.weight"] = model.score.weight.detach().to("cpu").contiguous()
    size = sum(t.numel() for t in state.values())
    base = hf_config_of(model)
    saved = SavedModel(
        out_dir, "adapter", base, parameter_count(model) - size, has_chat_template(tokenizer), peft_config, size
    )
    with atomic_directory(out_dir) as scratch:
        _save_weights(state, scratch / ADAPTER_WEIGHTS)
        (scratch / ADAPTER_CONFIG).write_text(json_text(peft_config), encoding="utf-8")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, scratch, model)
        if eos_token_id is not None and not reward:
            (scratch / GENERATION).write_text(json_text({"eos_token_id": eos_token_id}), encoding="utf-8")
        write_card(scratch, card, saved)
        write_manifest(scratch)
    return out_dir


def read_adapter_config(adapter_dir: str | Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; options tinylm does not implement are refused by name."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelDirError(
            f"{path}: missing (an adapter directory holds adapter_config.json and adapter_model.safetensors)"
        )
    raw = read_json(path)
    if raw.get("peft_type") != "LORA":
        raise ModelDirError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none"}
    for key, expected in unsupported.items():
        if raw.get(key, expected) not in (expected, None):
            raise ModelDirError(f"{path}: {key} is {raw[key]!r}; tinylm supports only {key}={expected!r}")
    kept = raw.get("modules_to_save") or []
    if kept and not (raw.get("task_type") == REWARD_TASK and set(kept) <= REWARD_HEADS):
        raise ModelDirError(
            f"{path}: modules_to_save is {kept!r}; tinylm reads it only as a reward model's score head "
            '(task_type SEQ_CLS, modules_to_save ["score"])'
        )
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if raw.get(key):
            raise ModelDirError(f"{path}: {key} is set ({raw[key]!r}); tinylm does not support it")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT also accepts "all-linear" or a regular expression
        if targets != "all-linear":
            raise ModelDirError(
                f"{path}: target_modules is the pattern {targets!r}; expected a list of module names or 'all-linear'"
            )
        targets = list(ALL_LINEAR)
    # full paths ("model.layers.0.mlp.up_proj") name the layer kind too
    names = sorted({t.split(".")[-1] for t in targets or []})
    try:
        return LoRAConfig(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout", 0.0),
            target_modules=names,
            rslora=bool(raw.get("use_rslora", False)),
        )
    except KeyError as e:
        raise ModelDirError(f"{path}: no {e.args[0]!r} field") from None
    except ValueError as e:
        raise ModelDirError(f"{path}: {e}") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Add LoRA layers to ``model`` as the adapter's config says and load its weights (ours or PEFT's)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    verify_manifest(adapter_dir)  # a tinylm adapter carries SHA256SUMS; PEFT's has none
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    saved = read_safetensors(weights_path)
    head = saved.pop(KEY_PREFIX + "score.weight", None) if isinstance(model, RewardModel) else None
    if isinstance(model, RewardModel) and (head is None or head.shape != model.score.weight.shape):
        found = "none" if head is None else f"one of shape {tuple(head.shape)}"
        raise ModelDirError(
            f"{weights_path}: a reward model's adapter carries its score head, {KEY_PREFIX}score.weight of shape "
            f"{tuple(model.score.weight.shape)}; this one has {found}"
        )
    add_lora(model, config)
    try:
        load_adapter_state(model, saved)
    except ValueError as e:
        raise ModelDirError(f"{weights_path}: {e}") from None
    if head is not None:
        with torch.no_grad():
            model.score.weight.copy_(head)
        model.score.weight.requires_grad_(False)
    return config


def base_model_path(adapter_dir: Path) -> Path:
    """The base model directory named by ``base_model_name_or_path`` (absolute, or relative to the
    working directory or to the adapter). It may itself be an adapter directory: a LoRA stage started
    from another LoRA run's output (tinylm follows the chain; PEFT does not)."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    raw = read_json(config_path).get("base_model_name_or_path")
    if not raw:
        raise ModelDirError(
            f"{config_path}: base_model_name_or_path is empty; "
            "name the base model explicitly (tinylm merge MODEL_DIR ADAPTER_DIR OUT_DIR)"
        )
    for candidate in (Path(raw), Path(adapter_dir) / raw):
        if (candidate / CONFIG).is_file() or (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ModelDirError(
        f"{config_path}: base model {raw!r} is not a local model directory "
        "(it was moved, or is a Hub name); pass it explicitly: tinylm merge MODEL_DIR ADAPTER_DIR OUT_DIR"
    )


def load_adapter_dir(
    adapter_dir: str | Path,
    device=None,
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
    base_dir: str | Path | None = None,
):
    """An adapter directory → (its base model with the adapter merged in, tokenizer). The base is
    ``base_dir``, or the one adapter_config.json names. The tokenizer (with its chat template) and the
    stop tokens saved with the adapter win over the base model's. ``dtype`` None keeps the base's.

    A reward model's adapter turns its base (a chat model) into a reward model: the decoder with the
    adapter merged, the adapter's score head, and the pad id its tokenizer names (``adapter_pad_id``)."""
    adapter_dir = Path(adapter_dir)
    base = Path(base_dir) if base_dir else base_model_path(adapter_dir)
    reward = is_reward_dir(adapter_dir)
    load_base = load_reward_dir if reward and is_reward_dir(base) else load_model_dir
    model, tokenizer = load_base(base, with_tokenizer=with_tokenizer or reward)
    if (with_tokenizer or reward) and (adapter_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(adapter_dir)
    if reward and not isinstance(model, RewardModel):
        model = RewardModel.from_language_model(model, adapter_pad_id(adapter_dir, tokenizer, model.config))
    saved_dtype = model.model.embed_tokens.weight.dtype
    load_adapter(model.float(), adapter_dir)
    merge_lora(model)
    eos = read_json(adapter_dir / GENERATION, default={}).get("eos_token_id")
    if eos is not None:
        model.config.eos_token_id = eos
    model = model.to(dtype or saved_dtype)
    return (model.to(device) if device is not None else model).eval(), tokenizer if with_tokenizer else None


def adapter_pad_id(adapter_dir: Path, tokenizer: Tokenizer | None, config: ModelConfig) -> int:
    """The pad id of a reward model's adapter: the pad token its tokenizer names (tinylm rm names the
    one it trained with), else the base's pad_token_id, else the tokenizer's end-of-document id."""
    for pad in (declared_pad_id(adapter_dir, tokenizer), config.pad_token_id, tokenizer and tokenizer.eos_id):
        if pad is not None:
            return pad
    raise ModelDirError(
        f"{adapter_dir}: a reward model's adapter needs a pad id (where padded rows end), and neither it nor its "
        "base has a tokenizer or a pad_token_id"
    )


def merge_adapter_dir(adapter_dir: str | Path, out_dir: str | Path, base_dir: str | Path | None = None) -> LoRAConfig:
    """Fold an adapter into its base model (``base_dir``, or the one adapter_config.json names) and save
    the result as a model directory, with the adapter's tokenizer and stop tokens; its card names both."""
    config = read_adapter_config(adapter_dir)
    base = Path(base_dir) if base_dir else base_model_path(Path(adapter_dir))
    model, tokenizer = load_adapter_dir(adapter_dir, base_dir=base)
    card = derived_card(
        adapter_dir,
        str(base),
        "merging a LoRA adapter into its base model",
        "finetune",
        ["lora", "merged"],
        [f"The adapter, rank {config.r}: `{adapter_dir}`."],
    )
    save_model_dir(model, out_dir, tokenizer=tokenizer, card=card)
    return config


# -- vision-language models (transformers' LLaVA layout) ------------------------------------------


def is_vlm_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a vision-language model (config.json says llava)."""
    try:
        return directory_kind(path) == "llava"
    except DataError:
        return False


def processor_config(config: VLMConfig) -> dict:
    """processor_config.json for transformers' LlavaProcessor: it expands ``image_token`` in a prompt to
    the same number of tokens tinylm does (patches, plus CLIP's class token that the "default" strategy
    drops)."""
    clip = config.vision.model_type == CLIP
    return {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": config.vision.patch_size,
        "vision_feature_select_strategy": "default" if clip else "full",
        "num_additional_image_tokens": int(clip),
    }


def save_vlm_dir(
    model: VisionLanguageModel,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    card: CardFacts | None = None,
) -> Path:
    """Write a LLaVA model directory: config.json, model.safetensors, generation_config.json, the
    tokenizer (with its chat template), preprocessor_config.json, processor_config.json, SHA256SUMS,
    README.md (the model card, of ``card``). Atomic, like every model directory."""
    out_dir = Path(out_dir)
    state = llava_state_dict(model)
    hf = model.config.to_hf_dict()
    hf["dtype"] = hf["torch_dtype"] = _saved_dtype(state)
    if (quant := quantization_config(model.language_model, "language_model.", VLM_FLOAT_PARTS)) is not None:
        hf["quantization_config"] = quant
    with atomic_directory(out_dir) as scratch:
        _save_weights(state, scratch / WEIGHTS)
        (scratch / CONFIG).write_text(json_text(hf), encoding="utf-8")
        (scratch / GENERATION).write_text(json_text(generation_config(model.config.text)), encoding="utf-8")
        tokenizer.save(scratch)
        processor.save(scratch)
        (scratch / PROCESSOR_CONFIG).write_text(json_text(processor_config(model.config)), encoding="utf-8")
        write_card(scratch, card, SavedModel(out_dir, "llava", hf, parameter_count(model), chat=True))
        write_manifest(scratch)
    return out_dir


def load_vlm_dir(path: str | Path, device=None, dtype: torch.dtype | None = None):
    """A LLaVA model directory (tinylm's, or transformers' with a SigLIP/CLIP tower and a Llama/Qwen
    language model) → (VisionLanguageModel, Tokenizer, ImageProcessor). Verifies SHA256SUMS when present."""
    directory = Path(path)
    kind = directory_kind(directory)
    verify_manifest(directory)
    if kind != "llava":
        raise ModelDirError(f"{directory / CONFIG}: model_type is not llava; expected a vision-language model")
    try:
        config = VLMConfig.from_hf_dict(read_json(directory / CONFIG))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise ModelDirError(f"{directory / CONFIG}: {e}") from None
    state = read_weights(directory)
    quantized = read_quantization(directory / CONFIG, read_json(directory / CONFIG))

    def int_layers(model: VisionLanguageModel) -> None:  # the language model's, as quantization_config says
        if quantized:
            scheme, ignore = quantized
            names = [n for n in decoder_linears(model.language_model) if not ignored(f"language_model.{n}", ignore)]
            int_layers_for_loading(model.language_model, names, scheme, device="cpu")

    try:
        model = vlm_from_state_dict(config, state, prepare=int_layers)
    except ValueError as e:
        raise ModelDirError(f"{directory}: {e}") from None
    saved = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model = model.to(dtype or saved)  # as load_model_dir: the saved dtype unless told otherwise
    model.language_model.inv_freq = rope_frequencies(config.text)  # kept in float32 whatever the weights' dtype
    if device is not None:
        model = model.to(device)
    if not (directory / "tokenizer.json").is_file():
        raise ModelDirError(f"{directory / 'tokenizer.json'}: missing; a vision-language model needs its tokenizer")
    tokenizer = Tokenizer.load(directory)
    if tokenizer.token_to_id(IMAGE_TOKEN) != config.image_token_id:
        raise ModelDirError(
            f"{directory}: config.json's image_token_index is {config.image_token_id}, but the tokenizer "
            f"has {IMAGE_TOKEN} at {tokenizer.token_to_id(IMAGE_TOKEN)}"
        )
    return model.eval(), tokenizer, ImageProcessor.load(directory)


# -- vision towers --------------------------------------------------------------------------------

# Where a vision tower's tensors sit in the checkpoints that hold one, tried in order.
VISION_PREFIXES = (
    "vision_model.",
    "model.vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.vision_model.",
    "vision_tower.",
)


def load_vision_tower(directory: str | Path) -> VisionTransformer:
    """A SigLIP or CLIP vision tower from a local transformers directory: a vision model alone, or the
    vision half of a whole SigLIP/CLIP (or LLaVA) model. Only safetensors weights are read."""
    directory = Path(directory)
    hf = read_json(directory / CONFIG)
    try:
        config = VisionConfig.from_hf_dict(hf)
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{directory / CONFIG}: not a SigLIP or CLIP vision config ({e})") from None
    tower = VisionTransformer(config)
    own = tower.state_dict()
    state = {}
    for name, tensor in read_weights(directory).items():
        key = next((name[len(p) :] for p in VISION_PREFIXES if name.startswith(p)), name)
        if key in own:
            state[key] = tensor
    missing = sorted(own.keys() - state.keys())
    if missing:
        raise ModelDirError(
            f"{directory}: no vision weights for {missing[:3]} (is this a SigLIP or CLIP vision model?)"
        )
    _check_shapes(directory, own, state)
    tower.load_state_dict(state)
    return tower
