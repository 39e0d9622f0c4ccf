"""The eyes of a vision-language model: a vision transformer (ViT) that turns an image into patch
features, and the projector that maps those into the language model's embedding space (LLaVA).

    image [3, H, W] → cut into P×P patches → each patch a vector (a strided convolution)
                    → + a learned position embedding per patch
                    → L transformer layers (pre-norm, full attention: every patch sees every patch)
                    → N = (H/P)·(W/P) feature vectors of the chosen layer
    projector:        Linear → GELU → Linear, vision width → the language model's hidden size

The modules and tensor names follow transformers' SigLIP vision model (``SiglipVisionModel``):
``embeddings.patch_embedding``, ``embeddings.position_embedding``, ``encoder.layers.N.{layer_norm1,
self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}``, ``post_layernorm``. So a tower trained
here loads there, and a pretrained SigLIP tower from a local directory loads here. CLIP's vision
tower is the same design with three differences, switched on by ``VisionConfig.model_type``: a learned
class token prepended to the patches, a layer norm before the first layer (``pre_layrnorm``, spelled
as transformers spells it), no bias on the patch convolution, and the "quick GELU" activation.

LLaVA feeds the language model the hidden states of one encoder layer (``feature_layer``, -1 the
last, -2 the one before), taken *before* ``post_layernorm``; with CLIP the class token is dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIGLIP, CLIP = "siglip_vision_model", "clip_vision_model"
ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass
class VisionConfig:
    """A vision tower's shape; the keys are those of transformers' SiglipVisionConfig / CLIPVisionConfig."""

    model_type: str = SIGLIP  # siglip_vision_model | clip_vision_model
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_channels: int = 3
    image_size: int = 64
    patch_size: int = 8
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.model_type not in (SIGLIP, CLIP):
            raise ValueError(f"vision model_type {self.model_type!r}: expected {SIGLIP} or {CLIP}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r}: expected one of {', '.join(ACTIVATIONS)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def class_token(self) -> bool:
        return self.model_type == CLIP

    def to_hf_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, hf: dict) -> VisionConfig:
        """From a vision config, or a whole SigLIP/CLIP (or LLaVA) config holding one in "vision_config"."""
        if "vision_config" in hf:
            hf = {
                "model_type": {"siglip": SIGLIP, "clip": CLIP}.get(hf.get("model_type"), SIGLIP),
                **hf["vision_config"],
            }
        model_type = hf.get("model_type", SIGLIP)
        defaults = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5} if model_type == CLIP else {}
        known = {k: hf[k] for k in cls.__dataclass_fields__ if k in hf}
        return cls(**{**defaults, **known})


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, bias=not config.class_token)
        positions = config.num_patches + config.class_token
        self.position_embedding = nn.Embedding(positions, d)
        if config.class_token:
            self.class_embedding = nn.Parameter(torch.randn(d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] → [B, patches (+1 class token), D]."""
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        if self.config.class_token:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return x + self.position_embedding.weight[None]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            proj(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch attends to every patch
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """The vision tower. ``forward`` gives the features LLaVA uses; ``hidden_states`` every layer's."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        if config.class_token:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal weights, zero biases, unit norms; position embeddings scaled by 1/√D."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=1 / math.sqrt(self.config.hidden_size))
        if self.config.class_token:
            nn.init.normal_(self.embeddings.class_embedding, std=1 / math.sqrt(self.config.hidden_size))

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """The embeddings and the output of each layer (as transformers' ``output_hidden_states``),
        stopping after layer ``upto`` when given."""
        x = self.embeddings(pixel_values)
        if self.config.class_token:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers[:upto]:
            x = layer(x)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        """Patch features [B, num_patches, D] of ``feature_layer`` (an index into ``hidden_states``:
        -1 the last layer, -2 the one before), without a class token. Layers after it are not run."""
        count = len(self.encoder.layers) + 1
        index = feature_layer % count
        features = self.hidden_states(pixel_values, upto=index)[index]
        return features[:, 1:] if self.config.class_token else features


PROJECTOR_ACTIVATIONS = {**ACTIVATIONS, "relu": F.relu, "silu": F.silu}


class Projector(nn.Module):
    """Vision features → language-model embeddings: Linear → activation → Linear (LLaVA-1.5's MLP
    projector, GELU by default; transformers' ``LlavaMultiModalProjector`` names the two layers linear_1
    and linear_2, and reads the activation and the biases from ``projector_hidden_act`` and
    ``multimodal_projector_bias``)."""

    def __init__(self, vision_size: int, text_size: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        if act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(f"projector activation {act!r}: expected one of {', '.join(PROJECTOR_ACTIVATIONS)}")
        self.linear_1 = nn.Linear(vision_size, text_size, bias=bias)
        self.linear_2 = nn.Linear(text_size, text_size, bias=bias)
        self.act = PROJECTOR_ACTIVATIONS[act]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))
