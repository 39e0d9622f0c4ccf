"""Language models and reward models, whole (transformers' layout) or as adapters (PEFT's layout)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tinylm.hub.models import hub_reference, resolve_model, with_revision
from tinylm.io import (
    DataError,
    atomic_directory,
    atomic_write_json,
    json_text,
    read_json,
    verify_manifest,
    write_manifest,
)
from tinylm.model.intquant import decoder_linears, int_layers_for_loading
from tinylm.model.llama import CausalLM, ModelConfig, model_state_dict, rope_frequencies
from tinylm.model.lora import (
    ALL_LINEAR,
    KEY_PREFIX,
    ROW_MODULES,
    LoRAConfig,
    adapter_state_dict,
    add_lora,
    add_token_rows,
    load_adapter_state,
    merge_lora,
)
from tinylm.model.reward import RewardModel
from tinylm.modelcard import CardFacts, SavedModel, derived_card, write_card
from tinylm.modeldir.files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CLASSIFIER_KEYS,
    CONFIG,
    GENERATION,
    REWARD_ARCHITECTURES,
    REWARD_HEADS,
    REWARD_TASK,
    WEIGHTS,
    ModelDirError,
    directory_kind,
    has_chat_template,
    is_reward_dir,
    parameter_count,
    read_safetensors,
    read_weights,
    save_weights,
    saved_dtype,
)
from tinylm.modeldir.quantized import ignored, quantization_config, read_quantization
from tinylm.tokenizer import Tokenizer

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
    hf_config["dtype"] = hf_config["torch_dtype"] = saved_dtype(state)  # transformers 5 reads the first, 4 the second
    if (quant := quantization_config(model, ignore=("score",) if reward else ())) is not None:
        hf_config["quantization_config"] = quant
    with atomic_directory(out_dir) as scratch:
        save_weights(state, scratch / WEIGHTS)
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
    path = resolve_model(directory) / CONFIG
    try:
        return ModelConfig.from_hf_dict(read_json(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise ModelDirError(f"{path}: {e}") from None


def load_model_dir(path: str | Path, device=None, dtype: torch.dtype | None = None, with_tokenizer: bool = True):
    """A model directory → (CausalLM, Tokenizer or None). Verifies SHA256SUMS when present. An adapter
    directory loads as its base model with the adapter merged. ``dtype`` None keeps the saved dtype."""
    directory = resolve_model(path)
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
    directory = resolve_model(path)
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
    check_shapes(directory, own, state)


def check_shapes(directory: Path, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
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

    ``base_model`` is the base's directory, or its Hub id: ``ID@REVISION`` is written as PEFT writes it,
    the id as ``base_model_name_or_path`` and the revision as ``revision``.

    A training run's adapter also carries the tokenizer (with its chat template) and a
    generation_config.json with the stop tokens, so ``tinylm chat ADAPTER_DIR`` works as for a model.

    A reward model's adapter is PEFT's for a sequence classifier (task_type SEQ_CLS): the LoRA
    matrices and, kept whole (``modules_to_save``), the score head that training made, which PEFT
    loads onto ``AutoModelForSequenceClassification`` of the base (with num_labels 1 and the pad id).
    """
    reward = isinstance(model, RewardModel)
    base_name, base_revision = (hub_reference(base_model) if base_model else None) or (base_model, None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": REWARD_TASK if reward else "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": base_revision,  # of a Hub base: ID@REVISION is written as PEFT writes it
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "use_rslora": config.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": [*(["score"] if reward else []), *config.modules_to_save] or None,
        "trainable_token_indices": config.trainable_token_indices or None,
        "use_dora": False,
    }
    out_dir = Path(out_dir)
    state = adapter_state_dict(model, config.modules_to_save)
    if reward:
        state[KEY_PREFIX + "score.weight"] = model.score.weight.detach().to("cpu").contiguous()
    size = sum(t.numel() for t in state.values())
    base = hf_config_of(model)
    saved = SavedModel(
        out_dir, "adapter", base, parameter_count(model) - size, has_chat_template(tokenizer), peft_config, size
    )
    with atomic_directory(out_dir) as scratch:
        save_weights(state, scratch / ADAPTER_WEIGHTS)
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
    path = resolve_model(adapter_dir) / ADAPTER_CONFIG
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
    heads = [k for k in kept if k in REWARD_HEADS]
    if (heads and raw.get("task_type") != REWARD_TASK) or set(kept) - REWARD_HEADS - set(ROW_MODULES):
        raise ModelDirError(
            f"{path}: modules_to_save is {kept!r}; tinylm reads embed_tokens and lm_head, and a reward model's "
            'score head (task_type SEQ_CLS, modules_to_save ["score"])'
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
            trainable_token_indices=raw.get("trainable_token_indices") or {},
            modules_to_save=[k for k in kept if k not in REWARD_HEADS],
        )
    except KeyError as e:
        raise ModelDirError(f"{path}: no {e.args[0]!r} field") from None
    except ValueError as e:
        raise ModelDirError(f"{path}: {e}") from None


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Add LoRA layers to ``model`` as the adapter's config says and load its weights (ours or PEFT's)."""
    adapter_dir = resolve_model(adapter_dir)
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
        add_token_rows(model, config)
        load_adapter_state(model, saved, config.modules_to_save)
    except ValueError as e:
        raise ModelDirError(f"{weights_path}: {e}") from None
    if head is not None:
        with torch.no_grad():
            model.score.weight.copy_(head)
        model.score.weight.requires_grad_(False)
    return config


def adapter_base(adapter_dir: Path) -> Path | str:
    """The base model ``base_model_name_or_path`` names: a local directory (absolute, or relative to the
    working directory or to the adapter), else a Hugging Face Hub id, pinned to the ``revision`` PEFT
    writes beside it, which loads through the Hub's cache. It may itself be an adapter directory: a LoRA
    stage started from another LoRA run's output (tinylm follows the chain; PEFT does not)."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    peft_config = read_json(config_path)
    raw = peft_config.get("base_model_name_or_path")
    if not raw:
        raise ModelDirError(
            f"{config_path}: base_model_name_or_path is empty; "
            "name the base model explicitly (tinylm merge MODEL_DIR ADAPTER_DIR OUT_DIR)"
        )
    for candidate in (Path(raw), Path(adapter_dir) / raw):
        if (candidate / CONFIG).is_file() or (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if hub_reference(raw):
        return with_revision(raw, peft_config.get("revision"))
    raise ModelDirError(
        f"{config_path}: base model {raw!r} is not a local model directory (was it moved?) nor a Hugging Face "
        "Hub id; pass it explicitly: tinylm merge MODEL_DIR ADAPTER_DIR OUT_DIR"
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
    adapter_dir = resolve_model(adapter_dir)
    base = base_dir or adapter_base(adapter_dir)
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
    directory = resolve_model(adapter_dir)
    base = base_dir or adapter_base(directory)
    model, tokenizer = load_adapter_dir(directory, base_dir=base)
    card = derived_card(
        directory,
        str(base),
        "merging a LoRA adapter into its base model",
        "finetune",
        ["lora", "merged"],
        [f"The adapter, rank {config.r}: `{adapter_dir}`."],
    )
    save_model_dir(model, out_dir, tokenizer=tokenizer, card=card)
    return config
