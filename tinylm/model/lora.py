"""LoRA: fine-tune a big frozen matrix through a small low-rank correction.

A linear layer computes ``y = W x``. LoRA (Hu et al., 2021) keeps W frozen and learns
``y = W x + (alpha / r) · B A x`` with A [r, in] and B [out, r] for a small rank r: a few thousand
numbers per layer instead of in × out. B starts at zero, so training starts from exactly the base
model. Afterwards the correction can be kept apart as an *adapter* (a small file, loadable next to the
base model) or *merged*: W' = W + (alpha / r) · B A gives a plain model with no LoRA left in it.

rsLoRA (Kalajdzievski, 2023) scales by alpha / √r instead, which keeps the update's size steady as the
rank grows.

A frozen embedding cannot learn tokens the base never saw (the chat template's markup, for a base
model). Two ways out, both PEFT's: *trainable token rows* (``trainable_token_indices``) train only the
rows of chosen token ids, the rest of the matrix frozen; ``modules_to_save`` trains a whole module
(the embeddings, the head, a reward model's score head) beside the adapter.

This module is the torch side only. Adapters are saved and loaded in PEFT's directory layout by
``tinylm.modeldir`` (``save_adapter``, ``load_adapter``), from the tensors named here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.model.quant import QuantizedLinear

# Every linear layer of a decoder layer: what PEFT's "all-linear" means for these models (not the lm_head).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEY_PREFIX = "base_model.model."  # PEFT's prefix of every saved adapter tensor
ROW_MODULES = ("embed_tokens", "lm_head")  # where token rows can train


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    # token ids whose rows of the embedding ("embed_tokens") or of an untied head ("lm_head") train;
    # a tied head shares the embedding's rows
    trainable_token_indices: dict[str, list[int]] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)  # modules trained whole (PEFT's name)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora r: expected a rank >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout: expected a probability in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora target_modules is empty: name the linear layers to adapt (e.g. q_proj, v_proj)")
        if isinstance(self.trainable_token_indices, list):  # PEFT's short form: the embedding's rows
            self.trainable_token_indices = {"embed_tokens": self.trainable_token_indices}
        if unknown := sorted(set(self.trainable_token_indices) - set(ROW_MODULES)):
            raise ValueError(f"lora trainable_token_indices: {unknown} are not {' or '.join(ROW_MODULES)}")
        for name, ids in self.trainable_token_indices.items():
            if not ids or any(not isinstance(i, int) or i < 0 for i in ids) or len(set(ids)) != len(ids):
                raise ValueError(f"lora trainable_token_indices[{name!r}]: expected distinct token ids >= 0, got {ids}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank correction.

    The base is an ``nn.Linear`` (its ``weight`` and ``bias`` are kept under their own names, so the
    model's tensor names do not change) or a ``QuantizedLinear``: QLoRA's NF4 weights, or the integer
    weights of a quantized model directory (``tinylm quantize``).
    ``disabled`` switches the correction off: the base model again, with nothing copied (DPO uses that
    as its reference model).
    """

    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quantized = None
        if isinstance(base, nn.Linear):
            self.weight, self.bias = base.weight, base.bias  # the very same tensors: nothing is copied
            self.weight.requires_grad_(False)
            device, dtype = base.weight.device, base.weight.dtype
        else:  # a quantized base (tinylm.model.quant.QuantizedLinear): it dequantizes on the fly
            self.quantized = base
            self.register_parameter("weight", None)
            device, dtype = base.device, base.dtype
            self.bias = None
        if getattr(base, "bias", None) is not None:
            base.bias.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear initialises; PEFT does too
        nn.init.zeros_(self.lora_B.weight)  # the correction starts at zero: the base model, exactly
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x)
        if self.disabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def base_weight(self) -> torch.Tensor:
        return self.weight if self.quantized is None else self.quantized.dequantize()

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight includes the correction (a quantized base is dequantized)."""
        base = self.base_weight()
        bias = self.bias if self.quantized is None else self.quantized.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        linear.weight = nn.Parameter((base.float() + delta).to(self.lora_A.weight.dtype), requires_grad=False)
        linear.bias = bias
        return linear

    def extra_repr(self) -> str:
        base = type(self.quantized).__name__ if self.quantized is not None else "fp"
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.out_features}, base={base}"


class TokenRows(nn.Module):
    """PEFT's ``token_adapter``: the trained values of some rows of a weight (its ``trainable_tokens_delta``
    holds the rows themselves, which replace the frozen ones), starting as copies of them."""

    def __init__(self, weight: torch.Tensor, indices: list[int]):
        super().__init__()
        if max(indices) >= weight.shape[0]:
            raise ValueError(f"trainable token id {max(indices)} is beyond the {weight.shape[0]} rows of the matrix")
        self.register_buffer("token_indices", torch.tensor(indices, device=weight.device), persistent=False)
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[self.token_indices].clone())

    def apply_to(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))


class RowAdapted(nn.Module):
    """An embedding or a linear head (``base_layer``, frozen) whose rows of chosen token ids train
    (``token_adapter``). ``weight`` is the matrix with those rows replaced, so code that reads the
    weight (the loss computed from the head's weight, a tied head) sees what the forward uses. A tied
    head is wrapped with the embedding's own ``TokenRows``: one set of rows serves both."""

    def __init__(self, base: nn.Module, adapter: TokenRows):
        super().__init__()
        self.base_layer, self.token_adapter = base, adapter
        base.weight.requires_grad_(False)
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        base = self.base_layer.weight
        return base if self.disabled else self.token_adapter.apply_to(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Embedding):
            return F.embedding(x, self.weight, self.base_layer.padding_idx)
        return F.linear(x, self.weight, self.base_layer.bias)

    def merged(self, weight: nn.Parameter | None = None) -> nn.Module:
        """The base module again, its weight (or ``weight``, a tied one merged already) with the rows in."""
        base = self.base_layer
        base.weight = weight if weight is not None else nn.Parameter(self.weight.detach(), requires_grad=False)
        return base


def add_token_rows(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the embedding (and the head) named in ``config.trainable_token_indices`` so that only the
    chosen rows train (after ``add_lora``, which froze everything else). A tied head gets the
    embedding's rows; rows of a tied head on their own are refused. Returns the wrapped modules' names."""
    rows = config.trainable_token_indices
    if not rows:
        return []
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tied and "lm_head" in rows:
        raise ValueError(
            "lora trainable_token_indices names lm_head, whose weight is the embedding's (tied): name "
            "embed_tokens alone, and its rows serve both"
        )
    wrapped, adapters = [], {}
    for name, module in list(model.named_modules()):
        kind = name.split(".")[-1]
        if kind in rows and isinstance(module, (nn.Embedding, nn.Linear)):
            adapters[kind] = TokenRows(module.weight, rows[kind])
            _replace(model, name, RowAdapted(module, adapters[kind]))
            wrapped.append(name)
    if tied and "embed_tokens" in adapters:
        for name, module in list(model.named_modules()):
            if name.split(".")[-1] == "lm_head" and isinstance(module, nn.Linear):
                _replace(model, name, RowAdapted(module, adapters["embed_tokens"]))
    if missing := sorted(set(rows) - set(adapters)):
        raise ValueError(f"lora trainable_token_indices names {missing}, which the model does not have")
    return wrapped


def add_modules_to_save(model: nn.Module, config: LoRAConfig) -> None:
    """Train the modules named in ``config.modules_to_save`` whole (their weights, under their own names)."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for kind in config.modules_to_save:
        if tied and kind in ROW_MODULES:
            raise ValueError(
                f"lora modules_to_save names {kind}, and the model's head and embedding are one tied matrix: train "
                "chosen rows of it with trainable_token_indices (embed_tokens) instead"
            )
        found = [m for n, m in model.named_modules() if n.split(".")[-1] == kind]
        if not found:
            raise ValueError(f"lora modules_to_save names {kind!r}, which the model does not have")
        for module in found:
            module.requires_grad_(True)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base model: every LoRA correction and trained token row off inside the block
    (a module trained whole, ``modules_to_save``, stays as it is)."""
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, RowAdapted))]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def is_adaptable(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: nn.Linear or a quantized one."""
    return isinstance(module, (nn.Linear, QuantizedLinear))


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every linear layer whose name ends with one of ``config.target_modules``; freeze everything
    but the new A and B matrices. Returns the wrapped layers' names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if is_adaptable(module) and name.split(".")[-1] in config.target_modules:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, config))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(
            f"no linear layer is named like {config.target_modules}; the model has "
            f"{sorted({n.split('.')[-1] for n, m in model.named_modules() if is_adaptable(m)})}"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return wrapped


def restore_full_precision(model: nn.Module, full: nn.Module) -> None:
    """Give each 4-bit (QLoRA) layer of ``model`` back its full-precision base, taken from ``full`` (the
    same model before quantization), so that merging adds the learned correction to the original
    weights rather than to their 4-bit rounding."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.quantized is not None:
            linear = full.get_submodule(name)
            device = module.lora_A.weight.device
            module.quantized = None
            module.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
            module.bias = (
                None if linear.bias is None else nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
            )


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA correction and trained token row into its base weight and remove the adapter
    layers (in place); a tied head and its embedding end with one weight again."""
    merged_rows: dict[int, nn.Parameter] = {}  # TokenRows → the weight merged with them
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
        elif isinstance(module, RowAdapted):
            key = id(module.token_adapter)
            plain = module.merged(merged_rows.get(key))
            merged_rows.setdefault(key, plain.weight)
            _replace(model, name, plain)
    return model


def adapter_state_dict(model: nn.Module, modules_to_save=()) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names: the LoRA matrices, the trained token rows (a tied head's
    once, as the embedding's), and the weights of the modules trained whole."""
    return {
        KEY_PREFIX + name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters()
        if is_adapter_tensor(name, modules_to_save)
    }


def is_adapter_tensor(name: str, modules_to_save=()) -> bool:
    """A parameter an adapter holds: LoRA's A and B, trained token rows, a module trained whole."""
    return ".lora_" in name or ".token_adapter." in name or name.split(".")[-2] in modules_to_save


def load_adapter_state(model: nn.Module, saved: dict[str, torch.Tensor], modules_to_save=()) -> None:
    """Copy adapter tensors saved under PEFT's names into ``model``'s adapter layers (added beforehand
    with ``add_lora`` and ``add_token_rows``) and into the modules it trains whole. Every such tensor
    must be there with its shape; a ValueError says which is not."""
    # PEFT writes no adapter name into the file, but older files may carry ".default"
    saved = {k.removeprefix(KEY_PREFIX).replace(".default.", "."): v for k, v in saved.items()}
    own = {name: p for name, p in model.named_parameters() if is_adapter_tensor(name, modules_to_save)}
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"the adapter does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, param in own.items():
            if saved[name].shape != param.shape:
                raise ValueError(f"{name} is {tuple(saved[name].shape)}, the model needs {tuple(param.shape)}")
            param.copy_(saved[name])
