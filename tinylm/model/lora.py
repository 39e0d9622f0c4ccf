"""LoRA: fine-tune a big frozen matrix through a small low-rank correction.

A linear layer computes ``y = W x``. LoRA (Hu et al., 2021) keeps W frozen and learns
``y = W x + (alpha / r) · B A x`` with A [r, in] and B [out, r] for a small rank r: a few thousand
numbers per layer instead of in × out. B starts at zero, so training starts from exactly the base
model. Afterwards the correction can be kept apart as an *adapter* (a small file, loadable next to the
base model) or *merged*: W' = W + (alpha / r) · B A gives a plain model with no LoRA left in it.

rsLoRA (Kalajdzievski, 2023) scales by alpha / √r instead, which keeps the update's size steady as the
rank grows.

Adapters are saved in PEFT's layout, so ``peft.PeftModel.from_pretrained`` loads them onto the
transformers model, and adapters made by PEFT load here:

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight / .lora_B.weight
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.config import LORA_TARGETS as ALL_LINEAR  # every decoder linear (not the lm_head, as PEFT's "all-linear")
from tinylm.modeldir import ModelDirError, atomic_directory, write_manifest

KEY_PREFIX = "base_model.model."  # PEFT's prefix of every saved adapter tensor


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora r: expected a rank >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout: expected a probability in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora target_modules is empty: name the linear layers to adapt (e.g. q_proj, v_proj)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank correction.

    The base is an ``nn.Linear`` (its ``weight`` and ``bias`` are kept under their own names, so the
    model's tensor names do not change) or, for QLoRA, an ``NF4Linear`` holding 4-bit weights.
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
        else:  # a 4-bit base (tinylm.model.quant.NF4Linear): it dequantizes on the fly
            self.quantized = base
            self.register_parameter("weight", None)
            device, dtype = base.weight_codes.device, base.compute_dtype or torch.float32
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
        """A plain nn.Linear whose weight includes the correction (a 4-bit base is dequantized)."""
        base = self.base_weight()
        bias = self.bias if self.quantized is None else self.quantized.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        linear.weight = nn.Parameter((base.float() + delta).to(self.lora_A.weight.dtype), requires_grad=False)
        linear.bias = bias
        return linear

    def extra_repr(self) -> str:
        base = "4-bit" if self.quantized is not None else "fp"
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.out_features}, base={base}"


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base model: every LoRA correction off inside the block."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def is_adaptable(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: nn.Linear or a 4-bit NF4Linear."""
    from tinylm.model.quant import NF4Linear

    return isinstance(module, (nn.Linear, NF4Linear))


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
    """Fold every LoRA correction into its base weight and remove the LoRA layers (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names."""
    return {
        KEY_PREFIX + name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if ".lora_" in name
    }


def save_adapter(
    model: nn.Module,
    config: LoRAConfig,
    out_dir: str | Path,
    base_model: str | None = None,
    tokenizer=None,
    eos_token_id=None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (+ SHA256SUMS), atomically.

    A training run's adapter also carries the tokenizer (with its chat template) and a
    generation_config.json with the stop tokens, so ``tinylm chat ADAPTER_DIR`` works as for a model.
    """
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "use_rslora": config.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as scratch:
        save_file(adapter_state_dict(model), scratch / "adapter_model.safetensors", metadata={"format": "pt"})
        (scratch / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(scratch)
        if eos_token_id is not None:
            (scratch / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}, indent=2) + "\n")
        write_manifest(scratch)
    return out_dir


def base_model_path(adapter_dir: Path) -> Path:
    """The base model directory named by ``base_model_name_or_path`` (absolute, or relative to the
    working directory or to the adapter). It may itself be an adapter directory: a LoRA stage started
    from another LoRA run's output (tinylm follows the chain; PEFT does not)."""
    from tinylm.modeldir import read_json

    config_path = adapter_dir / "adapter_config.json"
    raw = read_json(config_path).get("base_model_name_or_path")
    if not raw:
        raise ModelDirError(
            f"{config_path}: base_model_name_or_path is empty; "
            "name the base model explicitly (tinylm merge MODEL_DIR ADAPTER_DIR OUT_DIR)"
        )
    for candidate in (Path(raw), adapter_dir / raw):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
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
    stop tokens saved with the adapter win over the base model's. ``dtype`` None keeps the base's."""
    from tinylm.modeldir import load_model_dir, read_json

    adapter_dir = Path(adapter_dir)
    model, tokenizer = load_model_dir(base_dir or base_model_path(adapter_dir), with_tokenizer=with_tokenizer)
    saved_dtype = model.lm_head.weight.dtype
    load_adapter(model.float(), adapter_dir)
    merge_lora(model)
    if (adapter_dir / "generation_config.json").is_file():
        eos = read_json(adapter_dir / "generation_config.json").get("eos_token_id")
        if eos is not None:
            model.config.eos_token_id = eos
    if with_tokenizer and (adapter_dir / "tokenizer.json").is_file():
        from tinylm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(adapter_dir)
    model = model.to(dtype or saved_dtype)
    return (model.to(device) if device is not None else model).eval(), tokenizer


def read_adapter_config(adapter_dir: str | Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory; options tinylm does not implement are refused by name."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing (an adapter directory holds adapter_config.json and adapter_model.safetensors)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if raw.get("peft_type") != "LORA":
        raise ModelDirError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none"}
    for key, expected in unsupported.items():
        if raw.get(key, expected) not in (expected, None):
            raise ModelDirError(f"{path}: {key} is {raw[key]!r}; tinylm supports only {key}={expected!r}")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if raw.get(key):
            raise ModelDirError(f"{path}: {key} is set ({raw[key]!r}); tinylm does not support it")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT also accepts "all-linear" or a regular expression
        if targets != "all-linear":
            raise ModelDirError(
                f"{path}: target_modules is the pattern {targets!r}; expected a list of module names or 'all-linear'"
            )
        targets = list(ALL_LINEAR)
    names = sorted(
        {t.split(".")[-1] for t in targets or []}
    )  # full paths ("model.layers.0.mlp.up_proj") name the layer kind too
    return LoRAConfig(
        r=raw["r"],
        alpha=raw["lora_alpha"],
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=names,
        rslora=bool(raw.get("use_rslora", False)),
    )


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Add LoRA layers to ``model`` as the adapter's config says and load its weights (ours or PEFT's)."""
    from tinylm.modeldir import verify_manifest

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    verify_manifest(adapter_dir)  # a tinylm adapter carries SHA256SUMS; PEFT's has none
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing")
    add_lora(model, config)
    # PEFT writes no adapter name into the file, but older files may carry ".default"
    saved = {k.removeprefix(KEY_PREFIX).replace(".default.", "."): v for k, v in load_file(weights_path).items()}
    own = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise ModelDirError(
            f"{weights_path}: the adapter does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, param in own.items():
            if saved[name].shape != param.shape:
                raise ModelDirError(
                    f"{weights_path}: {name} is {tuple(saved[name].shape)}, the model needs {tuple(param.shape)}"
                )
            param.copy_(saved[name])
    return config
