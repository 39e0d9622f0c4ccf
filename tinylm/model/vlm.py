"""A LLaVA-style vision-language model: a vision tower, a projector and a language model.

    text:    "<image>\\nWhat colour is the shape?"  →  ids with the image token repeated N times
    image:   pixels → vision tower → N patch features → projector → N vectors of the LLM's width
    model:   the token embeddings, with the N image-token positions replaced by those N vectors,
             go through the language model as usual; the loss and generation are unchanged

One image token in a conversation stands for one image and is expanded to the tower's patch count
(``image_seq_length``) before tokenization reaches the model, as transformers' LLaVA processor does,
so the ids already hold N placeholders per image; several images per conversation simply hold several
runs, filled in order. Text-only samples carry no image token and no pixels.

The saved directory is transformers' LLaVA layout (``LlavaForConditionalGeneration``): ``config.json``
with ``model_type: llava`` and the vision and text configs inside, tensors named
``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``, ``language_model.model.*`` and
``language_model.lm_head.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tinylm.model.llama import CausalLM, ModelConfig, model_state_dict
from tinylm.model.vision import CLIP, Projector, VisionConfig, VisionTransformer


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: ModelConfig = field(default_factory=ModelConfig)
    image_token_id: int = 0  # the id of the image placeholder token in the text vocabulary
    feature_layer: int = -1  # which vision layer feeds the projector (-1 the last, -2 the one before)
    projector_act: str = "gelu"  # the projector's activation (gelu, gelu_pytorch_tanh, quick_gelu, relu, silu)
    projector_bias: bool = True

    @property
    def image_seq_length(self) -> int:
        """Language-model positions one image takes: the tower's patch count."""
        return self.vision.num_patches

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    def to_hf_dict(self) -> dict:
        vision = (
            {**self.vision.to_hf_dict(), "vision_use_head": False}
            if self.vision.model_type != CLIP
            else self.vision.to_hf_dict()
        )
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": vision,
            "text_config": self.text.to_hf_dict(),
            "image_token_index": self.image_token_id,
            "image_seq_length": self.image_seq_length,
            "projector_hidden_act": self.projector_act,
            "multimodal_projector_bias": self.projector_bias,
            "vision_feature_layer": self.feature_layer,
            # SigLIP has no class token to drop ("full"); CLIP's is dropped ("default")
            "vision_feature_select_strategy": "default" if self.vision.model_type == CLIP else "full",
            "tie_word_embeddings": self.text.tie_word_embeddings,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict) -> VLMConfig:
        if hf.get("model_type") != "llava":
            raise ValueError(f"model_type is {hf.get('model_type')!r}; a vision-language model directory says llava")
        strategy = hf.get("vision_feature_select_strategy", "default")
        vision = VisionConfig.from_hf_dict(hf["vision_config"])
        if (strategy == "default") != (vision.model_type == CLIP):
            raise ValueError(
                f"vision_feature_select_strategy {strategy!r} with a {vision.model_type} tower is not supported "
                "(SigLIP towers use 'full', CLIP towers 'default')"
            )
        layer = hf.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
        return cls(
            vision=vision,
            text=ModelConfig.from_hf_dict(hf["text_config"]),
            image_token_id=hf["image_token_index"],
            feature_layer=layer,
            projector_act=hf.get("projector_hidden_act", "gelu"),
            projector_bias=hf.get("multimodal_projector_bias", True),
        )


class VisionLanguageModel(nn.Module):
    """Vision tower + projector + causal language model (tinylm's CausalLM)."""

    def __init__(
        self, config: VLMConfig, language_model: CausalLM | None = None, vision_tower: VisionTransformer | None = None
    ):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower if vision_tower is not None else VisionTransformer(config.vision)
        self.multi_modal_projector = Projector(
            config.vision.hidden_size, config.text.hidden_size, config.projector_act, config.projector_bias
        )
        self.language_model = language_model if language_model is not None else CausalLM(config.text)
        self.freeze_unused_vision_layers()

    def freeze_unused_vision_layers(self) -> None:
        """What comes after the feature layer never runs (LLaVA reads a layer's output before the final
        norm): frozen, so no optimizer state is spent on it and DDP finds no unused parameters."""
        layers = self.vision_tower.encoder.layers
        used = self.config.feature_layer % (len(layers) + 1)
        for module in [*layers[used:], self.vision_tower.post_layernorm]:
            module.requires_grad_(False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] → [images, image_seq_length, text hidden size]."""
        return self.multi_modal_projector(self.vision_tower(pixel_values, self.config.feature_layer))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every run of image tokens replaced by its image's features, in order."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        placeholders = input_ids == self.config.image_token_id
        count = int(placeholders.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if count:
                raise ValueError(f"the ids hold {count} image tokens but no image was given")
            return embeds + self._zero_from_image_side(embeds)
        features = self.image_features(pixel_values).to(embeds.dtype)
        if count != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"the ids hold {count} image tokens, but {features.shape[0]} image(s) give "
                f"{features.shape[0]} × {features.shape[1]} = {features.shape[0] * features.shape[1]} features"
            )
        return embeds.masked_scatter(placeholders[..., None], features.reshape(-1, features.shape[-1]))

    def _zero_from_image_side(self, embeds: torch.Tensor) -> torch.Tensor | float:
        """0, tied to every trainable weight of the tower and projector when training on a batch without
        images: they then get (zero) gradients like every other batch, so data-parallel processes, which
        must all reduce the same gradients, stay in step whether or not their batch held a picture."""
        if not (self.training and torch.is_grad_enabled()):
            return 0.0
        weights = [
            p for m in (self.vision_tower, self.multi_modal_projector) for p in m.parameters() if p.requires_grad
        ]
        return sum(p.sum() for p in weights) * 0.0 if weights else 0.0

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """As CausalLM.forward (logits, or the summed loss given ``labels``), with images."""
        return self.language_model(None, labels=labels, inputs_embeds=self.embed(input_ids, pixel_values), **kwargs)


def llava_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """The tensors under the names of transformers' LLaVA checkpoints."""
    state = {f"vision_tower.vision_model.{k}": v for k, v in model.vision_tower.state_dict().items()}
    state |= {f"multi_modal_projector.{k}": v for k, v in model.multi_modal_projector.state_dict().items()}
    for name, tensor in model_state_dict(model.language_model).items():
        state[f"language_model.{name}"] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def vlm_from_state_dict(config: VLMConfig, state: dict[str, torch.Tensor], prepare=None) -> VisionLanguageModel:
    """A model from LLaVA-named tensors (the legacy names above, or transformers 5's ``model.*`` ones).
    ``prepare(model)``, if given, reshapes the new model before the tensors load (quantized layers)."""
    renames = (
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("vision_tower.vision_model.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    )
    own = {}
    for name, tensor in state.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        own[name] = tensor
    model = VisionLanguageModel(config)
    if prepare is not None:
        prepare(model)
    if config.text.tie_word_embeddings:
        own.pop("language_model.lm_head.weight", None)
    expected = set(model.state_dict()) - (
        {"language_model.lm_head.weight"} if config.text.tie_word_embeddings else set()
    )
    missing, unexpected = sorted(expected - own.keys()), sorted(own.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit the LLaVA config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    shapes = model.state_dict()
    for name, tensor in own.items():
        if tensor.shape != shapes[name].shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(shapes[name].shape)}"
            )
    model.load_state_dict(own, strict=False)
    return model


# -- image tags in text -------------------------------------------------------------------------

IMAGE_TAG = "<image>"  # what data files and users write: one tag per image
IMAGE_TOKEN = "<|image|>"  # the tokenizer's placeholder; each tag becomes image_seq_length of them


def count_image_tags(text: str) -> int:
    return text.count(IMAGE_TAG)


def expand_image_tags(text: str, images: int, seq_length: int, where: str = "the prompt") -> str:
    """Each ``<image>`` tag → ``seq_length`` image tokens, after checking there is one tag per image."""
    tags = count_image_tags(text)
    if tags != images:
        raise ValueError(
            f"{where} holds {tags} {IMAGE_TAG} tag(s) but {images} image(s) were given: put one tag where each image "
            "goes"
        )
    if IMAGE_TOKEN in text.replace(IMAGE_TAG, ""):
        raise ValueError(
            f"{where} contains the image token {IMAGE_TOKEN} itself; write {IMAGE_TAG} where an image goes"
        )
    return text.replace(IMAGE_TAG, IMAGE_TOKEN * seq_length)


def ensure_image_token(language_model: CausalLM, tokenizer):
    """(tokenizer, id of IMAGE_TOKEN): tinylm's tokenizers have it; a foreign one (a local Llama or Qwen)
    gets it added as a special token, and the embeddings grow by a row if its id is past them (a Qwen
    vocabulary is padded, so it usually fits). The new row starts at the mean embedding; it is only ever
    a placeholder, replaced by image features before the model sees it."""
    index = tokenizer.token_to_id(IMAGE_TOKEN)
    if index is None:
        tokenizer = tokenizer.with_special_tokens([IMAGE_TOKEN])
        index = tokenizer.token_to_id(IMAGE_TOKEN)
    rows = language_model.model.embed_tokens.weight.shape[0]
    if index >= rows:
        grow_vocabulary(language_model, index + 1)
    return tokenizer, index


@torch.no_grad()
def grow_vocabulary(model: CausalLM, size: int) -> None:
    """Give the embeddings (and an untied lm_head) ``size`` rows; new rows start at the mean row."""
    old = model.model.embed_tokens.weight
    extra = size - old.shape[0]
    model.model.embed_tokens.weight = nn.Parameter(torch.cat([old, old.mean(0, keepdim=True).expand(extra, -1)]))
    model.model.embed_tokens.num_embeddings = size
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        head = model.lm_head.weight
        model.lm_head.weight = nn.Parameter(torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)]))
    model.lm_head.out_features = size
    model.config.vocab_size = size
