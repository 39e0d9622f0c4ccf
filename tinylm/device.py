"""Picking the device and the training precision."""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

import torch

# CPU flags that mean bf16 arithmetic in hardware: x86's AVX-512 BF16 and AMX, Arm's BF16 extension.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware, from the flags in /proc/cpuinfo (False where
    there is no such file). Without it, bf16 is emulated and a bf16 matmul was measured 9x slower than
    fp32 (an AVX2-only machine), a whole training step 29x."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto" picks cuda, then mps, then cpu; naming an absent device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda (or cuda:N) or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for, but torch sees no CUDA GPU (is a CUDA build of torch installed?)"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} was asked for, but MPS is not available on this machine")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast to, or None for plain fp32.

    "auto" uses bf16 on GPUs that support it and fp32 on CPUs. Even a CPU with bf16 in hardware (AVX-512
    BF16) trained the cpu-tiny model slower under bf16 autocast than in fp32 (1.3x to 3.7x, measured on
    2 cores, though a 1024x1024 bf16 matmul alone was 2.5x faster there): at these sizes the casts cost
    more than the matmuls save. Asking for bf16 on a CPU without it in hardware warns.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision bf16 was asked for, but this GPU does not support bfloat16")
        if device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                f"train.precision=bf16 on a CPU without bf16 in hardware ({platform.machine()}, no "
                "avx512_bf16 / amx_bf16 / bf16 flag): bf16 is emulated there, and training can be 10-30x slower "
                "than fp32; train.precision=auto (fp32 on CPUs) is faster",
                stacklevel=2,
            )
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision {precision!r}: expected auto, fp32 or bf16")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None
