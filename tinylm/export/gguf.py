"""A model directory → one GGUF file, the format llama.cpp, Ollama and LM Studio run.

    tinylm export gguf runs/quickstart/sft/final chat.gguf --type q8_0

What goes in (written with the ``gguf`` package, llama.cpp's own writer):

* **metadata** under the architecture's name (``llama``, ``qwen2`` or ``qwen3``): context length,
  widths, heads, RMSNorm epsilon, RoPE base and scaling, file type;
* **tensors** under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ...). Norms and biases stay
  f32; the matrices take the chosen type (f32, f16, bf16, q8_0 or q4_0: blocks of 32 weights sharing
  one scale; q4_k_m from llama.cpp's own quantizer), or f16 where a row is not a whole number of
  blocks. A tied ``lm_head`` is left out, and llama.cpp reuses the embeddings, as the model does;
* **the Q/K row order.** Rotary embeddings turn pairs of query/key dimensions. transformers' Llama
  (and tinylm) pairs dimension j with j + d/2 of each head; llama.cpp's ``llama`` graph pairs
  neighbours, 2j with 2j + 1. So for ``llama`` the rows of each head are interleaved, row j going to
  2j and row j + d/2 to 2j + 1, which gives the same attention. ``qwen2`` and ``qwen3`` use the
  other rotary layout in llama.cpp, and keep the rows as they are;
* **the tokenizer**: every token in its byte-level spelling, the merges in rank order, the special
  tokens marked as control tokens, which pre-tokenizer regex splits text before BPE (``qwen2`` for
  tinylm's and Qwen's tokenizers, ``llama-bpe`` for Llama 3's), the end-of-text and end-of-turn ids,
  and the chat template's Jinja.

The file is written aside and renamed into place, so a failed export leaves nothing at ``out``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinylm.chat_template import CONTENT, find_template
from tinylm.io import DataError, atomic_write_text, read_json, verify_manifest
from tinylm.modeldir import (
    CONFIG,
    directory_kind,
    read_model_config,
    read_quantization,
    read_weights,
    resolve_model,
)
from tinylm.tokenizer import QWEN2_SPLIT, Tokenizer

# --type → general.file_type's name in gguf.LlamaFileType
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_k_m": "MOSTLY_Q4_K_M",
}
TYPES = tuple(FILE_TYPES)
K_QUANTS = ("q4_k_m",)  # made by llama.cpp's quantizer from an f32 file

# The pre-tokenizer regexes llama.cpp knows by name (src/llama-vocab.cpp), as tokenizer.json spells them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


class ExportError(DataError):
    """A model or file that cannot become a GGUF, with the reason."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


@dataclass
class Tensor:
    name: str  # llama.cpp's name
    data: np.ndarray  # float32, in PyTorch's [out, in] layout


def permute_for_llama(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (j pairs with j + d/2) to interleaved order (2j with
    2j + 1): row j goes to 2j, row j + d/2 to 2j + 1. Works on a weight [heads·d, in] or a bias [heads·d]."""
    rest = weight.shape[1:]
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def architecture(config, directory: Path) -> str:
    kind = config.model_type
    if kind == "llama" and (config.attention_bias or config.mlp_bias):
        raise ExportError(f"{directory}: a llama model with biases has no GGUF architecture here (expected none)")
    if kind == "qwen3" and config.attention_bias:
        raise ExportError(f"{directory}: a qwen3 model with attention biases has no GGUF architecture here")
    return kind


def gguf_tensors(config, state: dict[str, torch.Tensor], arch: str) -> list[Tensor]:
    """The model's tensors under llama.cpp's names, Q/K rows interleaved for ``llama``."""
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    out = [Tensor("token_embd.weight", _array(state["model.embed_tokens.weight"]))]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for hf, ours in names.items():
            if (tensor := state.get(prefix + hf)) is None:
                continue
            if arch == "llama" and hf.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = config.num_attention_heads if "q_proj" in hf else config.num_key_value_heads
                tensor = permute_for_llama(tensor, heads)
            out.append(Tensor(f"blk.{layer}.{ours}", _array(tensor)))
    out.append(Tensor("output_norm.weight", _array(state["model.norm.weight"])))
    if not config.tie_word_embeddings:
        out.append(Tensor("output.weight", _array(state["lm_head.weight"])))
    return out


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).contiguous().numpy()


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int, directory: Path) -> dict:
    """tokens, token types, merges and the pre-tokenizer's name, from tokenizer.json."""
    gguf = _gguf()
    spec = json.loads(tokenizer.to_json())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{directory}/tokenizer.json: expected a byte-level BPE tokenizer (as tinylm and Qwen use)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), directory)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        token = tokenizer.id_to_token(index)
        if token is None:  # a row of the embedding no token uses
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"pre": pre, "tokens": tokens, "types": [int(t) for t in types], "merges": merges}


def _pre_tokenizer_name(pre: dict | None, directory: Path) -> str:
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    for part in parts:
        pattern = (part.get("pattern") or {}).get("Regex") if part.get("type") == "Split" else None
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    raise ExportError(
        f"{directory}/tokenizer.json: its pre-tokenizer is not one llama.cpp knows by name "
        f"(expected the qwen2 or Llama 3 split regex); llama.cpp would tokenize the text differently"
    )


def export_gguf(model_dir: str | Path, out: str | Path, type_name: str = "f16") -> list[Path]:
    """Write ``model_dir`` (a plain tinylm / Llama / Qwen2 / Qwen3 model directory, or Hub id) as one GGUF file,
    and an Ollama Modelfile beside it when the chat template is one of tinylm's; return what was written."""
    directory, out = resolve_model(model_dir), Path(out)
    if type_name not in TYPES:
        raise ExportError(f"--type: expected one of {', '.join(TYPES)}, got {type_name!r}")
    if type_name in K_QUANTS:
        _llama_cpp()  # before any work: the k-quants come from llama.cpp's own quantizer
    kind = directory_kind(directory)
    if kind != "model":
        raise ExportError(f"{directory}: is a {kind} directory; export a plain model directory (merge adapters first)")
    verify_manifest(directory)
    config = read_model_config(directory)
    if quantized := read_quantization(directory / CONFIG, read_json(directory / CONFIG)):
        raise ExportError(
            f"{directory}: is quantized ({quantized[0].describe()}); export the float model it was made from "
            "(GGUF has its own integer types: --type q8_0, q4_0 or q4_k_m)"
        )
    arch = architecture(config, directory)
    if not (directory / "tokenizer.json").is_file():
        raise ExportError(f"{directory}: has no tokenizer.json, and a GGUF carries its tokenizer")
    tokenizer = Tokenizer.load(directory)
    state = read_weights(directory)

    scratch = out.with_name(f".{out.name}.partial")
    unquantized = out.with_name(f".{out.name}.f32.partial")
    try:
        if type_name in K_QUANTS:  # llama.cpp quantizes from the full-precision file
            write_gguf(unquantized, directory, config, arch, state, tokenizer, "f32")
            quantize_with_llama_cpp(unquantized, scratch, type_name)
        else:
            write_gguf(scratch, directory, config, arch, state, tokenizer, type_name)
        os.replace(scratch, out)
    finally:
        scratch.unlink(missing_ok=True)
        unquantized.unlink(missing_ok=True)
    modelfile = write_modelfile(out, tokenizer)
    return [out, modelfile] if modelfile else [out]


def write_gguf(path: Path, directory: Path, config, arch: str, state, tokenizer: Tokenizer, type_name: str) -> None:
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(directory.resolve().name if directory.name != "final" else directory.resolve().parent.name)
    add_model_metadata(writer, config, directory)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[type_name])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config.vocab_size, directory)
    for tensor in gguf_tensors(config, state, arch):
        data, raw_type = _encode(gguf, tensor, type_name)
        writer.add_tensor(tensor.name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_model_metadata(writer, config, directory: Path) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    _add_rope_scaling(writer, config, directory)


def add_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int, directory: Path) -> None:
    vocab = tokenizer_metadata(tokenizer, vocab_size, directory)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.eos_id)
    if tokenizer.bos_token is not None and (bos := tokenizer.token_to_id(tokenizer.bos_token)) is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(False)  # tinylm's encode adds no BOS: the chat template and data decide
    if (end_of_turn := end_of_turn_id(tokenizer)) is not None:
        writer.add_eot_token_id(end_of_turn)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The token an assistant ends its turn with, where it is one token: the template's end-of-turn
    marker (``<|im_end|>`` for ChatML), or ``<|im_end|>`` for a template that is not tinylm's."""
    template = find_template(tokenizer.chat_template)
    for marker in template.stop_strings if template else ["<|im_end|>"]:
        if len(ids := tokenizer.encode(marker)) == 1:
            return ids[0]
    return None


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            "the k-quants (q4_k_m) are made by llama.cpp's own quantizer: pip install llama-cpp-python"
        ) from None
    return llama_cpp


def quantize_with_llama_cpp(source: Path, out: Path, type_name: str) -> None:
    """llama.cpp's quantizer (the code behind llama-quantize), through llama-cpp-python."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise ExportError(f"llama.cpp could not quantize {source} to {type_name}")


def _add_rope_scaling(writer, config, directory: Path) -> None:
    scaling = config.rope_scaling
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "linear":
        raise ExportError(f"{directory}: rope_scaling {kind!r} is not exported to GGUF here (expected none or linear)")
    gguf = _gguf()
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(scaling["factor"]))


def _encode(gguf, tensor: Tensor, type_name: str):
    """The tensor's bytes in ``type_name`` (f32 for norms and biases), and its GGML type."""
    data = tensor.data
    if data.ndim == 1 or type_name == "f32":
        return data, gguf.GGMLQuantizationType.F32
    kind = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[type_name]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if data.shape[-1] % block:  # llama.cpp's own converter makes the same choice
        kind = gguf.GGMLQuantizationType.F16
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), kind
    return gguf.quants.quantize(data, kind), kind


def ollama_modelfile(gguf_path: Path, tokenizer: Tokenizer) -> str | None:
    """An Ollama Modelfile for the GGUF: its chat template in Ollama's Go template language and the
    stop strings, generated from the same pieces as the Jinja; None when the tokenizer's template is
    not one of tinylm's (Ollama then reads the GGUF's own chat template where it can)."""
    template = find_template(tokenizer.chat_template)
    if template is None:
        return None

    def go(piece: str, value: str = "") -> str:  # literal text, with the value where {content} was
        return piece.replace(CONTENT, value)

    text = (
        f"{{{{ if .System }}}}{go(template.system, '{{ .System }}')}{{{{ else }}}}{template.no_system}{{{{ end }}}}"
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "user" }}}}{go(template.user, "{{ .Content }}")}'
        f'{{{{ else if eq .Role "assistant" }}}}{template.assistant_header}'
        f"{go(template.assistant, '{{ .Content }}')}{template.separator}"
        "{{ end }}{{ end }}"
        f"{template.assistant_header}"
    )
    stops = list(dict.fromkeys([*template.stop_strings, tokenizer.eos_token]))
    lines = [
        f"# ollama create NAME -f {gguf_path.with_suffix('.Modelfile').name}",
        f"FROM ./{gguf_path.name}",
        f'TEMPLATE """{text}"""',
        *(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops),
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer: Tokenizer) -> Path | None:
    text = ollama_modelfile(gguf_path, tokenizer)
    if text is None:
        return None
    path = gguf_path.with_suffix(".Modelfile")
    atomic_write_text(path, text)
    return path
