"""Integer weights: a linear layer in 8 or 4 bits, run by torch's low-bit matmul kernels.

Symmetric quantization keeps, for every group of ``group_size`` consecutive input columns of a row
(or for the whole row: one scale per output channel), one float scale ``s`` and the integers
``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, so that ``w ≈ q · s``. Round-to-nearest takes
``s = max|w| / (2^(b-1) - 1)`` over the group; GPTQ (``tinylm.model.gptq``) picks the integers so that
the layer's *outputs* on real inputs move as little as possible.

The tensors are stored as compressed-tensors' ``pack-quantized`` format names and lays them out (what
llm-compressor writes and vLLM and transformers load), so a module's state dict *is* the checkpoint:

    weight_packed  int32 [out, in·b/32]   each value as u = q + 2^(b-1), element k of a row in word
                                          k // (32/b) at bits b·(k mod 32/b), lowest bits first
    weight_scale   float [out, in/group]  (one column for a per-channel scale)
    weight_shape   int64 [2]              [out, in]

Running it: a decode step multiplies one token's activations by every weight, so it is bound by the
bytes read; torch's ``_weight_int8pack_mm`` (8-bit, per channel) and ``_weight_int4pack_mm`` (4-bit,
groups of 32-256) read the packed integers directly. Their layouts differ from the stored one and by
device, so each layer packs its weight for the kernel once, on first use, and checks the kernel
against the dequantized weight before trusting it. Those kernels take bf16 activations on CPU, where
their fp32 path was measured 10-25x slower; the result is cast back. The kernels serve decode steps
(one new token per sequence, up to ``KERNEL_MAX_ROWS`` sequences). A prompt is a matrix product, not a
bandwidth problem, so there (and whenever a gradient must flow, as when LoRA trains on top) the layer
dequantizes once for the call and uses an ordinary matmul, which measured faster beyond a few dozen
rows. Deciding by the kind of call rather than its row count keeps a prompt's numbers the same whether
it is prefilled alone or in a batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinylm.model.quant import DequantizedMatmul, QuantizedLinear

KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what the 4-bit kernels accept
KERNEL_MAX_ROWS = 64  # a decode step's sequences up to which the kernels beat dequantize + matmul (2 CPU cores)


@dataclass(frozen=True)
class IntScheme:
    """How a weight is quantized: ``bits`` 8 or 4, and ``group_size`` input columns per scale (None:
    one scale per output channel)."""

    bits: int
    group_size: int | None

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits: expected 8 or 4, got {self.bits}")
        if self.group_size is not None and (self.group_size < 1 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"group size: expected a power of two, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, in_features: int) -> int:
        """Scales per row; a ValueError when the group size does not divide the width."""
        size = self.group_size or in_features
        if in_features % size:
            raise ValueError(f"group size {size} does not divide the layer's width {in_features}")
        return in_features // size

    def describe(self) -> str:
        return f"int{self.bits}, " + (f"groups of {self.group_size}" if self.group_size else "per channel")


# -- the stored layout -----------------------------------------------------------------------------


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit integers [rows, cols] → int32 words [rows, ceil(cols·bits/32)], lowest bits first."""
    per_word = 32 // bits
    values = F.pad(values.long(), (0, -values.shape[-1] % per_word)).view(values.shape[0], -1, per_word)
    shifts = torch.arange(per_word, device=values.device) * bits
    words = (values << shifts).sum(-1)  # int64: the top word bit may be set
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack_int32``: unsigned integers [rows, cols] (int32)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    values = (words[..., None] >> shifts) & (2**bits - 1)  # an arithmetic shift, masked: sign bits drop out
    return values.flatten(-2)[..., :cols]


def round_to_nearest(weight: torch.Tensor, scheme: IntScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (integers q [out, in] in [qmin, qmax], scales [out, groups]) with scale = absmax/qmax."""
    rows, cols = weight.shape
    groups = weight.detach().float().view(rows, scheme.groups(cols), -1)
    scale = group_scale(groups.abs().amax(-1), scheme)
    q = (groups / scale[..., None]).round().clamp(scheme.qmin, scheme.qmax)
    return q.view(rows, cols).to(torch.int8), scale


def group_scale(absmax: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """The scale that maps a group's largest |w| onto qmax (1 for an all-zero group: any scale is exact)."""
    return torch.where(absmax > 0, absmax / scheme.qmax, torch.ones_like(absmax))


# -- the layer -------------------------------------------------------------------------------------


class IntLinear(QuantizedLinear):
    """A frozen linear layer with 8- or 4-bit integer weights (buffers named as compressed-tensors'
    pack-quantized checkpoints name them) and a float bias, if any."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, scheme: IntScheme, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.scheme = scheme
        if scale.shape != (self.out_features, scheme.groups(self.in_features)):
            raise ValueError(
                f"scale shape {tuple(scale.shape)} does not fit {tuple(q.shape)} weights, {scheme.describe()}"
            )
        self.register_buffer("weight_packed", pack_int32(q.int() - scheme.qmin, scheme.bits))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_shape", torch.tensor(q.shape, dtype=torch.int64, device=q.device))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._kernel = None  # (device, the kernel's packed tensors) once built, False where none works

    @classmethod
    def empty(cls, in_features: int, out_features: int, scheme: IntScheme, bias: bool, device=None) -> IntLinear:
        """A layer of the right shapes, to load a state dict into (``assign=True`` replaces the tensors)."""
        q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        scale = torch.ones(out_features, scheme.groups(in_features), device=device)
        return cls(q, scale, scheme, torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, scheme: IntScheme) -> IntLinear:
        return cls(*round_to_nearest(linear.weight, scheme), scheme, linear.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def integers(self) -> torch.Tensor:
        """The signed integers q [out, in] (int32)."""
        return unpack_int32(self.weight_packed, self.scheme.bits, self.in_features) + self.scheme.qmin

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.weight_scale.to(dtype).repeat_interleave(self.in_features // self.weight_scale.shape[1], dim=1)
        return self.integers().to(dtype) * scale

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight: packed integers and scales (the bias not included)."""
        return sum(t.numel() * t.element_size() for t in (self.weight_packed, self.weight_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_decode_step(x) and not (torch.is_grad_enabled() and x.requires_grad):
            kernel = self.kernel()
            if kernel is not None:
                out = kernel(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
                return out if self.bias is None else out + self.bias.to(x.dtype)
        out = DequantizedMatmul.apply(x, self)  # a prompt, or training: dequantized once for the call
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def kernel(self):
        """x [n, in] → x @ Wᵀ [n, out] by a low-bit kernel on this layer's device, or None where there is none."""
        if self._kernel is None or (self._kernel and self._kernel[0] != self.weight_packed.device):
            self._kernel = _checked(self, build_kernel(self))
        return self._kernel[1] if self._kernel else None

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), ...: the kernel's tensors are packed again on next use
        self._kernel = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.scheme.describe()}, nbytes={self.nbytes}"
        )


def is_decode_step(x: torch.Tensor) -> bool:
    """One token per sequence ([batch, 1, in], or a single row), for few enough sequences."""
    rows = x.numel() // x.shape[-1]
    return rows <= KERNEL_MAX_ROWS and (rows == 1 or (x.dim() >= 3 and x.shape[-2] == 1))


# -- kernels ---------------------------------------------------------------------------------------


def build_kernel(layer: IntLinear):
    """The low-bit kernel for ``layer`` on its device, as a function, or None where torch has none for
    its scheme and shape (then the layer dequantizes, and warns once)."""
    device, scheme = layer.weight_packed.device, layer.scheme
    if device.type not in ("cpu", "cuda"):
        return None
    u = unpack_int32(layer.weight_packed, scheme.bits, layer.in_features)  # 0 .. 2^b - 1
    act = torch.bfloat16
    if scheme.bits == 8 and scheme.group_size is None:
        weight = (u - 128).to(torch.int8).contiguous()
        scale = layer.weight_scale[:, 0].to(act).contiguous()
        return lambda x: torch._weight_int8pack_mm(x.to(act), weight, scale).to(x.dtype)
    if scheme.bits == 4 and scheme.group_size in KERNEL_GROUP_SIZES:
        if device.type == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
            mm = torch._weight_int4pack_mm_for_cpu
        else:
            packed = torch._convert_weight_to_int4pack(((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8), 8)
            mm = torch._weight_int4pack_mm
        # the kernels compute (u - 8) · scale + zero per group: symmetric weights have zero 0
        scale = layer.weight_scale.t().to(act)
        scales_and_zeros = torch.stack((scale, torch.zeros_like(scale)), dim=-1).contiguous()
        group = scheme.group_size
        return lambda x: mm(x.to(act), packed, group, scales_and_zeros).to(x.dtype)
    return None


def _checked(layer: IntLinear, kernel) -> tuple | bool:
    """Trust a kernel only if it reproduces the dequantized weight's product on a random input (to bf16's
    precision); otherwise warn once and let the layer dequantize."""
    device = layer.weight_packed.device
    problem = "torch has no kernel for this scheme and shape"
    if kernel is not None:
        x = torch.randn(4, layer.in_features, device=device, generator=torch.Generator(device).manual_seed(0))
        try:
            got, want = kernel(x).float(), F.linear(x.bfloat16().float(), layer.dequantize())
            error = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
            if math.isfinite(error) and error < 2e-2:
                return device, kernel
            problem = f"the kernel's result differs from the dequantized weight's by {error:.3g} (relative)"
        except RuntimeError as e:
            problem = f"the kernel failed: {str(e).splitlines()[0]}"
    warnings.warn(
        f"{layer.scheme.describe()} weights [{layer.out_features}, {layer.in_features}] on {device}: {problem}; "
        "this layer dequantizes its weight on every call instead (correct, but not faster than float weights)",
        stacklevel=3,
    )
    return False


# -- whole models ----------------------------------------------------------------------------------


def decoder_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers inside a CausalLM's decoder layers (attention and MLP), the ones a
    quantized checkpoint holds as integers; the embeddings and the lm_head stay float."""
    return [
        f"model.layers.{name}"
        for name, module in model.model.layers.named_modules()
        if isinstance(module, (torch.nn.Linear, IntLinear))
    ]


def replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def int_layers_for_loading(model: torch.nn.Module, names: list[str], scheme: IntScheme, device="meta") -> None:
    """Put empty IntLinear layers where ``names`` are, ready for a state dict."""
    for name in names:
        linear = model.get_submodule(name)
        empty = IntLinear.empty(linear.in_features, linear.out_features, scheme, linear.bias is not None, device)
        replace_module(model, name, empty)
