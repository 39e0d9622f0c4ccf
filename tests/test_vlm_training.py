"""Vision-language models end to end: the saved directory (tinylm and transformers read it alike),
generation with images, the two training stages, chat with pictures, and the quickstart."""

import io
import json

import pytest
import torch
from conftest import TRAIN, logged, tiny_clip_tower, write_jsonl
from safetensors.torch import load_file

from tinylm.chat_template import TEMPLATES, find_template
from tinylm.cli import main
from tinylm.data.builtin_images import Scene, render
from tinylm.image_processor import ImageProcessor
from tinylm.infer.chat import run_chat
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.io import DataError
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.model.vision import SIGLIP, VisionConfig
from tinylm.model.vlm import IMAGE_TOKEN, VisionLanguageModel, VLMConfig, ensure_image_token, expand_image_tags
from tinylm.modeldir import ModelDirError, is_vlm_dir, load_model_dir, load_vlm_dir, save_vlm_dir

# a tiny vision tower for the training stages: 32 px pictures in 8 px patches → 16 image tokens
TINY_VISION = [
    "--vision.image_size=32",
    "--vision.patch_size=8",
    "--vision.hidden_size=32",
    "--vision.intermediate_size=64",
    "--vision.num_hidden_layers=2",
    "--vision.num_attention_heads=2",
]
VLM_TRAIN = [*TRAIN, "--train.seq_len=288", "--data.builtin_images=40", "--train.lr=0.003"]


def picture(tmp_path, name="red.png", colour="red", shape="circle", cells=((1, 1),)):
    path = tmp_path / name
    render(Scene(shape, colour, cells, 0), 32).save(path)
    return path


def tiny_vlm_dir(path, tokenizer, tie=False, seed=0):
    """A random tiny VLM saved with ``tokenizer`` (chatml attached) and a 32 px processor."""
    from tinylm.chat_template import get_template

    torch.manual_seed(seed)
    template = get_template("chatml")
    tokenizer = template.attach(tokenizer)
    text = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        eos_token_id=template.stop_token_ids(tokenizer),
    )
    vision = VisionConfig(
        model_type=SIGLIP,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    model = VisionLanguageModel(VLMConfig(vision=vision, text=text, image_token_id=tokenizer.token_to_id(IMAGE_TOKEN)))
    with torch.no_grad():  # no exact zeros anywhere: every part of the model matters to the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_vlm_dir(model, path, tokenizer, ImageProcessor(size=32))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from tinylm.tokenizer import train_tokenizer

    texts = [
        "What colour is the shape? It is red.",
        "How many circles are there? There are 3 circles.",
        "这个图形是什么颜色的？它是红色的。",
    ] * 20
    return train_tokenizer(texts, vocab_size=300)


# -- the directory and generation ---------------------------------------------------------------


def test_directory_round_trip_and_transformers_reads_it_alike(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    directory = tiny_vlm_dir(tmp_path / "vlm", tokenizer)
    assert is_vlm_dir(directory) and not is_vlm_dir(tmp_path)
    assert {p.name for p in directory.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "processor_config.json",
        "generation_config.json",
        "SHA256SUMS",
    }
    engine = Engine.from_dir(directory, device="cpu")
    ids = engine.encode("<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n", images=1)
    assert ids.count(engine.vlm.config.image_token_id) == 16
    image = picture(tmp_path)
    pixels = engine.processor([image])
    with torch.no_grad():
        ours = engine.vlm(torch.tensor([ids]), pixels)

    # transformers' processor builds the same ids and pixels from the directory, and its model the same logits
    processor = transformers.AutoProcessor.from_pretrained(directory)
    theirs_in = processor(
        text=f"<|im_start|>user\n{IMAGE_TOKEN}\nWhat colour is the shape?<|im_end|>\n",
        images=[load_image_pil(image)],
        return_tensors="pt",
    )
    assert theirs_in["input_ids"][0].tolist() == ids
    assert torch.allclose(theirs_in["pixel_values"], pixels, atol=1e-5)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
    with torch.no_grad():
        theirs = hf(input_ids=theirs_in["input_ids"], pixel_values=theirs_in["pixel_values"]).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

    # the engine's greedy continuation is the argmax chain of transformers' model
    settings = SamplingSettings(max_new_tokens=6, temperature=0, stop_token_ids=[])
    generated = engine.run([ids], settings, images=[[image]])[0].token_ids
    chain = list(ids)
    with torch.no_grad():
        for _ in range(6):
            chain.append(int(hf(input_ids=torch.tensor([chain]), pixel_values=pixels).logits[0, -1].argmax()))
    assert generated == chain[len(ids) :]


def load_image_pil(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_batched_prompts_with_different_images_generate_as_alone(tmp_path, tokenizer):
    engine = Engine.from_dir(tiny_vlm_dir(tmp_path / "vlm", tokenizer, tie=True), device="cpu")
    red, blue = picture(tmp_path), picture(tmp_path, "blue.png", "blue", "square", ((0, 0), (2, 2)))
    prompts = ["<image>\nWhat colour?", "Compare <image> and <image>, please.", "No picture here."]
    images = [[red], [blue, red], []]
    settings = SamplingSettings(max_new_tokens=5, temperature=0, stop_token_ids=[])
    together = [c.token_ids for c in engine.run(prompts, settings, images=images)]
    alone = [engine.run([p], settings, images=[i])[0].token_ids for p, i in zip(prompts, images)]
    assert together == alone
    streamed = "".join(engine.stream(prompts[1], settings, images=images[1]))
    assert streamed == engine.run([prompts[1]], settings, images=[images[1]])[0].text


def test_a_quantized_vlm_keeps_its_vision_float_and_loads_here_and_in_transformers(tmp_path, tokenizer):
    from tinylm.export.quantize import quantize_model_dir
    from tinylm.model.intquant import IntLinear

    out = quantize_model_dir(tiny_vlm_dir(tmp_path / "vlm", tokenizer), tmp_path / "int8", 8, None, "rtn")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
    engine = Engine.from_dir(out, device="cpu")
    assert isinstance(engine.vlm.language_model.model.layers[1].mlp.down_proj, IntLinear)
    assert not any(isinstance(m, IntLinear) for m in engine.vlm.vision_tower.modules())
    red, blue = picture(tmp_path), picture(tmp_path, "blue.png", "blue", "square", ((0, 0), (2, 2)))
    prompts, images = ["<image>\nWhat colour?", "Compare <image> and <image>."], [[red], [blue, red]]
    settings = SamplingSettings(max_new_tokens=5, temperature=0, stop_token_ids=[])
    together = [c.token_ids for c in engine.run(prompts, settings, images=images)]
    assert together == [engine.run([p], settings, images=[i])[0].token_ids for p, i in zip(prompts, images)]

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    ids = engine.encode(prompts[0], images=1)
    pixels = engine.processor([red])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ours, theirs = engine.vlm(torch.tensor([ids]), pixels), hf(input_ids=torch.tensor([ids]), pixel_values=pixels)
    assert torch.allclose(ours, theirs.logits, atol=1e-4), (ours - theirs.logits).abs().max()


def test_image_counts_and_tags_are_checked(tmp_path, tokenizer):
    engine = Engine.from_dir(tiny_vlm_dir(tmp_path / "vlm", tokenizer), device="cpu")
    settings = SamplingSettings(max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="holds 1 <image> tag\\(s\\) but 0 image"):
        engine.run(["<image> what?"], settings)
    with pytest.raises(ValueError, match="holds 0 <image> tag\\(s\\) but 1 image"):
        engine.run(["what?"], settings, images=[[picture(tmp_path)]])
    with pytest.raises(ValueError, match="contains the image token"):
        engine.encode(f"{IMAGE_TOKEN} sneaked in")
    with pytest.raises(ValueError, match="does not exist"):
        engine.run(["<image> what?"], settings, images=[[tmp_path / "missing.png"]])
    assert expand_image_tags("a <image> b", 1, 3) == f"a {IMAGE_TOKEN * 3} b"


def test_a_text_model_directory_is_not_a_vlm_and_vice_versa(tmp_path, tokenizer, base_and_chats):
    _, base, _ = base_and_chats
    directory = tiny_vlm_dir(tmp_path / "vlm", tokenizer)
    with pytest.raises(ModelDirError, match="llava"):
        load_model_dir(directory)
    text_engine = Engine.from_dir(base, device="cpu")
    with pytest.raises(ValueError, match="no vision tower"):
        text_engine.run(["<image> hi"], SamplingSettings(max_new_tokens=2), images=[[picture(tmp_path)]])


def test_corrupted_vlm_directory_is_refused(tmp_path, tokenizer):
    directory = tiny_vlm_dir(tmp_path / "vlm", tokenizer)
    with open(directory / "preprocessor_config.json", "a", encoding="utf-8") as f:
        f.write(" ")
    with pytest.raises(DataError, match=r"preprocessor_config\.json: failed its SHA-256 check"):
        load_vlm_dir(directory)


def test_a_foreign_tokenizer_gets_the_image_token_and_a_new_embedding_row():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from tinylm.tokenizer import Tokenizer

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.train_from_iterator(
        ["a foreign tokenizer without image tokens"] * 5, trainers.BpeTrainer(vocab_size=80, special_tokens=["</s>"])
    )
    foreign = Tokenizer(rust, eos_token="</s>")
    assert foreign.token_to_id(IMAGE_TOKEN) is None
    torch.manual_seed(0)
    model = CausalLM(
        ModelConfig(
            vocab_size=foreign.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
    ).eval()
    ids = torch.tensor([foreign.encode("a foreign tokenizer")])
    before = model(ids)
    tokenizer, index = ensure_image_token(model, foreign)
    assert index == foreign.vocab_size and tokenizer.token_to_id(IMAGE_TOKEN) == index
    assert tokenizer.encode(IMAGE_TOKEN * 3) == [index] * 3
    assert model.model.embed_tokens.weight.shape[0] == index + 1 == model.config.vocab_size
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(model(ids)[..., : foreign.vocab_size], before, atol=1e-6)


# -- training -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1(base_and_chats, tmp_path_factory):
    """Stage 1 on the built-in pictures: a new tiny ViT and the projector learn; the language model is frozen."""
    _, base, _ = base_and_chats
    out = tmp_path_factory.mktemp("vlm") / "stage1"
    assert (
        main(
            [
                "vlm",
                "pretrain",
                "--init",
                str(base),
                "--out",
                str(out),
                "--train-vision",
                *TINY_VISION,
                *VLM_TRAIN,
                "--train.max_steps=30",
                "--train.eval_every=10",
                "--train.log_every=5",
                "--train.lr=0.01",
            ]
        )
        == 0
    )
    return out


def test_stage1_trains_projector_and_encoder_and_leaves_the_language_model(stage1, base_and_chats):
    _, base, _ = base_and_chats
    model, tokenizer, processor = load_vlm_dir(stage1 / "final")
    start = load_file(base / "model.safetensors")
    for name, tensor in model.language_model.state_dict().items():
        if name in start:
            assert torch.equal(tensor, start[name]), name
    # the tiny language model knows little of the captions' words, so the images can only help so much: the
    # loss falls a little (the quickstart's shows the real effect)
    losses = logged(stage1)
    assert losses[-1] < losses[0], losses
    val = logged(stage1, "val_loss")
    assert val[-1] < val[0], val
    assert processor.size == 32 and model.config.image_seq_length == 16
    assert (
        find_template(tokenizer.chat_template) is TEMPLATES["chatml"]
        and tokenizer.token_to_id(IMAGE_TOKEN) == model.config.image_token_id
    )


@pytest.mark.parametrize("adapter", [["--lora"], ["--qlora"]], ids=["lora", "qlora"])
def test_stage2_with_lora_and_text_only_samples_mixed_in(stage1, tmp_path, capsys, adapter):
    red, blue = picture(tmp_path), picture(tmp_path, "blue.png", "blue")
    records = []
    for i in range(30):
        image, colour = (red, "red") if i % 2 else (blue, "blue")
        records.append(
            {
                "image": image.name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
        records.append({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]})
    data = tmp_path / "mixed.jsonl"
    write_jsonl(data, records)
    out = tmp_path / "stage2"
    assert (
        main(
            [
                "vlm",
                "sft",
                "--init",
                str(stage1 / "final"),
                "--out",
                str(out),
                "--data",
                str(data),
                *adapter,
                "--lora-r",
                "4",
                "--vision.train=false",
                *VLM_TRAIN,
                "--train.max_steps=20",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "text-only" in err and "LoRA adapter merged" in err
    model, _, _ = load_vlm_dir(out / "final")
    before, _, _ = load_vlm_dir(stage1 / "final")
    changed = [
        n
        for n, t in model.language_model.state_dict().items()
        if not torch.equal(t, before.language_model.state_dict()[n])
    ]
    assert changed and all(
        any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        for n in changed
    )
    assert not torch.equal(model.multi_modal_projector.linear_1.weight, before.multi_modal_projector.linear_1.weight)
    assert all(torch.equal(t, before.vision_tower.state_dict()[n]) for n, t in model.vision_tower.state_dict().items())
    # the saved model sees: another picture gives other logits
    engine = Engine.from_dir(out / "final", device="cpu")
    ids = torch.tensor([engine.encode("<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n", images=1)])
    with torch.no_grad():
        assert not torch.allclose(
            engine.vlm(ids, engine.processor([red])), engine.vlm(ids, engine.processor([blue])), atol=1e-4
        )


def test_qlora_merges_into_the_full_precision_weights(stage1, tmp_path):
    """QLoRA trains over 4-bit weights, but the saved model is stage 1's full-precision weights plus the
    correction: with a learning rate too small to move the adapter, nothing else changes either."""
    out = tmp_path / "qlora"
    assert (
        main(
            [
                "vlm",
                "sft",
                "--init",
                str(stage1 / "final"),
                "--out",
                str(out),
                "--qlora",
                "--vision.train=false",
                *VLM_TRAIN,
                "--train.lr=1e-12",
                "--train.max_steps=2",
            ]
        )
        == 0
    )
    before, after = load_vlm_dir(stage1 / "final")[0].state_dict(), load_vlm_dir(out / "final")[0].state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-6


def test_the_pixel_cache_keys_by_picture_not_by_position(tmp_path):
    """Training and validation samples share one cache: sample 0 of each must still get its own picture."""
    from tinylm.train.vlm import ImageExample, PixelCache, image_batch

    processor = ImageProcessor(size=32)
    red, blue = picture(tmp_path), picture(tmp_path, "blue.png", "blue")
    cache = PixelCache(processor)
    train, val = [ImageExample([1, 2], [2, -100], [red])], [ImageExample([1, 2], [2, -100], [blue.read_bytes()])]
    assert torch.equal(image_batch(train, [0], 0, cache)["pixel_values"], processor([red]))
    assert torch.equal(image_batch(val, [0], 0, cache)["pixel_values"], processor([blue]))


def test_stage_errors_name_the_problem(stage1, base_and_chats, tmp_path, capsys):
    _, base, _ = base_and_chats
    assert main(["vlm", "sft", "--init", str(base), "--out", str(tmp_path / "a")]) == 2
    assert "not a vision-language model" in capsys.readouterr().err
    assert main(["vlm", "pretrain", "--init", str(base), "--out", str(tmp_path / "b"), "--lora.enabled=true"]) == 2
    assert "lora is for stage 2" in capsys.readouterr().err
    assert (
        main(["vlm", "sft", "--init", str(stage1 / "final"), "--out", str(tmp_path / "c"), "--vision.feature_layer=-2"])
        == 2
    )
    assert "feature_layer" in capsys.readouterr().err
    assert (
        main(
            [
                "vlm",
                "pretrain",
                "--init",
                str(base),
                "--out",
                str(tmp_path / "d"),
                "--data",
                "x.jsonl",
                "--coco",
                "y.json",
            ]
        )
        == 2
    )
    assert "not both" in capsys.readouterr().err


def test_stage1_with_a_local_clip_tower_frozen_and_layer_minus_two(base_and_chats, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, base, _ = base_and_chats
    tower_dir = tiny_clip_tower(tmp_path / "clip", layers=3)
    out = tmp_path / "run"
    assert (
        main(
            [
                "vlm",
                "pretrain",
                "--init",
                str(base),
                "--out",
                str(out),
                "--vision",
                str(tower_dir),
                "--feature-layer",
                "-2",
                *VLM_TRAIN,
                "--train.max_steps=6",
            ]
        )
        == 0
    )
    model, _, processor = load_vlm_dir(out / "final")
    tower = load_file(tower_dir / "model.safetensors")
    for name, tensor in model.vision_tower.state_dict().items():
        (saved,) = [t for key, t in tower.items() if key == name or key.endswith("." + name)]
        assert torch.equal(tensor, saved), name  # frozen by default: exactly the pretrained tower
    assert model.config.feature_layer == -2 and model.config.image_seq_length == 16
    assert processor.mean == pytest.approx(transformers.CLIPImageProcessor().image_mean)
    # stage 2 keeps the layer stage 1 chose, without being told again
    assert (
        main(
            [
                "vlm",
                "sft",
                "--init",
                str(out / "final"),
                "--out",
                str(tmp_path / "stage2"),
                *VLM_TRAIN,
                "--train.max_steps=2",
            ]
        )
        == 0
    )
    assert load_vlm_dir(tmp_path / "stage2" / "final")[0].config.feature_layer == -2
    # and transformers' LLaVA reads the directory with the same logits
    engine = Engine.from_dir(out / "final", device="cpu")
    ids = engine.encode("<image>\nWhat colour?", images=1)
    pixels = engine.processor([picture(tmp_path)])
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out / "final").eval()
    with torch.no_grad():
        assert torch.allclose(
            engine.vlm(torch.tensor([ids]), pixels),
            hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits,
            atol=1e-4,
        )


def test_chat_with_images(stage1, tmp_path, base_and_chats):
    engine = Engine.from_dir(stage1 / "final", device="cpu")
    red = picture(tmp_path)
    lines = iter(
        [
            "/image " + str(red),
            "/reset",
            "What is <image> here?",
            "/image " + str(tmp_path / "missing.png"),
            "/image " + str(red),
            "What colour is the shape?",
            "And now?",
            "/exit",
        ]
    )
    out = io.StringIO()
    history = run_chat(
        engine, settings=SamplingSettings(max_new_tokens=4, temperature=0), input_fn=lambda _: next(lines), output=out
    )
    text = out.getvalue()
    assert "/image PATH" in text and "does not exist" in text and f"image {red} goes with your next message" in text
    assert "cannot contain <image>" in text  # a literal tag is refused, not a crash; /reset dropped the first picture:
    assert len(history) == 4 and sum(len(m.get("images", [])) for m in history) == 1
    assert history[0]["content"] == "<image>\nWhat colour is the shape?" and len(history[0]["images"]) == 1
    assert history[2] == {"role": "user", "content": "And now?"}
    # --image with --prompts through the command line
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What colour is the shape?\nWhere is it?\n", encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    assert (
        main(
            [
                "chat",
                str(stage1 / "final"),
                "--image",
                str(red),
                "--prompts",
                str(prompts),
                "--output",
                str(answers),
                "--temperature",
                "0",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert len(answers.read_text().splitlines()) == 2
    # generate, with the picture's tag in the prompt
    assert (
        main(
            [
                "generate",
                str(stage1 / "final"),
                "--prompt",
                "<image>\nA picture of",
                "--image",
                str(red),
                "--temperature",
                "0",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert main(["generate", str(stage1 / "final"), "--prompt", "A picture of", "--image", str(red)]) == 2
    # a text model refuses pictures with a clear message
    _, base, _ = base_and_chats
    lines = iter(["/image " + str(red), "/exit"])
    out = io.StringIO()
    run_chat(Engine.from_dir(base, device="cpu"), input_fn=lambda _: next(lines), output=out)
    assert "no vision tower" in out.getvalue()


def test_vlm_quickstart_runs_every_part_and_reports_against_chance(base_and_chats, tmp_path, capsys):
    _, base, _ = base_and_chats
    out = tmp_path / "quick"
    assert (
        main(
            [
                "vlm",
                "quickstart",
                "--out",
                str(out),
                "--llm",
                str(base),
                *TINY_VISION,
                *VLM_TRAIN,
                "--train.max_steps=4",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    heldout = report["heldout"]
    assert set(heldout["by_kind"]) == {"colour", "shape", "count", "position", "follow-up"}
    assert heldout["by_kind"]["colour"]["chance"] == pytest.approx(1 / 6) and heldout["by_kind"]["count"][
        "chance"
    ] == pytest.approx(1 / 3)
    assert heldout["questions"] == sum(row["questions"] for row in heldout["by_kind"].values()) > 0
    assert set(report["seconds"]) >= {"stage 1 (captions)", "total"}
    printed = capsys.readouterr().out
    assert (
        "| colour |" in printed and (out / "report.md").is_file() and (out / "sft" / "final" / "config.json").is_file()
    )
    page = (out / "report" / "report.html").read_text(encoding="utf-8")  # tinylm report: both stages (--llm given)
    assert "Stage pretrain: vision-language" in page and "Held-out pictures, greedy answers (sft/heldout.json)" in page
    card = (out / "sft" / "final" / "README.md").read_text(encoding="utf-8")
    assert f"| held-out picture questions | accuracy | {heldout['accuracy']:.1%} |" in card


@pytest.mark.slow
def test_data_parallel_stage2_with_batches_that_hold_no_picture(stage1, tmp_path):
    """Two processes, one sample each per step, pictures and text-only samples alternating: a process whose
    batch has no picture still reduces the tower's and projector's (zero) gradients, so neither hangs."""
    import os
    import subprocess
    import sys

    red = picture(tmp_path)
    records = []
    for _i in range(24):
        records.append(
            {
                "image": red.name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": "It is red."},
                ],
            }
        )
        records.append({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]})
    data = tmp_path / "mixed.jsonl"
    write_jsonl(data, records)
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tinylm.cli",
        "vlm",
        "sft",
        "--init",
        str(stage1 / "final"),
        "--out",
        str(out),
        "--data",
        str(data),
        "--train-vision",
        "--device",
        "cpu",
        *VLM_TRAIN,
        "--train.batch_size=1",
        "--train.max_steps=6",
        "--train.log_every=1",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(logged(out)) == 6 and (out / "final" / "model.safetensors").is_file()
