"""Sharded data parallelism (``train.strategy: fsdp``): PyTorch's FSDP2 (``fully_shard``).

Under DDP every process holds the whole model, its gradients and the optimizer's moments. FSDP splits
each of them across the processes: every transformer block (a decoder layer, a vision-tower layer) is
one unit whose parameters are gathered just before its forward and its backward and freed after, and
whose gradients are reduce-scattered, so a process keeps 1/N of the model state between uses. The
root unit (embeddings, final norm, head, projector) is gathered around the whole forward.

    shard(model, cfg, dist)        the model, sharded in place: parameters become DTensors
    full_weights(model)            a block in which every process holds all of the weights (generation,
                                   evaluation by text): no collective runs inside it
    gather_weights(model)          the full weights, on the main process's CPU, for saving
    gradient_sync(model, on)       accumulate locally (off) or reduce-scatter (on) on the next backward

The model's names, its state dict's keys and the saved directory stay exactly those of an unsharded
run: ``gather_weights`` gives the same dict ``model.state_dict()`` gives without FSDP.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from tinylm.config import ConfigError, TrainConfig
from tinylm.device import autocast_dtype
from tinylm.model.llama import DecoderLayer
from tinylm.model.quant import QuantizedLinear
from tinylm.model.vision import VisionLayer

BLOCKS = (DecoderLayer, VisionLayer)  # the units FSDP gathers and frees one at a time


def fsdp_api():
    """torch's FSDP2 entry points (torch >= 2.6 exports them from torch.distributed.fsdp)."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise ConfigError(
            f"train.strategy fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is torch "
            f"{torch.__version__}: upgrade torch or use train.strategy ddp"
        ) from None
    return fully_shard, FSDPModule, MixedPrecisionPolicy, CPUOffloadPolicy


def check_shardable(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """What FSDP cannot shard here, said before anything starts."""
    if cfg.optimizer == "muon":
        raise ConfigError(
            "train.optimizer muon orthogonalises whole weight matrices and train.strategy fsdp splits them across "
            "processes: use train.optimizer adamw with fsdp, or train.strategy ddp with muon"
        )
    if cfg.cpu_offload and device.type != "cuda":
        raise ConfigError(
            f"train.cpu_offload keeps a GPU run's shards in CPU memory between uses; this run is on {device.type}, "
            "where they are in CPU memory already: leave cpu_offload off"
        )
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ConfigError(
            "the model holds quantized (QLoRA NF4 or integer) weights, which FSDP cannot split: train a LoRA "
            "adapter without --qlora under train.strategy fsdp, or use train.strategy ddp"
        )


def shard(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Shard ``model`` in place across the process group (a group of one is started when there is none,
    for ``train.cpu_offload`` on a single device) and move its shards to ``device``."""
    fully_shard, _, MixedPrecisionPolicy, CPUOffloadPolicy = fsdp_api()
    check_shardable(model, cfg, device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    amp = autocast_dtype(cfg.precision, device)
    options = {
        "mesh": mesh,
        # parameters are gathered in the training precision; gradients are reduced in fp32
        "mp_policy": MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32 if amp else None),
    }
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for module in model.modules():
        if isinstance(module, BLOCKS):
            fully_shard(module, **options)
    fully_shard(model, **options)  # (it moves the shards to the mesh's device, or keeps them on the CPU)
    # FSDP takes the first unit to run forward for the root; the first call may be a generation that
    # runs the layers alone (GRPO's rollouts), so settle the root now
    model._get_fsdp_state()._lazy_init()
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, fsdp_api()[1]) if dist.is_available() else False


def fsdp_units(model: nn.Module) -> list:
    FSDPModule = fsdp_api()[1]
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Every process gathers all of ``model``'s weights for the block and frees them after it. Inside,
    the model runs like an unsharded one, with no collective: processes may generate different
    numbers of tokens, and the main process alone may run benchmarks. A no-op for unsharded models."""
    if not is_sharded(model):
        yield model
        return
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def gradient_sync(model: nn.Module, on: bool) -> None:
    """Gradient accumulation under FSDP: with ``on`` False the next backward keeps its gradients local
    (unsharded) instead of reduce-scattering them; the last micro-batch of a step turns it back on."""
    if is_sharded(model):
        model.set_requires_gradient_sync(on)


def state_dict_options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full: whole tensors, gathered onto the main process's CPU (the others get nothing)
    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def gather_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on the main process's CPU (every process must call this; the others
    get {}): the same keys and values ``model.state_dict()`` gives for the unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=state_dict_options(full=True))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters hold no memory (on the meta device), kept before sharding to
    gather the trained weights into (``materialize``); buffers are copied to the CPU as they are
    (rotary frequencies are not in the state dict). Tied weights stay tied: one parameter, one copy."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


def materialize(skeleton: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """``skeleton`` (from ``meta_copy``) holding ``weights`` (``gather_weights``, on the CPU) as its
    parameters; a parameter shared by two modules (tied embeddings) is shared again afterwards."""
    shared: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    skeleton.load_state_dict(weights, strict=False, assign=True)
    for first, *others in shared.values():
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(skeleton.get_submodule(owner), attribute, skeleton.get_parameter(first))
    empty = [name for name, p in skeleton.named_parameters() if p.is_meta]
    if empty:
        raise RuntimeError(f"the gathered weights lack {empty[:5]}")
    return skeleton
