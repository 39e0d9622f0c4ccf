"""tinylm export gguf: what llama.cpp's file holds, read back by gguf's reader and by transformers."""

import numpy as np
import pytest
import torch
from conftest import tiny_chat_dir, tiny_qwen2_dir, tiny_qwen_dir

from tinylm.cli import main
from tinylm.export.gguf import ExportError, export_gguf, permute_for_llama
from tinylm.modeldir import load_model_dir, read_weights

gguf = pytest.importorskip("gguf")

BILINGUAL = [
    "Hello, world! The cat sat on the mat.",
    "你好，世界。小明喜欢黄色。",
    "Numbers 12345 and 3.14, emoji 🙂🚀, tabs\tand   runs of spaces\n\n\nnew lines",
    "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return tiny_chat_dir(tmp_path_factory.mktemp("gguf") / "chat")


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def dequantized(tensor) -> torch.Tensor:
    shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists dimensions innermost first
    return torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32))


def test_f32_holds_the_weights_the_metadata_and_the_tokenizer(chat_dir, tmp_path):
    written = export_gguf(chat_dir, tmp_path / "chat.gguf", "f32")
    assert written == [tmp_path / "chat.gguf", tmp_path / "chat.Modelfile"]
    fields, tensors = read(tmp_path / "chat.gguf")
    model, tokenizer = load_model_dir(chat_dir)
    config = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.context_length"] == 128
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.token_to_id("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[300 - 1] == gguf.TokenType.NORMAL
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd

    state = read_weights(chat_dir)
    assert torch.equal(dequantized(tensors["token_embd.weight"]), state["model.embed_tokens.weight"])
    assert torch.equal(dequantized(tensors["blk.1.ffn_down.weight"]), state["model.layers.1.mlp.down_proj.weight"])
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(dequantized(tensors["blk.0.attn_q.weight"]), permute_for_llama(q, 4))
    assert not torch.equal(permute_for_llama(q, 4), q)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_the_permutation_interleaves_each_heads_halves():
    rows = torch.arange(8).float()[:, None]  # 2 heads of 4: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
    assert permute_for_llama(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def gguf_weights_as_ours(path, model) -> dict[str, torch.Tensor]:
    """The GGUF's tensors, dequantized, under tinylm's names (the Q/K rows put back in their order)."""
    _, tensors = read(path)
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj"}
    names |= {"attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    names |= {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {"model.embed_tokens.weight": dequantized(tensors["token_embd.weight"])}
    state["model.norm.weight"] = dequantized(tensors["output_norm.weight"])
    for name, tensor in tensors.items():
        if name.startswith("blk."):
            _, layer, kind, suffix = name.split(".")
            ours = f"model.layers.{layer}.{names[kind]}.{suffix}"
            weight = dequantized(tensor)
            if (head := ours.split(".")[-2]) in heads:  # undo the interleaving: rows 2j, 2j+1 back to j, j+d/2
                n = heads[head]
                weight = weight.reshape(n, -1, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
            state[ours] = weight
    return state


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0"])
def test_transformers_reads_it_back_as_the_file_says_with_our_tokens(chat_dir, tmp_path, kind):
    """transformers' GGUF loader (which undoes the Q/K interleaving itself) computes the logits that
    tinylm computes with the file's weights: exactly the model's at f32, their rounded values otherwise."""
    transformers = pytest.importorskip("transformers")
    export_gguf(chat_dir, tmp_path / "m.gguf", kind)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    model, tokenizer = load_model_dir(chat_dir)
    for text in BILINGUAL:
        assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
    ids = torch.tensor([tokenizer.encode(BILINGUAL[1] + BILINGUAL[0])])
    rounded = gguf_weights_as_ours(tmp_path / "m.gguf", model)
    if kind == "f32":
        assert all(torch.equal(rounded[k], v) for k, v in read_weights(chat_dir).items())
    model.load_state_dict(rounded, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def tiny_qwen3_dir(path, tokenizer):
    return tiny_qwen_dir(path, tokenizer, "qwen3")


@pytest.mark.parametrize(
    "kind, make, tensor", [("qwen2", tiny_qwen2_dir, "attn_q.bias"), ("qwen3", tiny_qwen3_dir, "attn_q_norm.weight")]
)
def test_qwen_directories_keep_what_their_architecture_adds(chat_dir, tmp_path, kind, make, tensor):
    """Qwen2's q/k/v biases and Qwen3's q/k norms reach the file and come back through transformers."""
    transformers = pytest.importorskip("transformers")
    _, tokenizer = load_model_dir(chat_dir)
    source = make(tmp_path / kind, tokenizer)
    export_gguf(source, tmp_path / "q.gguf", "f32")
    fields, tensors = read(tmp_path / "q.gguf")
    assert fields["general.architecture"] == kind and f"blk.0.{tensor}" in tensors
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf").eval()
    model, _ = load_model_dir(source)
    ids = torch.tensor([tokenizer.encode(BILINGUAL[0])])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids), atol=1e-5, rtol=1e-4)


def test_q4_0_rounds_each_weight_to_its_blocks_grid(chat_dir, tmp_path):
    export_gguf(chat_dir, tmp_path / "q4.gguf", "q4_0")
    fields, tensors = read(tmp_path / "q4.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    weight = read_weights(chat_dir)["model.layers.0.mlp.up_proj.weight"]
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    got = dequantized(tensors["blk.0.ffn_up.weight"])
    blocks, back = weight.reshape(-1, 32), got.reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) / 8  # levels -8..7 times max/8: the max itself sits on -8
    error = (back - blocks).abs()
    assert (error <= step + 1e-6).all()  # the far end clips at 7 steps; elsewhere the nearest level
    assert (error <= step / 2 + 1e-6).float().mean() > 0.95
    assert (tmp_path / "q4.gguf").stat().st_size < 0.3 * (chat_dir / "model.safetensors").stat().st_size


def test_the_ollama_modelfile_renders_chatml_and_stops_on_its_markers(chat_dir, tmp_path):
    export_gguf(chat_dir, tmp_path / "chat.gguf", "q8_0")
    text = (tmp_path / "chat.Modelfile").read_text(encoding="utf-8")
    assert "FROM ./chat.gguf" in text
    assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
    assert "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}" in text
    assert text.rstrip().endswith('PARAMETER stop "<|endoftext|>"') and 'PARAMETER stop "<|im_end|>"' in text


def test_the_command_and_bad_input(chat_dir, tmp_path, capsys):
    assert main(["export", "gguf", str(chat_dir), str(tmp_path / "c.gguf"), "--type", "q4_0"]) == 0
    assert "c.gguf" in capsys.readouterr().out
    assert (tmp_path / "c.gguf").stat().st_size > 0

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in chat_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(Exception, match="SHA-256"):
        export_gguf(broken, tmp_path / "b.gguf")
    with pytest.raises(ExportError, match="--type: expected one of"):
        export_gguf(chat_dir, tmp_path / "b.gguf", "q3_k")
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob(".b.gguf*"))
    assert main(["export", "gguf", str(tmp_path / "nowhere"), str(tmp_path / "b.gguf")]) != 0
    assert not (tmp_path / "b.gguf").exists()


# -- llama.cpp itself (llama-cpp-python; skipped where it is not installed) ----------------------


def greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-steps:]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def load_in_llama_cpp(llama_cpp, path, **kwargs):
    f32 = llama_cpp.GGML_TYPE_F32  # llama.cpp keeps its K/V cache in f16 unless told otherwise
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False, seed=0, type_k=f32, type_v=f32, **kwargs)


def test_llama_cpp_tokenizes_and_predicts_as_tinylm(chat_dir, tmp_path, llama_cpp):
    export_gguf(chat_dir, tmp_path / "m.gguf", "f32")
    llm = load_in_llama_cpp(llama_cpp, tmp_path / "m.gguf", logits_all=True)
    model, tokenizer = load_model_dir(chat_dir)
    for text in BILINGUAL:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tokenizer.encode(text), text
    ids = tokenizer.encode(BILINGUAL[1] + BILINGUAL[0])
    llm.eval(ids)
    theirs = torch.from_numpy(llm.scores[: len(ids)].copy())
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-3)

    prompt = tokenizer.encode("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n")
    llm.reset()
    generated = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        generated.append(token)
        if len(generated) == 12:
            break
    assert generated == greedy(model, prompt, 12)


def test_an_architecture_without_a_gguf_counterpart_is_refused_by_name(chat_dir, tmp_path):
    import json
    import shutil

    from tinylm.io import write_manifest

    odd = tmp_path / "odd"
    shutil.copytree(chat_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    write_manifest(odd)
    with pytest.raises(ExportError, match=r"odd: a llama model with biases"):
        export_gguf(odd, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()


def test_llama_cpp_chats_through_the_embedded_template(chat_dir, tmp_path, llama_cpp):
    from tinylm.chat_template import find_template

    export_gguf(chat_dir, tmp_path / "m.gguf", "f32")
    llm = load_in_llama_cpp(llama_cpp, tmp_path / "m.gguf")
    model, tokenizer = load_model_dir(chat_dir)
    template = find_template(tokenizer.chat_template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, who are you?"}]
    answer = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=12, repeat_penalty=1.0)
    ours = greedy(model, template.encode(tokenizer, messages, add_generation_prompt=True)[0], 12)
    stops = template.stop_token_ids(tokenizer)
    ours = ours[: next((i for i, t in enumerate(ours) if t in stops), len(ours))]
    expected = tokenizer.decode(ours).replace("\ufffd", "")  # llama-cpp-python drops a cut-off character
    content = answer["choices"][0]["message"]["content"]
    if answer["choices"][0]["finish_reason"] == "stop":
        assert content == expected
    else:  # at the length limit llama-cpp-python may take one more token to finish a character
        assert content.startswith(expected) and len(content) <= len(expected) + 2


def test_q4_k_m_comes_from_llama_cpps_quantizer_and_runs_there(chat_dir, tmp_path, llama_cpp):
    from tinylm.model.llama import CausalLM, ModelConfig
    from tinylm.modeldir import save_model_dir

    _, tokenizer = load_model_dir(chat_dir)
    torch.manual_seed(0)  # rows of 256 and 512 weights: whole k-quant super-blocks
    shape = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = CausalLM(shape).eval()
    save_model_dir(model, tmp_path / "wide", tokenizer)
    export_gguf(tmp_path / "wide", tmp_path / "k.gguf", "q4_k_m")
    fields, tensors = read(tmp_path / "k.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert {t.tensor_type.name for t in tensors.values()} == {"F32", "Q4_K", "Q6_K"}
    llm = load_in_llama_cpp(llama_cpp, tmp_path / "k.gguf", logits_all=True)
    ids = tokenizer.encode(BILINGUAL[0] + BILINGUAL[1])
    llm.eval(ids)
    theirs = torch.from_numpy(llm.scores[: len(ids)].copy()).flatten()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].flatten()
    assert torch.corrcoef(torch.stack([theirs, ours]))[0, 1] > 0.98  # 4-bit weights, the same function
    assert not list(tmp_path.glob(".k.gguf*"))  # the f32 file it was made from is gone


@pytest.mark.parametrize("make", [tiny_qwen2_dir, tiny_qwen3_dir])
def test_llama_cpp_runs_qwen2_and_qwen3_files_as_tinylm_does(chat_dir, tmp_path, llama_cpp, make):
    """Biases, q/k norms and heads wider than hidden / heads give llama.cpp tinylm's logits."""
    _, tokenizer = load_model_dir(chat_dir)
    source = make(tmp_path / "qwen", tokenizer)
    export_gguf(source, tmp_path / "q.gguf", "f32")
    llm = load_in_llama_cpp(llama_cpp, tmp_path / "q.gguf", logits_all=True)
    model, _ = load_model_dir(source)
    ids = tokenizer.encode(BILINGUAL[1] + BILINGUAL[0])
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(torch.from_numpy(llm.scores[: len(ids)].copy()), ours, atol=1e-3, rtol=1e-3)


def test_a_llama3_split_is_named_llama_bpe_and_llama_cpp_splits_as_tinylm(chat_dir, tmp_path, llama_cpp):
    import shutil

    from tinylm.io import write_manifest
    from tinylm.tokenizer import Tokenizer

    llama3 = tmp_path / "llama3"  # the same vocabulary, split the Llama 3 way (digits in threes)
    shutil.copytree(chat_dir, llama3)
    spec = (llama3 / "tokenizer.json").read_text(encoding="utf-8")
    assert spec.count("\\\\p{N}|") == 1
    (llama3 / "tokenizer.json").write_text(spec.replace("\\\\p{N}|", "\\\\p{N}{1,3}|"), encoding="utf-8")
    write_manifest(llama3)
    export_gguf(llama3, tmp_path / "l.gguf", "f32")
    fields, _ = read(tmp_path / "l.gguf")
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    llm = load_in_llama_cpp(llama_cpp, tmp_path / "l.gguf", vocab_only=True)
    ours = Tokenizer.load(llama3)
    for text in BILINGUAL:
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ours.encode(text), text
