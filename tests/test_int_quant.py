"""tinylm quantize: 8-/4-bit integer weights in compressed-tensors' layout, run by low-bit kernels,
loaded by transformers, and used by every command that runs a model."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TRAIN, LiveServer, logged, reference, tiny_chat_dir

from tinylm.cli import main
from tinylm.export.quantize import Calibration, QuantizeError, quantize_model_dir
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.model.gptq import Hessian, gptq
from tinylm.model.intquant import IntLinear, IntScheme, pack_int32, round_to_nearest, unpack_int32
from tinylm.modeldir import ModelDirError, load_model_dir

SCHEMES = [IntScheme(8, None), IntScheme(4, 32), IntScheme(4, 64), IntScheme(4, None)]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return tiny_chat_dir(tmp_path_factory.mktemp("quant") / "chat")


@pytest.fixture(scope="module")
def int4_dir(chat_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant-int4") / "int4"
    calibration = Calibration(samples=16, seq_len=64)
    return quantize_model_dir(chat_dir, out, bits=4, group_size=32, method="gptq", calibration=calibration)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_own(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 40))
    packed = pack_int32(q + 2 ** (bits - 1), bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, 40 * bits // 32)
    assert torch.equal(packed, ct.pack_to_int32(q.to(torch.int8), bits))
    assert torch.equal(ct.unpack_from_int32(packed, bits, torch.Size([6, 40])).long(), q)
    assert torch.equal(unpack_int32(packed, bits, 40) - 2 ** (bits - 1), q.int())


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_to_nearest_is_within_half_a_step(scheme):
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    layer = IntLinear.from_linear(torch.nn.Linear(128, 48).requires_grad_(False), scheme)
    q, scale = round_to_nearest(weight, scheme)
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax
    steps = scale.repeat_interleave(128 // scale.shape[1], dim=1)
    assert ((q.float() * steps - weight).abs() <= steps / 2 + 1e-6).all()
    assert layer.nbytes == 48 * 128 * scheme.bits // 8 + scale.numel() * 4


@pytest.mark.parametrize("scheme", [IntScheme(8, None), IntScheme(4, 32), IntScheme(4, 128)], ids=str)
def test_a_decode_step_runs_the_low_bit_kernel_and_agrees_with_the_dequantized_weight(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = IntLinear.from_linear(linear, scheme)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing kernel warns: here it must not
        token, prompt = torch.randn(1, 1, 256), torch.randn(1, 40, 256)
        want_token = F.linear(token, layer.dequantize(), linear.bias)
        assert torch.allclose(layer(token), want_token, atol=0.02 * want_token.abs().max().item())
        assert layer._kernel  # built, checked and used
        assert torch.allclose(layer(prompt), F.linear(prompt, layer.dequantize(), linear.bias), atol=1e-5)


def test_a_kernel_that_disagrees_is_not_trusted(monkeypatch):
    import tinylm.model.intquant as intquant

    layer = IntLinear.from_linear(torch.nn.Linear(64, 32), IntScheme(4, 32))
    monkeypatch.setattr(intquant, "build_kernel", lambda layer: lambda x: torch.zeros(x.shape[0], 32))
    x = torch.randn(1, 64)
    with pytest.warns(UserWarning, match="differs from the dequantized weight"), torch.no_grad():
        out = layer(x)
    assert torch.allclose(out, F.linear(x, layer.dequantize(), layer.bias), atol=1e-5)


def test_gptq_moves_the_outputs_less_than_rounding_to_nearest():
    torch.manual_seed(0)
    inputs = torch.randn(2048, 128) @ torch.randn(128, 128) / 10 + 0.2 * torch.randn(2048, 128)  # correlated
    weight = torch.randn(64, 128) * 0.05
    hessian = Hessian(128)
    for chunk in inputs.split(500):
        hessian.add(chunk)
    assert torch.allclose(hessian.matrix.float(), 2 * inputs.T @ inputs / len(inputs), rtol=1e-4, atol=1e-4)

    def output_error(q, scale):
        rebuilt = q.float() * scale.repeat_interleave(128 // scale.shape[1], dim=1)
        return ((inputs @ (weight - rebuilt).T) ** 2).mean()

    for scheme in SCHEMES:
        rounded, solved = (
            output_error(*round_to_nearest(weight, scheme)),
            output_error(*gptq(weight, hessian.matrix, scheme)),
        )
        assert solved < 0.8 * rounded, scheme


def test_quantized_directory_loads_in_tinylm_with_close_logits(chat_dir, int4_dir, tmp_path):
    config = json.loads((int4_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quantization_status"] == "compressed"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 32)
    assert config["ignore"] == ["lm_head"]
    model, tokenizer = load_model_dir(chat_dir)
    quantized, _ = load_model_dir(int4_dir)
    layer = quantized.model.layers[1].mlp.down_proj
    assert isinstance(layer, IntLinear) and layer.weight_packed.dtype == torch.int32
    for name, module in quantized.named_modules():  # the float model, given the integers' values
        if isinstance(module, IntLinear):
            model.get_submodule(name).weight.data = module.dequantize()
    ids = torch.tensor([tokenizer.encode("the cat sat on the mat. 你好 世界")])
    with torch.no_grad():
        assert torch.allclose(quantized(ids), model(ids), atol=1e-5)
    size = sum(f.stat().st_size for f in int4_dir.glob("*.safetensors"))
    assert size < 0.5 * sum(f.stat().st_size for f in chat_dir.glob("*.safetensors"))
    bf16, _ = load_model_dir(int4_dir, dtype=torch.bfloat16)  # floats change dtype, the integers stay
    assert bf16.model.layers[0].self_attn.q_proj.weight_packed.dtype == torch.int32
    assert bf16.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.bfloat16


def test_a_trained_model_keeps_its_predictions(trained_base, tmp_path):
    model, tokenizer = load_model_dir(trained_base)
    ids = torch.tensor([tokenizer.encode("What colour does Tom like? Tom likes red.")])
    with torch.no_grad():
        want = model(ids).log_softmax(-1)
        for bits, group, tolerance in [(8, None, 0.01), (4, 32, 0.1)]:
            calibration = Calibration(samples=16)
            out = quantize_model_dir(trained_base, tmp_path / f"int{bits}", bits, group, "gptq", calibration)
            got = load_model_dir(out)[0](ids).log_softmax(-1)
            assert (got.exp() - want.exp()).abs().sum(-1).max() < tolerance  # total variation of next-token choice
            assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_transformers_loads_the_directory_with_the_same_logits(chat_dir, tmp_path, bits, group):
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    out = quantize_model_dir(chat_dir, tmp_path / "q", bits=bits, group_size=group, method="rtn")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours, tokenizer = load_model_dir(out)
    ids = torch.tensor([tokenizer.encode("the dog ran. 小明喜欢黄色。")])
    with torch.no_grad():
        want = ours(ids)  # a prompt: dequantized fp32 weights, as transformers computes
        got = theirs(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_the_engine_generates_from_a_quantized_directory_and_batches_agree(int4_dir):
    engine = Engine.from_dir(int4_dir, device="cpu")
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    prompts = [engine.encode("the cat"), engine.encode("你好"), engine.encode("User: hi\nAssistant:")]
    together = engine.generate(prompts, settings)
    alone = [engine.generate([p], settings)[0] for p in prompts]
    assert together == alone and all(len(t) > 0 for t in together)


def test_generate_and_serve_run_a_quantized_directory(int4_dir, capsys):
    assert main(["generate", str(int4_dir), "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
    import openai

    from tinylm.serve.app import build_server

    with LiveServer(build_server(int4_dir, max_batch=4)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompts = ["the cat", "你好", "the dog ran"]
        out = client.completions.create(model="int4", prompt=prompts, max_tokens=8, temperature=0)
        alone = [reference(live, prompt=p, max_new_tokens=8).text for p in prompts]
        assert [c.text for c in out.choices] == alone  # continuous batching over int4 layers = one at a time


def test_lora_trains_on_a_quantized_base(base_and_chats, trained_base, tmp_path, capsys):
    base, chats = trained_base, base_and_chats[2]
    int4 = quantize_model_dir(base, tmp_path / "int4", bits=4, group_size=32, method="rtn")
    run = tmp_path / "lora"
    args = ["sft", "--init", str(int4), "--data", str(chats), "--out", str(run), *TRAIN, "--train.max_steps=60"]
    assert main([*args, "--train.lr=0.01", "--lora", "--lora-r", "4", "--lora-alpha", "8"]) == 0
    assert "over a frozen quantized base (int4, groups of 32)" in capsys.readouterr().err
    val = logged(run, "val_loss")
    assert val[-1] < 0.85 * val[0]
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(int4)
    merged, _ = load_model_dir(run / "final")  # the base's integers, dequantized, plus the adapter
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)

    full = ["sft", "--init", str(int4), "--data", str(chats), "--out", str(tmp_path / "full"), *TRAIN]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert "is quantized (int4, groups of 32)" in err and "--lora" in err


def test_bad_input_is_refused_with_a_reason_and_nothing_written(chat_dir, int4_dir, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        ([str(int4_dir), "--out", str(out)], "already quantized (int4, groups of 32)"),
        (
            [str(chat_dir), "--out", str(out), "--bits", "4", "--group-size", "256"],
            "does not divide the layer's width 64",
        ),
        ([str(chat_dir), "--out", str(out), "--group-size", "48"], "power of two"),
        ([str(tmp_path / "nowhere"), "--out", str(out)], "nowhere"),
    ]
    for args, message in cases:
        assert main(["quantize", *args]) != 0
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit):
        main(["quantize", str(chat_dir), "--out", str(out), "--bits", "3"])
    assert "--bits: invalid choice: 3" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in int4_dir.iterdir():
        if f.name != "SHA256SUMS":
            (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelDirError, match=r"config.json: quantization_config.config_groups.group_0.weights.symmetric"
    ):
        load_model_dir(broken)
    assert main(["export", "gguf", str(int4_dir), str(tmp_path / "chat.gguf")]) == 2
    assert "is quantized (int4, groups of 32); export the float model" in capsys.readouterr().err
    assert not (tmp_path / "chat.gguf").exists()
    with pytest.raises(QuantizeError, match="--method"):
        quantize_model_dir(chat_dir, out, method="awq")


def test_quantize_command_writes_a_directory_from_the_built_in_calibration(chat_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    assert (
        main(["quantize", str(chat_dir), "--out", str(out), "--bits", "8", "--method", "gptq", "--calib-samples", "8"])
        == 0
    )
    err = capsys.readouterr().err
    assert "gptq: layer 2/2" in err and str(out) in err
    model, _ = load_model_dir(out)
    assert model.model.layers[0].mlp.up_proj.scheme == IntScheme(8, None)


def test_a_gguf_file_where_a_model_directory_belongs_is_named_as_such(tmp_path, capsys):
    (tmp_path / "chat.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    (tmp_path / "broken.gguf").write_bytes(b"\x00\x01garbage")
    assert main(["generate", str(tmp_path / "chat.gguf"), "--prompt", "hi"]) == 2
    assert "a GGUF file is for llama.cpp and Ollama" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "broken.gguf"), "--out", str(tmp_path / "out")]) == 2
    assert "not even a valid GGUF file" in capsys.readouterr().err and not (tmp_path / "out").exists()
