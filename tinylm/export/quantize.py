"""A float model directory → the same model with 8- or 4-bit integer weights.

    tinylm quantize runs/quickstart/sft/final --out chat-int4 --bits 4 --method gptq

Every linear layer of the decoder (attention and MLP) becomes an ``IntLinear`` (symmetric integers
with one scale per group of input columns, or per output channel); the embeddings, the norms and the
lm_head stay float. The result is an ordinary model directory whose config.json carries
compressed-tensors' ``quantization_config``: tinylm runs it (``generate``, ``chat``, ``serve``, LoRA on
top), and transformers (with the ``compressed-tensors`` package) and vLLM load it.

Methods:

* ``rtn``: round to nearest, each group scaled by its largest weight. Needs no data.
* ``gptq``: layer by layer, in order, from calibration text: the inputs each linear layer sees (with
  the layers before it already quantized) give its Hessian, and ``tinylm.model.gptq`` rounds the
  weights so that the layer's outputs move least. The calibration text is the built-in corpus (and,
  for a chat model, the built-in conversations in its template), or ``--calib FILES``.

The directory is written aside and renamed into place, so a failed run leaves nothing at ``out``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.chat_template import find_template
from tinylm.data import builtin, builtin_chat
from tinylm.data.text import read_documents
from tinylm.io import DataError, read_json
from tinylm.model.gptq import Hessian, gptq
from tinylm.model.intquant import IntLinear, IntScheme, decoder_linears, replace_module
from tinylm.model.llama import CausalLM
from tinylm.model.quant import is_quantized
from tinylm.modelcard import derived_card
from tinylm.modeldir import (
    CONFIG,
    directory_kind,
    load,
    read_quantization,
    resolve_model,
    save_model_dir,
    save_vlm_dir,
)

METHODS = ("rtn", "gptq")


class QuantizeError(DataError):
    """A model or setting that cannot be quantized, with the reason."""


@dataclass
class Calibration:
    """What GPTQ reads: ``samples`` windows of ``seq_len`` tokens, cut from ``files`` or the built-in text."""

    files: list[str] | None = None
    samples: int = 128
    seq_len: int = 256
    seed: int = 0


def quantize_model_dir(
    model_dir: str | Path,
    out: str | Path,
    bits: int = 4,
    group_size: int | None = 32,
    method: str = "gptq",
    calibration: Calibration | None = None,
) -> Path:
    """Write ``model_dir``'s model (a directory or Hub id), its decoder's linear layers quantized, as the model
    directory ``out``."""
    source, out = resolve_model(model_dir), Path(out)
    if method not in METHODS:
        raise QuantizeError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    try:
        scheme = IntScheme(bits, group_size)
    except ValueError as e:
        raise QuantizeError(f"--bits / --group-size: {e}") from None
    if directory_kind(source) != "adapter":
        already = read_quantization(source / CONFIG, read_json(source / CONFIG))
        if already:
            raise QuantizeError(
                f"{source}: is already quantized ({already[0].describe()}); quantize the float model it was made from"
            )
    loaded = load(source, dtype=torch.float32)
    model = loaded.model
    if is_quantized(model):
        raise QuantizeError(f"{source}: its base model is already quantized; quantize the float model")
    language_model = model.language_model if hasattr(model, "language_model") else model
    names = decoder_linears(language_model)
    for name in names:  # every layer's width checked before any work
        width = language_model.get_submodule(name).in_features
        try:
            scheme.groups(width)
        except ValueError as e:
            raise QuantizeError(f"{source}: {name}: {e}; choose another --group-size") from None

    if method == "rtn":
        for name in names:
            replace_module(language_model, name, IntLinear.from_linear(language_model.get_submodule(name), scheme))
    else:
        tokens = calibration_tokens(loaded.tokenizer, calibration or Calibration(), language_model)
        quantize_gptq(language_model, names, scheme, tokens)

    what = f"{scheme.describe()}, {'GPTQ' if method == 'gptq' else 'round to nearest'}"
    card = derived_card(source, str(model_dir), f"quantization ({what})", "quantized", ["quantized", method])
    if model is language_model:
        save_model_dir(model, out, tokenizer=loaded.tokenizer, card=card)
    else:
        save_vlm_dir(model, out, loaded.tokenizer, loaded.processor, card)
    return out


def calibration_tokens(tokenizer, calibration: Calibration, model: CausalLM) -> torch.Tensor:
    """[samples, seq_len] token windows: from ``calibration.files``, or the built-in corpus (and, when the
    tokenizer has a chat template, as many built-in conversations rendered in it)."""
    if tokenizer is None:
        raise QuantizeError("GPTQ needs the model's tokenizer to read calibration text; use --method rtn without one")
    seq_len = min(calibration.seq_len, model.config.max_position_embeddings)
    if calibration.files:
        texts = [text for path in calibration.files for text in read_documents(path)]
    else:
        world = builtin.World(calibration.seed)
        texts = builtin.pretrain_documents(world)
        template = find_template(tokenizer.chat_template)
        if template is not None:
            conversations = builtin_chat.sft_conversations(world, n=len(texts))
            texts = [text for pair in zip(texts, map(template.render, conversations)) for text in pair]
    needed = calibration.samples * seq_len
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= needed:
            break
    samples = len(ids) // seq_len
    if samples == 0:
        where = ", ".join(calibration.files) if calibration.files else "the built-in text"
        raise QuantizeError(f"{where}: {len(ids)} tokens, fewer than one calibration window of {seq_len}")
    return torch.tensor(ids[: min(samples, calibration.samples) * seq_len]).view(-1, seq_len)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer being calibrated has seen its inputs."""


def _stop(*_) -> None:
    raise _Stop


@torch.no_grad()
def quantize_gptq(model: CausalLM, names: list[str], scheme: IntScheme, tokens: torch.Tensor, batch: int = 8) -> None:
    """GPTQ, one decoder layer at a time: the calibration text runs through the layers already
    quantized, the inputs of this layer's linears give their Hessians, and each is replaced by its
    GPTQ rounding."""
    model.eval()
    layers = model.model.layers
    for index, layer in enumerate(layers):
        prefix = f"model.layers.{index}."
        mine = [name for name in names if name.startswith(prefix)]
        hessians = {name: Hessian(model.get_submodule(name).in_features) for name in mine}
        hooks = [
            model.get_submodule(name).register_forward_pre_hook(lambda _, args, h=hessians[name]: h.add(args[0]))
            for name in mine
        ]
        stop = layer.register_forward_hook(_stop)
        try:
            for start in range(0, len(tokens), batch):
                try:
                    model.hidden_states(tokens[start : start + batch])
                except _Stop:
                    pass
        finally:
            for hook in (*hooks, stop):
                hook.remove()
        for name in mine:
            linear = model.get_submodule(name)
            q, scale = gptq(linear.weight, hessians[name].matrix, scheme)
            replace_module(model, name, IntLinear(q, scale, scheme, linear.bias))
        print(f"gptq: layer {index + 1}/{len(layers)} quantized ({scheme.describe()})", file=sys.stderr)
