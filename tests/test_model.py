"""The decoder against transformers: same tensor names, same logits, both directions."""

import pytest
import torch

from tinylm.model.llama import CausalLM, KVCache, ModelConfig, attention_mask
from tinylm.modeldir import load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers", reason="interop tests compare against transformers")

CONFIGS = {
    "llama-gqa-tied": dict(num_key_value_heads=2),
    "llama-mha-untied-bias": dict(
        num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, attention_out_bias=True, mlp_bias=True
    ),
    "llama-mqa-theta": dict(num_key_value_heads=1, rope_theta=1e6, head_dim=24),
    "llama3-rope-scaling": dict(
        num_key_value_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2": dict(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False),
    "qwen3": dict(num_key_value_heads=2, qk_norm=True),
}


def make_model(seed=0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    shape = dict(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, rope_theta=1e4)
    config = ModelConfig(**{**shape, **overrides})
    model = CausalLM(config).eval()
    with torch.no_grad():  # move norms and biases off their init so a mix-up would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_both_ways(name, tmp_path):
    model = make_model(**CONFIGS[name])
    expected_type = "qwen3" if name == "qwen3" else "qwen2" if name == "qwen2" else "llama"
    assert model.config.model_type == expected_type
    ids = torch.randint(0, 211, (2, 29), generator=torch.Generator().manual_seed(1))

    save_model_dir(model, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(hf).__name__.lower().startswith(expected_type)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    hf.save_pretrained(tmp_path / "theirs")
    loaded, _ = load_model_dir(tmp_path / "theirs")
    with torch.no_grad():
        assert (loaded(ids) - theirs).abs().max().item() < 1e-4


def test_kv_cache_matches_full_forward():
    model = make_model(num_key_value_heads=2)
    ids = torch.randint(0, 211, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=32)
        pieces = [model(ids[:, :7], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(7, 12)]
        pieces.append(model(ids[:, 12:], cache=cache))
    assert cache.length == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_kv_cache_rows_of_their_own_lengths_decode_as_alone():
    """The server's use of the cache: rows filled to different lengths take one token each, at their
    own positions, and get exactly the logits each row gets alone."""
    model = make_model(num_key_value_heads=2)
    prompts = [torch.randint(0, 211, (1, n)) for n in (5, 9, 3)]
    nexts = torch.randint(0, 211, (3, 1))
    shared = KVCache(model.config, batch_size=4, max_len=70)
    alone = []
    with torch.no_grad():
        for row, (prompt, token) in enumerate(zip(prompts, nexts)):
            own = KVCache(model.config, batch_size=1, max_len=16)
            model(prompt, cache=own)
            shared.fill(row, own.k[:, 0, :, : own.length], own.v[:, 0, :, : own.length])
            alone.append(model(token[None], cache=own)[0, -1])
        positions, mask = shared.begin_step(3)
        together = model(nexts, position_ids=positions, mask=mask, cache=shared)[:, -1]
    assert shared.lengths[:3] == [6, 10, 4] and mask.shape[-1] == KVCache.BUCKET
    assert torch.allclose(together, torch.stack(alone), atol=1e-5)


def test_left_padding_mask_gives_the_unpadded_result():
    model = make_model(num_key_value_heads=2)
    ids = torch.randint(0, 211, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    padding = torch.tensor([[0] * 4 + [1] * 9])
    positions = (padding.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(ids)
        masked = model(padded, position_ids=positions, mask=attention_mask(padding, 13, 13))
    assert torch.isfinite(masked).all()
    assert torch.allclose(masked[:, 4:], plain, atol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    model = make_model()
    cache = KVCache(model.config, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of"),
    ],
)
def test_bad_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unsupported_hf_config_is_refused():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"})
