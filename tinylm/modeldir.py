"""Model directories: the Hugging Face layout plus a SHA256SUMS manifest, written atomically.

    final/
      config.json              transformers config (model_type llama / qwen2 / qwen3)
      model.safetensors        weights under transformers' names
      generation_config.json
      tokenizer.json, tokenizer_config.json, special_tokens_map.json
      SHA256SUMS               "<sha256>  <file>" per file, checked on load

A directory is first written beside its destination and renamed into place only when complete, so a
crash never leaves a half-written model where a good one was. Directories saved by transformers (no
manifest, perhaps sharded weights) load too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinylm.model.llama import CausalLM, ModelConfig, rope_frequencies

MANIFEST = "SHA256SUMS"


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or corrupted; the message names the file."""


# -- atomic writes ------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so readers see the old content or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the permissions of an ordinary file
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a scratch directory that replaces ``path`` only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp makes it private; others may need to read the model
    try:
        yield scratch
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(scratch, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


# -- the manifest -------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record the SHA-256 of every file in the directory (recursively, sorted)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    atomic_write_text(directory / MANIFEST, "".join(lines))


def verify_manifest(directory: str | Path) -> bool:
    """Check every file listed in SHA256SUMS; return False when there is no manifest."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.exists():
        return False
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        expected, _, name = line.partition("  ")
        if len(expected) != 64 or not name:
            raise ModelDirError(f"{manifest}:{number}: expected '<sha256>  <file>', got {line!r}")
        path = directory / name
        if not path.is_file():
            raise ModelDirError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_file(path) != expected:
            raise ModelDirError(f"{path}: failed its SHA-256 check (the file is corrupted or was changed after saving)")
    return True


# -- saving -------------------------------------------------------------------------------------


def model_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The tensors to save: contiguous, on CPU, with a tied lm_head left out (transformers re-ties it)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name in tied_head_names(model):
        state.pop(name, None)
    return state


def tied_head_names(model) -> set[str]:
    """The lm_head weights that are the embeddings themselves (a language model's, or one inside a
    vision-language model), which are saved once, as the embeddings."""
    if not model.config.tie_word_embeddings:
        return set()
    return {
        name
        for name, _ in model.named_parameters(remove_duplicate=False)
        if name.split(".")[-2:] == ["lm_head", "weight"]
    }


def generation_config(config: ModelConfig, eos_token_id=None) -> dict:
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
        "do_sample": False,
    }


def save_model_dir(
    model: CausalLM, out_dir: str | Path, tokenizer=None, extra_files: dict[str, str] | None = None
) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face model directory with a manifest."""
    out_dir = Path(out_dir)
    config = model.config
    state = model_state_dict(model)
    hf_config = config.to_hf_dict()
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    hf_config["dtype"] = hf_config["torch_dtype"] = dtype_name  # transformers 5 reads the first, 4.x the second
    with atomic_directory(out_dir) as scratch:
        save_file(state, scratch / "model.safetensors", metadata={"format": "pt"})
        (scratch / "config.json").write_text(
            json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (scratch / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(scratch)
        for name, text in (extra_files or {}).items():
            (scratch / name).write_text(text, encoding="utf-8")
        write_manifest(scratch)
    return out_dir


# -- loading ------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Read model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise ModelDirError(f"{path}: missing (only safetensors weights are loaded, never pickles)")
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError) as e:
            raise ModelDirError(f"{path}: cannot be read as safetensors ({e})") from None
    return state


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    try:
        return ModelConfig.from_hf_dict(read_json(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, ModelDirError):
            raise
        raise ModelDirError(f"{path}: {e}") from None


def load_model_dir(path: str | Path, device=None, dtype: torch.dtype | None = None, with_tokenizer: bool = True):
    """Load a model directory → (CausalLM, Tokenizer or None). Verifies SHA256SUMS when present.
    An adapter directory (adapter_config.json, no config.json) loads as its base with the adapter merged.

    ``dtype`` None keeps the dtype the weights were saved in.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ModelDirError(f"{directory}: not a model directory (does not exist or is not a directory)")
    if (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file():
        from tinylm.model.lora import load_adapter_dir  # a LoRA run's output: its base model + the adapter

        return load_adapter_dir(directory, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
    verify_manifest(directory)
    if read_json(directory / "config.json").get("model_type") == "llava":
        raise ModelDirError(
            f"{directory}: is a vision-language model (model_type llava); load it with Engine.from_dir "
            "or tinylm.model.vlm.load_vlm_dir, or start stage 2 from it with tinylm vlm sft --init"
        )
    config = load_config(directory)
    state = load_weights(directory)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = CausalLM(config, device="meta")  # shapes only; the loaded tensors are assigned below
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelDirError(
            f"{directory}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, tensor in state.items():
        want = model.state_dict()[name].shape
        if tensor.shape != want:
            raise ModelDirError(
                f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(want)}"
            )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_frequencies(config)  # the one buffer that is derived, not loaded
    model = model.to(device) if device is not None else model
    tokenizer = None
    if with_tokenizer and (directory / "tokenizer.json").exists():
        from tinylm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(directory)
    return model.eval(), tokenizer
