"""A Llama-architecture decoder, in one file, with Hugging Face tensor names.

    tokens ─► embed_tokens ─► [ RMSNorm ─► attention (RoPE, GQA) ─► + ─► RMSNorm ─► SwiGLU MLP ─► + ] × L
                                                                                      ─► RMSNorm ─► lm_head ─► logits

The module tree mirrors transformers' ``LlamaForCausalLM`` (``model.layers.3.self_attn.q_proj.weight``,
``lm_head.weight``, ...), so a state dict moves between the two with no renaming. Three switches cover
the Qwen family without a second model file:

* ``attention_bias`` + ``attention_out_bias`` — biases on q/k/v and on o (Qwen2: q/k/v only),
* ``qk_norm`` — an RMSNorm over each head of q and k before RoPE (Qwen3).

``config.model_type`` is derived from them and decides which transformers class loads the directory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinylm.model.loss import IGNORE, linear_cross_entropy


@dataclass
class ModelConfig:
    """Model shape. Field names are those of transformers' config.json so conversion is a rename-free copy."""

    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int | None = None  # None: SwiGLU's usual 8/3·hidden, rounded up to a multiple of 64
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 1e6
    rope_scaling: dict | None = None  # None, or {"rope_type": "linear"|"llama3", ...} as in transformers
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q, k, v projections
    attention_out_bias: bool = False  # bias on the o projection
    mlp_bias: bool = False
    qk_norm: bool = False
    initializer_range: float = 0.02
    attention_dropout: float = 0.0  # training only: of the attention weights (transformers' key)
    hidden_dropout: float = 0.0  # training only: of the embeddings and of each block's output to the residual
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # keys of a foreign config.json we carry but do not use

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {getattr(self, name)}")

    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (config.json allows one id, a list, or none)."""
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, list) else [] if eos is None else [eos]

    @property
    def model_type(self) -> str:
        """Which transformers architecture these switches describe."""
        if self.qk_norm:
            if self.attention_bias != self.attention_out_bias or self.mlp_bias:
                raise ValueError("qk_norm (Qwen3) needs attention_bias == attention_out_bias and no mlp_bias")
            return "qwen3"
        if self.attention_bias and not self.attention_out_bias:
            if self.mlp_bias:
                raise ValueError("q/k/v-only attention bias (Qwen2) cannot be combined with mlp_bias")
            return "qwen2"
        if self.attention_bias != self.attention_out_bias:
            raise ValueError("an o-projection bias without q/k/v biases matches no supported architecture")
        return "llama"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in CausalLM(self, device="meta").parameters())

    # -- transformers config.json ---------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        """The config.json that transformers' Auto classes load (no trust_remote_code)."""
        model_type = self.model_type
        architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        hf = {k: v for k, v in asdict(self).items() if k not in ("extra", "attention_out_bias", "qk_norm")}
        hf.update(self.extra)
        hf["architectures"] = [architecture[model_type]]
        hf["model_type"] = model_type
        hf["hidden_act"] = "silu"
        # rope: the flat keys older readers (vLLM, llama.cpp, transformers 4) use, and the nested one of transformers 5
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        hf["rope_parameters"] = rope
        if model_type == "qwen2":
            del hf["attention_bias"], hf["mlp_bias"]
        if model_type == "qwen3":
            del hf["mlp_bias"]
        if model_type != "llama":
            hf.setdefault("use_sliding_window", False)
        return hf

    @classmethod
    def from_hf_dict(cls, hf: dict) -> ModelConfig:
        """Read a transformers config.json of a Llama, Qwen2 or Qwen3 model."""
        model_type = hf.get("model_type")
        if model_type not in ("llama", "qwen2", "qwen3"):
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported (expected llama, qwen2 or qwen3)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (expected silu)")
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in known and k not in ("extra", "attention_out_bias", "qk_norm")}
        kwargs.update(rope_theta=rope_theta, rope_scaling=scaling)
        if model_type == "llama":
            kwargs["attention_out_bias"] = hf.get("attention_bias", False)
        elif model_type == "qwen2":
            kwargs.update(attention_bias=True, attention_out_bias=False, mlp_bias=False)
        else:
            kwargs.update(attention_out_bias=hf.get("attention_bias", False), qk_norm=True, mlp_bias=False)
        kwargs.setdefault("tie_word_embeddings", False)  # transformers' default when the key is absent
        ignored = {"architectures", "model_type", "hidden_act", "rope_parameters", "transformers_version"}
        kwargs["extra"] = {k: v for k, v in hf.items() if k not in known and k not in ignored}
        return cls(**kwargs)


# -- building blocks ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ^(-2i/d) for i < d/2, optionally rescaled for longer contexts."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # keep high frequencies, stretch low ones, blend in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        stretched = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_context / low) & (wavelen >= old_context / high)
        return torch.where(is_mid, blended, stretched)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (expected default, linear or llama3)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (-x2, x1) over the two halves of the last dimension: the transformers RoPE convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values of every layer, [layers, rows, kv_heads, max_len, head_dim], that the
    model appends each step's keys and values to (``update`` per layer, then ``advance``).

    Rows are filled alike (``length`` positions each: a batch of left-padded prompts decoded together)
    or, once ``begin_step`` is used, each to its own length (``lengths``): the server keeps one row per
    request, joining and leaving at different ages. A step after ``begin_step(active)`` adds one token to
    each of rows 0..active-1 at that row's own position, and attention reads the cache up to the longest
    row, rounded up to a whole ``BUCKET`` (the rest masked), so a GPU sees a few shapes, not one per step.

    This one keeps keys and values in the model's dtype; ``Int8KVCache`` keeps them in about half the bytes.
    """

    BUCKET = 64

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        positions = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len)
        self.k = self.allocate(positions, config.head_dim, device, dtype)
        self.v = self.allocate(positions, config.head_dim, device, dtype)
        self.dtype = dtype  # what attention reads the keys and values in
        self.max_len = max_len
        self.length = 0  # the filled positions of every row, while rows are filled alike
        self.lengths = [0] * batch_size  # each row's own, once rows are used one by one (fill, move, begin_step)
        self._step = None  # (positions, rows, active, end) of a step begun with begin_step

    @staticmethod
    def allocate(positions: tuple[int, ...], head_dim: int, device, dtype) -> torch.Tensor:
        """Zeros for every position's vector, as this kind of cache stores it."""
        return torch.zeros(*positions, head_dim, device=device, dtype=dtype)

    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._step is not None:  # one token per row, each at its own position
            positions, rows, active, end = self._step
            self.k[layer, rows, :, positions] = k[:, :, 0]
            self.v[layer, rows, :, positions] = v[:, :, 0]
            return self.k[layer, :active, :, :end], self.v[layer, :active, :, :end]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        if self._step is not None:
            active = self._step[2]
            self.lengths[:active] = [n + t for n in self.lengths[:active]]
            self._step = None
        else:
            self.length += t

    # -- rows of their own (the server's slots) -------------------------------------------------

    def fill(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put a prefilled prompt's keys and values [layers, kv_heads, length, head_dim] in ``row``, as
        a cache of this kind stores them (a slice of another one's ``k`` and ``v``)."""
        length = k.shape[2]
        self.k[:, row, :, :length] = k
        self.v[:, row, :, :length] = v
        self.lengths[row] = length

    def take_rows(self, source: KVCache, rows: torch.Tensor) -> None:
        """Fill this cache from ``source`` (a cache of the same kind, rows filled alike): row i gets
        source row ``rows[i]`` (rows may repeat), up to the filled length. Choices that share a prompt,
        and answers sampled for one prompt, start this way from one prefill."""
        length = source.length
        self.k[:, :, :, :length] = source.k[:, rows, :, :length]
        self.v[:, :, :, :length] = source.v[:, rows, :, :length]
        self.length = length

    def move(self, source: int, target: int) -> None:
        """Copy one row's filled positions into another (a leaving row's place gets the last row)."""
        length = self.lengths[source]
        self.k[:, target, :, :length] = self.k[:, source, :, :length]
        self.v[:, target, :, :length] = self.v[:, source, :, :length]
        self.lengths[target] = length

    def begin_step(self, active: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a one-token step over rows 0..active-1, each at its own length: their positions
        [active, 1] and the attention mask [active, 1, 1, end] (each row sees its filled positions and
        the new one)."""
        longest = max(self.lengths[:active]) + 1
        end = min(-(-longest // self.BUCKET) * self.BUCKET, self.max_len)
        positions = torch.tensor(self.lengths[:active], device=self.k.device)
        self._step = (positions, torch.arange(active, device=self.k.device), active, end)
        mask = torch.arange(end, device=self.k.device)[None, :] <= positions[:, None]
        return positions[:, None], mask[:, None, None, :]


class Int8KVCache(KVCache):
    """A KVCache that keeps each key and value vector as head_dim int8 numbers and their scale.

    The scale is one fp16 number per layer, row, kv head and position: max |x| / 127 over the vector
    (symmetric, so 0 stays 0), and its two bytes are stored right after the vector's int8 numbers. A
    position then costs head_dim + 2 bytes instead of 2 · head_dim in bf16 — (head_dim + 2) / (2 · head_dim)
    of the memory, 52% at head_dim 64 — so about twice the sequences fit. Vectors are quantized as the
    model writes them, and a layer's filled span is dequantized to the model's dtype as attention reads
    it (a temporary of one layer's size). Because each scale travels with its vector, rows copy as they
    are (``fill``, ``move``: the server's slots), never quantized twice, and ``bytes`` counts the scales.
    """

    @staticmethod
    def allocate(positions: tuple[int, ...], head_dim: int, device, dtype) -> torch.Tensor:
        return torch.zeros(*positions, head_dim + SCALE_BYTES, device=device, dtype=torch.int8)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().update(layer, quantize_vectors(k), quantize_vectors(v))
        return dequantize_vectors(k, self.dtype), dequantize_vectors(v, self.dtype)


SCALE_BYTES = 2  # an fp16 scale after each int8 vector
KV_CACHES = {"auto": KVCache, "int8": Int8KVCache}  # --kv-cache: the model's dtype, or int8


def quantize_vectors(x: torch.Tensor) -> torch.Tensor:
    """[..., n] floats → [..., n + 2] int8: round(x / scale), then the fp16 scale's two bytes, where
    scale = max |x| / 127 over the last dimension. Dividing by the stored (rounded) scale keeps every
    number within scale / 2 of x."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).half()
    tiny = torch.finfo(torch.float16).tiny  # an all-zero vector: 0 / tiny = 0
    values = (x.float() / scale.float().clamp(min=tiny)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([values, scale.view(torch.int8)], dim=-1)


def dequantize_vectors(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of ``quantize_vectors``, in ``dtype``: [..., n + 2] int8 → [..., n]."""
    values, scale = packed[..., :-SCALE_BYTES], packed[..., -SCALE_BYTES:].view(torch.float16)
    return values.to(dtype).mul_(scale.to(dtype))  # in place: one temporary of the span's size, not two


def attention_mask(padding: torch.Tensor | None, query_len: int, key_len: int) -> torch.Tensor:
    """Boolean mask [B or 1, 1, query_len, key_len]: True where a query may attend.

    Queries are the last ``query_len`` of ``key_len`` positions, and each sees itself and the past.
    ``padding`` [B, key_len] marks real tokens with 1; every query still sees itself, so a row of
    padding never becomes all-masked (which would turn the softmax into NaNs).
    """
    device = padding.device if padding is not None else None
    offset = key_len - query_len
    causal = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(diagonal=offset)
    mask = causal[None, None]
    if padding is not None:
        diagonal = torch.zeros_like(causal)
        diagonal[torch.arange(query_len), torch.arange(query_len) + offset] = True
        mask = (mask & padding.bool()[:, None, None, :]) | diagonal
    return mask


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, T, T] for rows that pack several sequences: a query attends to earlier
    positions of its own segment only. ``segments`` [B, T] gives each token's sequence number."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden, qkv_bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=qkv_bias, device=device)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=qkv_bias, device=device)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=qkv_bias, device=device)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=config.attention_out_bias, device=device)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device=device)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device=device)
        self.qk_norm = config.qk_norm
        self.dropout = config.attention_dropout

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [b, heads, t, head_dim]
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # with no explicit mask: causal when the queries are the whole sequence, all-visible for one new token
        causal = mask is None and t > 1
        if causal and k.shape[2] != t:
            mask, causal = attention_mask(None, t, k.shape[2]).to(x.device), False
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias, device=device)
        self.up_proj = nn.Linear(hidden, inner, bias=bias, device=device)
        self.down_proj = nn.Linear(inner, hidden, bias=bias, device=device)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.self_attn = Attention(config, layer, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.mlp = MLP(config, device=device)
        self.dropout = config.hidden_dropout

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache), self.dropout, self.training)
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout while training with p > 0; otherwise x itself (no copy, no kernel)."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


class Decoder(nn.Module):
    """Embedding, the stack of layers and the final norm: ``model.*`` in the state dict."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device=device) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)


class DecoderModel(nn.Module):
    """The decoder (``model.*``: embeddings, layers, final norm) and its rotary frequencies: what every
    model on this decoder shares. A head on top makes it a model: ``CausalLM``'s lm_head predicts the
    next token, ``tinylm.model.reward.RewardModel``'s score rates a whole sequence.

    With ``activation_checkpointing`` set, training keeps each layer's input only and runs the layer
    again in the backward pass (dropout draws the same masks): the same gradients for less memory."""

    activation_checkpointing = False

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        self.model = Decoder(config, device=device)
        # inv_freq is derived from the config, not learned or saved
        self.register_buffer("inv_freq", rope_frequencies(config).to(device), persistent=False)

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases, unit norms; residual outputs scaled by 1/√(2·layers)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = (
                    1 / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(("o_proj", "down_proj")) else 1.0
                )
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.inv_freq = rope_frequencies(self.config).to(self.model.embed_tokens.weight.device)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B or 1, 1, T, head_dim] for the given positions, computed in float32."""
        angles = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, hidden].

        ``mask``: None for plain causal attention, else a boolean [B|1, 1, T, past+T] (see attention_mask).
        ``cache``: a KVCache to read the past from and append this step to.
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = dropout(x, self.config.hidden_dropout, self.training)
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + x.shape[1], device=x.device)[None]
        cos, sin = self.rope(position_ids, x.dtype)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # keep only the layer's input; its activations are recomputed in the backward pass
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.model.norm(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class CausalLM(DecoderModel):
    """The whole language model: token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__(config, device=device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if device != "meta":
            self.reset_parameters()

    def forward(
        self,
        input_ids=None,
        labels: torch.Tensor | None = None,
        per_token: bool = False,
        logits_at: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]; or, given ``labels`` [B, T] (the token each position should predict,
        -100 for none), the SUMMED cross-entropy over labelled positions, computed block by block
        without the full logits tensor (see tinylm.model.loss); or, with ``per_token=True``, the
        log-probability of each label [B, T] (0 where there is none), from logits of the labelled
        positions only (DPO scores whole answers this way). ``logits_at`` (a boolean [B, T]) returns the
        logits of those positions only, [N, vocab] (distillation compares them with a teacher's).
        Keyword arguments as in ``hidden_states``."""
        hidden = self.hidden_states(input_ids, **kwargs)
        if logits_at is not None:
            return self.lm_head(hidden[logits_at])
        if labels is None:
            return self.lm_head(hidden)
        if per_token:
            labelled = labels != IGNORE
            logits = self.lm_head(hidden[labelled]).float()
            picked = logits.log_softmax(-1).gather(-1, labels[labelled][:, None]).squeeze(-1)
            return torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(labelled, picked)
        return linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten())


def tied_head_names(model: nn.Module) -> set[str]:
    """The lm_head weights that are the embeddings themselves (a language model's, or one inside a
    vision-language model), which are saved once, as the embeddings."""
    if not model.config.tie_word_embeddings:
        return set()
    return {
        name
        for name, _ in model.named_parameters(remove_duplicate=False)
        if name.split(".")[-2:] == ["lm_head", "weight"]
    }


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: contiguous, on CPU, with a tied lm_head left out (transformers re-ties it)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name in tied_head_names(model):
        state.pop(name, None)
    return state
