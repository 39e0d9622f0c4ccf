"""Integer weights in a model directory: compressed-tensors' pack-quantized layout, as vLLM and
transformers read it."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from tinylm.model.intquant import IntLinear, IntScheme, decoder_linears
from tinylm.modeldir.files import ModelDirError

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
