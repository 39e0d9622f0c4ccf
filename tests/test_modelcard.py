"""Model cards: every saved model directory has a README.md that the Hub's parser reads, with the facts
of the stage that made it; the card stays out of the manifest, and transformers still loads the directory."""

import json
import re

import pytest
import torch
import yaml
from conftest import TRAIN

from tinylm.chat_template import get_template
from tinylm.cli import main
from tinylm.io import verify_manifest
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.modelcard import CardFacts, add_evaluation, read_card_metadata
from tinylm.modeldir import load_model_dir, save_model_dir
from tinylm.tokenizer import train_tokenizer


def chat_tokenizer():
    return get_template("chatml").attach(train_tokenizer(["hello world, 你好世界。Once upon a time."] * 20, 300))


def tiny_model(vocab_size=300):
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2))


def card_of(directory) -> tuple[dict, str]:
    """(the YAML header as the Hub's parser reads it, the markdown after it)."""
    text = (directory / "README.md").read_text(encoding="utf-8")
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        header, body = re.match(r"---\n(.*?)\n---\n(.*)", text, flags=re.S).groups()
        return yaml.safe_load(header), body
    card = ModelCard.load(directory / "README.md")
    return card.data.to_dict(), card.text


def test_a_card_with_the_stages_facts_outside_the_manifest(tmp_path):
    facts = CardFacts(
        stage="supervised fine-tuning (SFT)",
        tags=["sft"],
        base_model="Qwen/Qwen2.5-0.5B-Instruct",  # a Hub id (no such local directory): named in the metadata
        relation="finetune",
        datasets=["tinylm built-in world (seed 3)"],
        language=["en", "zh"],
        training={"steps": 300, "tokens": 1_199_042, "seconds": 524.8, "train_loss": 0.041, "val_loss": 0.047},
        settings={"learning rate": "0.001"},
    )
    final, model = tmp_path / "chat" / "final", tiny_model()
    save_model_dir(model, final, chat_tokenizer(), card=facts)

    meta, body = card_of(final)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en", "zh"]
    assert meta["datasets"] == ["tinylm built-in world (seed 3)"]
    assert meta["tags"] == ["tinylm", "llama", "sft", "chat"]
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert body.lstrip().startswith("# chat\n")  # the run's name, not "final"
    assert "| optimizer steps | 300 |" in body and "| tokens seen | 1,199,042 |" in body
    assert "| final validation loss | 0.0470 |" in body and "| learning rate | 0.001 |" in body
    assert (
        f"| parameters | {model.num_parameters():,} |" in body
        and "| layers | 2 |" in body
        and "| vocabulary | 300 tokens |" in body
    )
    assert f'AutoModelForCausalLM.from_pretrained("{final.as_posix()}")' in body
    assert "apply_chat_template" in body and f"tinylm chat {final.as_posix()}" in body

    # the manifest leaves the card out: editing it (as people do) does not stop the model loading
    assert "README.md" not in (final / "SHA256SUMS").read_text()
    (final / "README.md").write_text((final / "README.md").read_text() + "\nMy notes.\n", encoding="utf-8")
    assert verify_manifest(final)
    assert load_model_dir(final)[1].chat_template


def test_every_directory_has_a_card_even_without_facts(tmp_path):
    save_model_dir(tiny_model(64), tmp_path / "m")
    meta, body = card_of(tmp_path / "m")
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["tinylm", "llama"]
    assert "language" not in meta and "datasets" not in meta and "base_model" not in meta
    assert "## Model" in body and "## Training" not in body and "## Evaluation" not in body
    assert "tinylm generate" in body and "tinylm chat" not in body  # no chat template, no chat


def test_transformers_loads_the_directory_as_the_card_shows(tmp_path):
    pytest.importorskip("transformers")
    final = tmp_path / "run" / "final"
    save_model_dir(tiny_model(), final, chat_tokenizer(), card=CardFacts(stage="pretraining"))
    snippet = re.search(r"```python\n(.*?)```", (final / "README.md").read_text(encoding="utf-8"), flags=re.S)[1]
    exec(snippet, {})  # loads the model and tokenizer, applies the chat template, generates and decodes


def test_the_base_model_names_a_hub_id_and_lends_its_license(tmp_path):
    base = tmp_path / "base"
    save_model_dir(tiny_model(), base, chat_tokenizer())
    card = (base / "README.md").read_text(encoding="utf-8")
    (base / "README.md").write_text(card.replace("license: apache-2.0", "license: llama3.2\nlanguage: de"), "utf-8")
    save_model_dir(tiny_model(), tmp_path / "local", card=CardFacts(base_model=str(base), relation="finetune"))
    meta, body = card_of(tmp_path / "local")
    assert "base_model" not in meta and f"It started from `{base}`." in body  # a local path only in the text
    assert meta["license"] == "llama3.2" and meta["language"] == ["de"]  # inherited from the base's card

    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "meta-llama/Llama-3.2-1B"}))
    save_model_dir(tiny_model(), tmp_path / "named", card=CardFacts(base_model=str(base), relation="finetune"))
    assert card_of(tmp_path / "named")[0]["base_model"] == "meta-llama/Llama-3.2-1B"
    with pytest.raises(ValueError, match="relation 'child'"):
        CardFacts(relation="child")


def test_evaluations_are_added_to_the_card_by_task(tmp_path):
    save_model_dir(tiny_model(64), tmp_path / "m", card=CardFacts(stage="pretraining"))
    results = {"model": "m", "tasks": {"mmlu": {"acc": 0.25, "acc_norm": 0.2617, "items": 100, "chance": 0.25}}}
    assert add_evaluation(tmp_path / "m", results["tasks"], "tinylm eval")
    assert add_evaluation(tmp_path / "m", {"held-out facts": {"accuracy": 0.746, "items": 334}}, "the quickstart")
    assert add_evaluation(tmp_path / "m", {"mmlu": {"acc": 0.3, "items": 100}}, "tinylm eval, again")
    _, body = card_of(tmp_path / "m")
    assert "| mmlu | acc | 30.0% | 100 | tinylm eval, again |" in body and "acc_norm" not in body  # replaced
    assert "| held-out facts | accuracy | 74.6% | 334 | the quickstart |" in body  # kept
    assert body.index("## Evaluation") < body.index("## How to use")
    assert verify_manifest(tmp_path / "m")
    assert not add_evaluation(tmp_path, {"x": {"acc": 1.0}}, "nowhere")  # no card: nothing written


def test_training_stages_merge_and_quantize_write_their_facts(base_and_chats, tmp_path):
    _, base, chats = base_and_chats
    meta = read_card_metadata(base)  # the fixture's pretraining run
    assert meta["tags"] == ["tinylm", "llama", "pretraining"] and meta["datasets"] == ["text.jsonl"]
    assert "| optimizer steps | 20 |" in (base / "README.md").read_text(encoding="utf-8")

    steps = ["--train.max_steps=2", "--train.eval_every=2", "--train.eval_batches=1"]
    common = ["--init", str(base), "--data", str(chats), *TRAIN, *steps]
    assert main(["sft", *common, "--out", str(tmp_path / "chat")]) == 0
    meta, body = card_of(tmp_path / "chat" / "final")
    assert meta["tags"] == ["tinylm", "llama", "sft", "chat"] and meta["datasets"] == ["chats.jsonl"]
    assert "language" not in meta and "base_model" not in meta  # the user's file; a local base
    assert f"It started from `{base}`." in body and "| optimizer steps | 2 |" in body
    assert "final validation loss" in body and "| batch | 8 rows of 64 tokens |" in body

    assert main(["sft", *common, "--lora", "--lora-r", "4", "--out", str(tmp_path / "lora")]) == 0
    meta, body = card_of(tmp_path / "lora" / "final")
    assert meta["library_name"] == "peft" and {"lora", "peft"} <= set(meta["tags"])
    assert "| LoRA rank / alpha | 4 /" in body and "AutoPeftModelForCausalLM" in body and "tinylm merge" in body

    assert main(["merge", str(base), str(tmp_path / "lora" / "final"), str(tmp_path / "merged")]) == 0
    meta, body = card_of(tmp_path / "merged")
    assert meta["datasets"] == ["chats.jsonl"] and "merged" in meta["tags"]  # the adapter's data
    assert "merging a LoRA adapter" in body and verify_manifest(tmp_path / "merged")

    assert main(["quantize", str(tmp_path / "chat" / "final"), "--out", str(tmp_path / "int8"), "--bits", "8"]) == 0
    meta, body = card_of(tmp_path / "int8")
    assert "quantized" in meta["tags"] and meta["datasets"] == ["chats.jsonl"]
    assert "| quantization | int8 weights" in body and "compressed-tensors" in body
    load_model_dir(tmp_path / "int8")


def test_a_vision_language_directory_has_its_card(tmp_path):
    from tinylm.image_processor import ImageProcessor
    from tinylm.model.vision import SIGLIP, VisionConfig
    from tinylm.model.vlm import IMAGE_TOKEN, VisionLanguageModel, VLMConfig
    from tinylm.modeldir import load_vlm_dir, save_vlm_dir

    tokenizer = chat_tokenizer()
    text = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision = VisionConfig(
        model_type=SIGLIP,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    model = VisionLanguageModel(VLMConfig(vision=vision, text=text, image_token_id=tokenizer.token_to_id(IMAGE_TOKEN)))
    save_vlm_dir(model, tmp_path / "vlm", tokenizer, ImageProcessor(size=16), CardFacts(stage="vision-language"))
    meta, body = card_of(tmp_path / "vlm")
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["tags"][:3] == ["tinylm", "llava", "llama"]
    assert (
        "LlavaForConditionalGeneration" in body and "--image picture.png" in body and "| vision tower | siglip" in body
    )
    load_vlm_dir(tmp_path / "vlm")
