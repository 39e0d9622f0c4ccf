"""Vision-language models (transformers' LLaVA layout) and vision towers (SigLIP, CLIP)."""

from __future__ import annotations

from pathlib import Path

import torch

from tinylm.hub.models import resolve_model
from tinylm.image_processor import ImageProcessor
from tinylm.io import (
    DataError,
    atomic_directory,
    json_text,
    read_json,
    verify_manifest,
    write_manifest,
)
from tinylm.model.intquant import decoder_linears, int_layers_for_loading
from tinylm.model.llama import rope_frequencies
from tinylm.model.vision import CLIP, VisionConfig, VisionTransformer
from tinylm.model.vlm import IMAGE_TOKEN, VisionLanguageModel, VLMConfig, llava_state_dict, vlm_from_state_dict
from tinylm.modelcard import CardFacts, SavedModel, write_card
from tinylm.modeldir.files import (
    CONFIG,
    GENERATION,
    PROCESSOR_CONFIG,
    WEIGHTS,
    ModelDirError,
    directory_kind,
    parameter_count,
    read_weights,
    save_weights,
    saved_dtype,
)
from tinylm.modeldir.language import check_shapes, generation_config
from tinylm.modeldir.quantized import VLM_FLOAT_PARTS, ignored, quantization_config, read_quantization
from tinylm.tokenizer import Tokenizer

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
    hf["dtype"] = hf["torch_dtype"] = saved_dtype(state)
    if (quant := quantization_config(model.language_model, "language_model.", VLM_FLOAT_PARTS)) is not None:
        hf["quantization_config"] = quant
    with atomic_directory(out_dir) as scratch:
        save_weights(state, scratch / WEIGHTS)
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
    directory = resolve_model(path)
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
    """A SigLIP or CLIP vision tower from a transformers directory (or Hub id): a vision model alone, or the
    vision half of a whole SigLIP/CLIP (or LLaVA) model. Only safetensors weights are read."""
    directory = resolve_model(directory)
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
    check_shapes(directory, own, state)
    tower.load_state_dict(state)
    return tower
