"""NF4 quantization: the code book, round trips, double quantization, NF4Linear and whole models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.model.quant import (
    DequantizedMatmul,
    NF4Linear,
    NF4Weight,
    nf4_code_book,
    quantize_linear_layers,
    quantize_nf4,
)

PUBLISHED_NF4 = [
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[3, 17, 42, 8, 61, 5, 33, 12], [1, 2, 3, 4, 5, 6, 7, 8]])


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def make_model(seed=0) -> CausalLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return CausalLM(config).eval()


def test_code_book_matches_the_paper():
    levels = nf4_code_book()
    assert levels.shape == (16,) and levels.dtype == torch.float32
    assert torch.allclose(levels, torch.tensor(PUBLISHED_NF4), atol=1e-4)
    assert levels[7] == 0 and levels[0] == -1 and levels[-1] == 1


@pytest.mark.parametrize("double_quant", [False, True])
def test_gaussian_round_trip_error_is_small(double_quant):
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    q = quantize_nf4(w, double_quant=double_quant)
    back = q.dequantize()
    assert back.shape == w.shape and back.dtype == torch.float32
    assert relative_rms(back, w) < 0.12
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == w.numel() // 2


def test_values_on_the_grid_come_back_exactly():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (10, 64), generator=g)
    codes[:, 0] = 15  # every block holds +absmax, so its absmax is the chosen scale
    absmax = torch.rand(10, 1, generator=g) + 0.1
    w = (nf4_code_book()[codes] * absmax).view(20, 32)
    assert torch.equal(quantize_nf4(w).dequantize(), w)


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 11), (1,), (65,)])
def test_odd_sizes_round_trip_to_their_shape(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    q = quantize_nf4(w, block_size=64)
    assert q.dequantize().shape == w.shape
    assert relative_rms(q.dequantize(), w) < 0.15


def test_all_zero_blocks_and_bad_input():
    w = torch.zeros(4, 64)
    w[0, 0] = 1.0
    assert torch.equal(quantize_nf4(w).dequantize(), w)
    assert torch.equal(quantize_nf4(w, double_quant=True).dequantize()[1:], w[1:])
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(w, block_size=63)
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))


def test_double_quant_is_almost_as_good_and_smaller():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)) * 0.02  # 2048 blocks: 8 absmax groups
    single, double = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert double.absmax.dtype == torch.int8 and double.absmax_scale.numel() == 8
    assert relative_rms(double.dequantize(), single.dequantize()) < 0.01
    assert relative_rms(double.dequantize(), w) < relative_rms(single.dequantize(), w) + 0.005
    assert double.nbytes < single.nbytes
    assert single.nbytes == w.numel() // 2 + 4 * w.numel() // 64  # 4.5 bits per weight


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_matches_f_linear_in_forward_and_backward(double_quant):
    torch.manual_seed(4)
    linear = nn.Linear(40, 24)
    layer = NF4Linear.from_linear(linear, block_size=32, double_quant=double_quant)
    assert (layer.in_features, layer.out_features) == (40, 24)
    assert not any(p.requires_grad for p in layer.parameters())
    weight = layer.dequantize(torch.float64)
    x = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    expected = F.linear(x, weight, layer.bias.double())
    assert out.dtype == torch.float64 and torch.allclose(out, expected, atol=1e-12)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (torch.randn(3, 40, dtype=torch.float64, requires_grad=True),))
    assert f"double_quant={double_quant}" in repr(layer) and "in_features=40" in repr(layer)


def test_nf4_linear_keeps_no_float_weight_for_backward():
    """What backward keeps of a 4-bit layer is the packed weight: nothing saved with save_for_backward,
    and every tensor the autograd node holds is a small integer or a block scale."""
    layer = NF4Linear.from_linear(nn.Linear(64, 64, bias=False))
    out = DequantizedMatmul.apply(torch.randn(3, 64, requires_grad=True), layer.packed_weight())
    node = out.grad_fn
    assert not node.saved_tensors
    held = [value for value in vars(node).values()]
    assert held and all(isinstance(value, NF4Weight) for value in held)
    tensors = [t for w in held for t in (w.codes, w.absmax, w.absmax_scale, w.absmax_mean) if t is not None]
    assert not any(
        t.is_floating_point() and t.numel() >= 64 * 64 // 64 + 1 for t in tensors
    )  # at most one float per block


def test_nf4_linear_runs_in_the_input_dtype_or_compute_dtype():
    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    x = torch.randn(2, 64)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.compute_dtype = torch.float64
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.linear(x.double(), layer.dequantize(torch.float64), layer.bias.double()).float())


@pytest.mark.parametrize("double_quant", [False, True])
def test_packed_storage_is_about_four_and_a_half_bits(double_quant):
    layer = NF4Linear.from_linear(nn.Linear(256, 256, bias=False), double_quant=double_quant)
    buffers = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert buffers == layer.nbytes
    per_weight = layer.nbytes / (256 * 256)
    if double_quant:
        assert 0.5 < per_weight < 0.52  # 4 + 8/64 + 32/(64·256) bits ≈ 4.13 bits
    else:
        assert per_weight == 0.5625  # 4 + 32/64 = 4.5 bits


def test_quantized_model_stays_close_and_trains_through_the_frozen_layers():
    model, reference = make_model(), make_model()
    with torch.no_grad():
        before = model(IDS)
    replaced = quantize_linear_layers(model, ALL_LINEAR)
    assert len(replaced) == 2 * 7 and all(isinstance(model.get_submodule(n), NF4Linear) for n in replaced)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert "model.layers.0.mlp.up_proj.weight" not in model.state_dict()
    with torch.no_grad():
        after = model(IDS)
        for name in replaced:  # the reference: a float model holding the dequantized weights
            reference.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize())
    assert relative_rms(after, before) < 0.05
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.8
    loss, ref_loss = model(IDS, labels=IDS), reference(IDS, labels=IDS)
    loss.backward()
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    grad, ref_grad = model.model.embed_tokens.weight.grad, reference.model.embed_tokens.weight.grad
    assert grad is not None and torch.allclose(grad, ref_grad, atol=1e-5)


def test_no_match_names_the_linear_layers():
    with pytest.raises(ValueError, match="q_proj"):
        quantize_linear_layers(make_model(), ["query"])


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    model = make_model(0)
    quantize_linear_layers(model, ["q_proj", "v_proj", "down_proj"], double_quant=double_quant)
    other = make_model(1)
    quantize_linear_layers(other, ["q_proj", "v_proj", "down_proj"], double_quant=double_quant)
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    with torch.no_grad():
        assert torch.equal(other(IDS), model(IDS))


def test_state_dict_survives_safetensors(tmp_path):
    torch.manual_seed(5)
    layer = NF4Linear.from_linear(nn.Linear(70, 30), double_quant=True)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    loaded = load_file(tmp_path / "layer.safetensors")
    assert set(loaded) == {"weight_codes", "weight_absmax", "weight_absmax_scale", "weight_absmax_mean", "bias"}
    fresh = NF4Linear.from_linear(nn.Linear(70, 30), double_quant=True)
    fresh.load_state_dict(loaded)
    x = torch.randn(4, 70)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(6)
    layer = NF4Linear.from_linear(nn.Linear(128, 64), double_quant=True)
    x = torch.randn(3, 128)
    on_gpu = copy.deepcopy(layer).to("cuda")
    assert torch.allclose(on_gpu(x.cuda()).cpu(), layer(x), atol=1e-4)
    assert torch.equal(
        quantize_nf4(layer.dequantize().cuda()).dequantize().cpu(), quantize_nf4(layer.dequantize()).dequantize()
    )
