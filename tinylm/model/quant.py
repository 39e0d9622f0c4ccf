"""NF4: store a frozen linear layer's weights in 4 bits, as QLoRA does (Dettmers et al., 2023).

Trained weights look roughly normally distributed, so QLoRA spends its 16 four-bit codes on a
*NormalFloat* code book: levels at quantiles of N(0, 1), scaled to [-1, 1], with an exact 0
(8 levels on the positive side, 7 on the negative side). Each code then covers about as many
weights as any other, which wastes fewer codes on empty tails than evenly spaced levels would.

Quantizing a weight matrix:

* flatten it and cut it into blocks of 64 values (the last block is padded with zeros),
* per block, keep ``absmax`` = the largest |value| (fp32) and divide the block by it: now in [-1, 1],
* replace every value by the index of the nearest NF4 level (4 bits) and pack two indices per byte.

Dequantizing is ``level[code] · absmax``. Per 64 weights that is 64·4 bits of codes plus one fp32
absmax: 4 + 32/64 = 4.5 bits per weight, against 32 for fp32 or 16 for bf16.

*Double quantization* shrinks the absmax values as well: subtract their mean, cut them into groups of
256, and store each as an int8 with one fp32 scale per group. The constants then cost
8/64 + 32/(64·256) ≈ 0.127 bits per weight instead of 0.5, so about 4.13 bits per weight in all.

``NF4Linear`` keeps these packed tensors as buffers and rebuilds the float weight on the fly, both in
forward and (again) in backward, so no full-precision copy of it lives between the two. The weight
gets no gradient: in QLoRA it is frozen and only LoRA adapters beside it train.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ABSMAX_GROUP = 256  # double quantization: absmax values per int8 group


@functools.cache
def nf4_code_book(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1] with an exact 0 (fp32). Do not modify: it is cached.

    As in the paper: the quantiles of N(0, 1) at probabilities from ``offset`` down to 1/2, 8 of them
    for the positive half and 7 for the negative half, joined with 0 and divided by the largest. The
    offset (between 1 - 1/(2·15) and 1 - 1/(2·16)) keeps the outermost levels finite."""
    offset = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float().to(device)


def nearest_code(x: torch.Tensor) -> torch.Tensor:
    """Index (uint8, 0..15) of the NF4 level nearest to each value of ``x`` (values in [-1, 1])."""
    levels = nf4_code_book(x.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # level i wins between midpoints i-1 and i
    return torch.bucketize(x, midpoints).to(torch.uint8)


@dataclass
class NF4Weight:
    """A weight tensor in NF4: ``codes`` packs two 4-bit level indices per byte (high nibble first).

    ``absmax`` holds one fp32 scale per block; with double quantization it is int8 instead, and each
    scale is ``absmax[i] · absmax_scale[i // 256] + absmax_mean``."""

    codes: torch.Tensor  # uint8 [ceil(numel / block_size) · block_size / 2]
    absmax: torch.Tensor  # fp32 [blocks], or int8 [blocks] when double quantized
    shape: tuple[int, ...]
    block_size: int = 64
    absmax_scale: torch.Tensor | None = None  # fp32 [ceil(blocks / 256)]
    absmax_mean: torch.Tensor | None = None  # fp32 [1]

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes and block scales (and their own constants)."""
        tensors = (self.codes, self.absmax, self.absmax_scale, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 scale of every block (undoing double quantization if needed)."""
        if not self.double_quant:
            return self.absmax.float()
        scales = self.absmax_scale.float().repeat_interleave(ABSMAX_GROUP)[: self.absmax.numel()]
        return (self.absmax.float() * scales + self.absmax_mean.float()).clamp(min=0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight, in its original shape: level[code] · absmax of the code's block."""
        codes = torch.stack((self.codes >> 4, self.codes & 0x0F), dim=-1).flatten()
        values = nf4_code_book(codes.device)[codes.int()].view(
            -1, self.block_size
        )  # int32 indices: a quarter of int64's
        values = values * self.block_absmax()[:, None]
        return values.flatten()[: math.prod(self.shape)].view(self.shape).to(dtype)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: fp32 block scales → (int8 codes, fp32 scale per 256 codes, fp32 mean)."""
    mean = absmax.mean().reshape(1)
    centered = absmax - mean
    groups = F.pad(centered, (0, -centered.numel() % ABSMAX_GROUP)).view(-1, ABSMAX_GROUP)
    scale = groups.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-equal group: any scale works
    codes = torch.round(centered / scale.repeat_interleave(ABSMAX_GROUP)[: centered.numel()])
    return codes.clamp(-127, 127).to(torch.int8), scale, mean


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize ``weight`` (any shape, float) to NF4 in blocks of ``block_size`` values."""
    if block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block_size must be an even number >= 2 (two codes share a byte), got {block_size}")
    if not weight.is_floating_point():
        raise ValueError(f"NF4 quantizes float weights, got dtype {weight.dtype}")
    flat = weight.detach().float().flatten()
    if not torch.isfinite(flat).all():
        raise ValueError("NF4: the weight holds inf or NaN values; they cannot be scaled into [-1, 1]")
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    codes = nearest_code(blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]).flatten()
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(weight.shape), block_size)
    absmax_codes, absmax_scale, absmax_mean = quantize_absmax(absmax)
    return NF4Weight(packed, absmax_codes, tuple(weight.shape), block_size, absmax_scale, absmax_mean)


class DequantizedMatmul(torch.autograd.Function):
    """x @ Wᵀ with W kept packed (NF4, or a layer's integers): dequantized in forward, and again in
    backward for the input's gradient. Only the packed weight is kept for backward, never the float one;
    W itself gets no gradient. ``weight`` is anything with ``dequantize(dtype)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output @ ctx.weight.dequantize(grad_output.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored in fewer bits: the common ground of NF4 (QLoRA's
    training base) and grouped integers (``tinylm quantize``). Both give ``in_features``,
    ``out_features``, a frozen ``bias`` (or None), ``forward`` and ``dequantize``; LoRA wraps either."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the layer computes in (LoRA's matrices beside it take the same)."""
        return torch.float32


class NF4Linear(QuantizedLinear):
    """A frozen linear layer whose weight is stored in NF4 (buffers ``weight_codes``, ``weight_absmax``
    and, when double quantized, ``weight_absmax_scale`` and ``weight_absmax_mean``). The bias, if any,
    stays in full precision, frozen. ``compute_dtype``: the dtype of the matmul (default: the input's)."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-d weight [out, in], got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.block_size, self.double_quant, self.compute_dtype = weight.block_size, weight.double_quant, compute_dtype
        self.register_buffer("weight_codes", weight.codes)
        self.register_buffer("weight_absmax", weight.absmax)
        if weight.double_quant:
            self.register_buffer("weight_absmax_scale", weight.absmax_scale)
            self.register_buffer("weight_absmax_mean", weight.absmax_mean)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        return cls(quantize_nf4(linear.weight, block_size, double_quant), linear.bias, compute_dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or torch.float32

    def packed_weight(self) -> NF4Weight:
        """The NF4Weight made of this module's buffers (no copy)."""
        extra = (self.weight_absmax_scale, self.weight_absmax_mean) if self.double_quant else ()
        return NF4Weight(
            self.weight_codes, self.weight_absmax, (self.out_features, self.in_features), self.block_size, *extra
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (the bias not included)."""
        return self.packed_weight().nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        out = DequantizedMatmul.apply(x.to(dtype), self.packed_weight())
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={self.double_quant}, nbytes={self.nbytes}"
        )


def quantize_linear_layers(
    model: nn.Module, target_modules: list[str], block_size: int = 64, double_quant: bool = False
) -> list[str]:
    """Replace, in place, every nn.Linear whose name ends with one of ``target_modules`` (e.g. q_proj,
    down_proj) by an NF4Linear; the float weights are dropped. Returns the replaced layers' names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.split(".")[-1] not in target_modules:
            continue
        if type(module) is not nn.Linear:
            raise ValueError(
                f"{name} is a {type(module).__name__}, not a plain nn.Linear; quantize before wrapping it (e.g. before "
                "add_lora)"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, NF4Linear.from_linear(module, block_size, double_quant))
        replaced.append(name)
    if not replaced:
        raise ValueError(
            f"no linear layer is named like {list(target_modules)}; the model has "
            f"{sorted({n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})}"
        )
    return replaced


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds its weight in fewer bits."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())
