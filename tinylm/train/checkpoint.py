"""Resumable training checkpoints: everything needed to continue as if never stopped.

    checkpoints/step-000500/
      model.safetensors        the weights
      optimizer.safetensors    AdamW moments, flattened to "state.<param>.<key>"
      rng.safetensors          torch (and CUDA) random generator states
      trainer.json             step, tokens seen, scheduler, data position, optimizer hyper-parameters
      SHA256SUMS

Tensors go to safetensors and everything else to JSON, so loading never unpickles anything. A
checkpoint is written aside and renamed into place; on resume the newest one whose manifest verifies
is used, so a crash mid-save falls back to the previous good one.

A sharded run (``train.strategy: fsdp``) writes its model and optimizer with PyTorch's distributed
checkpoint instead, every process its own shards, in place of the two safetensors files:

    checkpoints/step-000500/
      .metadata, __0_0.distcp, __1_0.distcp, ...   model and optimizer, by parameter name and shard
      rng.safetensors, trainer.json, SHA256SUMS     as above ("format": "sharded")

Its tensors are addressed by name and global shape, not by how they were split, so it resumes with
any number of processes, and also unsharded (``train.strategy: ddp``, or a single process).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinylm.io import DataError, atomic_directory, verify_manifest, write_manifest
from tinylm.model.llama import model_state_dict, tied_head_names
from tinylm.modeldir import ModelDirError

STEP_PREFIX = "step-"
SHARDED = "sharded"  # trainer.json's "format" for checkpoints in PyTorch's distributed checkpoint layout


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:06d}"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def checkpoint_state(model, trainable_only: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: everything, or, when part of it is frozen (LoRA), only the
    trainable tensors: the frozen rest is rebuilt from the model directory the run started from."""
    if not trainable_only:
        return model_state_dict(model)
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    path = checkpoint_dir(run_dir, step)
    trainable_only = not all(p.requires_grad for p in model.parameters())
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
    meta = {
        "step": step,
        **trainer_state,
        "scheduler": scheduler.state_dict(),
        "optimizer": optimizer_meta,
        "tied_embeddings": bool(model.config.tie_word_embeddings),
        "trainable_only": trainable_only,
    }
    with atomic_directory(path) as scratch:
        save_file(checkpoint_state(model, trainable_only), scratch / "model.safetensors")
        save_file(optimizer_tensors, scratch / "optimizer.safetensors")
        save_file(_rng_state(), scratch / "rng.safetensors")
        (scratch / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        write_manifest(scratch)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _sharded_state(model, optimizer) -> dict:
    """The model's trainable tensors and the optimizer's state, keyed by parameter name: DTensor shards
    under FSDP, whole tensors otherwise (a frozen base comes from the model directory, as above)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    return {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def save_sharded_checkpoint(
    run_dir, step: int, model, optimizer, scheduler, trainer_state: dict, dist, keep: int = 2
) -> Path:
    """Every process writes its shards of checkpoint ``step`` into one scratch directory; the main
    process adds the rest and renames it into place (the run directory must be shared by all processes)."""
    import torch.distributed.checkpoint as dcp

    path = checkpoint_dir(run_dir, step)
    scratch = path.with_name(f".{path.name}.tmp")
    if dist.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    dist.barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=scratch)
    dist.barrier()
    if dist.is_main:
        meta = {
            "step": step,
            **trainer_state,
            "scheduler": scheduler.state_dict(),
            "format": SHARDED,
            "world_size": dist.world_size,
            "trainable_only": not all(p.requires_grad for p in model.parameters()),
        }
        save_file(_rng_state(), scratch / "rng.safetensors")
        (scratch / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        write_manifest(scratch)
        if path.exists():  # a checkpoint of this step from an abandoned run
            shutil.rmtree(path)
        os.replace(scratch, path)
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def is_sharded_checkpoint(path) -> bool:
    meta = json.loads((Path(path) / "trainer.json").read_text(encoding="utf-8"))
    return meta.get("format") == SHARDED


def load_sharded_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore a sharded checkpoint into ``model`` (sharded with any number of processes, or not at
    all), the optimizer, scheduler and RNG; return trainer.json's contents."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    state = _sharded_state(model, optimizer)
    try:
        # (an unsharded run of one process has no process group: it reads every shard itself)
        dcp.load(state, checkpoint_id=path, no_dist=not torch.distributed.is_initialized())
    except Exception as e:  # a missing or reshaped tensor: the model changed since the run started
        raise ModelDirError(
            f"{path}: checkpoint does not fit the model ({str(e).splitlines()[0][:300]}): resume with the config "
            "the run was started with (see config.yaml in the run)"
        ) from None
    options = StateDictOptions(ignore_frozen_params=True)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(load_file(path / "rng.safetensors"))
    return meta


def list_checkpoints(run_dir) -> list[Path]:
    """Completed checkpoints, oldest first (scratch directories of an interrupted save are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint that passes its SHA-256 check; a broken newer one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            if verify_manifest(path):
                return path
            print(f"skipping checkpoint {path.name}: it has no SHA256SUMS, so it cannot be verified", file=sys.stderr)
        except DataError as e:
            print(f"skipping checkpoint {path.name}: {e}", file=sys.stderr)
    return None


def second_names(model) -> set[str]:
    """The names of a parameter other than the first it is listed under (a tied head's weight, the token
    rows a tied head shares with the embedding): ``named_parameters`` and so checkpoints skip them."""
    seen, others = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            others.add(name)
        seen.add(id(p))
    return others


def load_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; return trainer.json's contents."""
    path = Path(path)
    meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    if meta.get("format") == SHARDED:
        return load_sharded_checkpoint(path, model, optimizer, scheduler)
    state = load_file(path / "model.safetensors")
    own = model.state_dict()
    changed = [
        f"{k} {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} now"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if changed:
        raise ModelDirError(
            f"{path}: checkpoint does not fit the model ({'; '.join(changed[:3])}): the model config changed "
            "since this run started; resume with the config it was started with (see config.yaml in the run)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = tied_head_names(model) if meta["tied_embeddings"] else set()
    allowed_missing |= second_names(model)  # a shared tensor is saved once, under its first name
    if meta.get("trainable_only"):  # a LoRA run: the frozen base came from the model directory
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        allowed_missing |= frozen | set(dict(model.named_buffers()))
    if set(missing) - allowed_missing or unexpected:
        raise ModelDirError(
            f"{path}: checkpoint does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(load_file(path / "rng.safetensors"))
    return meta


def _set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# -- the best weights so far (train.keep_best) ---------------------------------------------------

BEST_DIR = "best"  # in the run directory, beside checkpoints/: weights.safetensors + best.json


def save_best(run_dir, weights: dict[str, torch.Tensor], record: dict) -> None:
    """Keep ``weights``, the trained tensors of the best evaluated step so far (``record``: its step and
    metrics), replacing the previous best atomically."""
    with atomic_directory(Path(run_dir) / BEST_DIR) as scratch:
        save_file(weights, scratch / "weights.safetensors")
        (scratch / "best.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def load_best(run_dir, model) -> dict | None:
    """Put the best weights kept by ``save_best`` into ``model``; return their record (None if none)."""
    path = Path(run_dir) / BEST_DIR
    if not (path / "best.json").is_file():
        return None
    missing, unexpected = model.load_state_dict(load_file(path / "weights.safetensors"), strict=False)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise ModelDirError(f"{path}: the kept best weights do not fit the model (unexpected {unexpected[:5]})")
    return json.loads((path / "best.json").read_text(encoding="utf-8"))
