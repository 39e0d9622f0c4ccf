"""The LLaVA-style model: image tokens become image features, and the LLaVA layout gives the same
logits in transformers' LlavaForConditionalGeneration, both ways."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinylm.model.llama import ModelConfig
from tinylm.model.vision import CLIP, SIGLIP, VisionConfig
from tinylm.model.vlm import VisionLanguageModel, VLMConfig, llava_state_dict, vlm_from_state_dict

IMAGE = 99  # the image token's id


def tiny_config(kind=SIGLIP, layer=-1) -> VLMConfig:
    vision = VisionConfig(
        model_type=kind,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="gelu_pytorch_tanh" if kind == SIGLIP else "quick_gelu",
    )
    text = ModelConfig(
        vocab_size=100,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return VLMConfig(vision=vision, text=text, image_token_id=IMAGE, feature_layer=layer)


def ids_with_images(images: int, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(0, 90, (3,), generator=g)]
    for _ in range(images):
        parts += [torch.full((16,), IMAGE), torch.randint(0, 90, (4,), generator=g)]
    return torch.cat(parts)[None]


def test_image_tokens_are_replaced_by_image_features_in_order():
    torch.manual_seed(0)
    model = VisionLanguageModel(tiny_config()).eval()
    ids, pixels = ids_with_images(2), torch.randn(2, 3, 32, 32)
    embeds = model.embed(ids, pixels)
    features = model.image_features(pixels)
    positions = (ids[0] == IMAGE).nonzero().flatten()
    assert torch.equal(embeds[0, positions[:16]], features[0]) and torch.equal(embeds[0, positions[16:]], features[1])
    text = ids[0] != IMAGE
    assert torch.equal(embeds[0, text], model.language_model.model.embed_tokens(ids)[0, text])
    with pytest.raises(ValueError, match="32 image tokens, but 1 image"):
        model.embed(ids, pixels[:1])
    with pytest.raises(ValueError, match="no image was given"):
        model.embed(ids)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 100)  # text only: no pixels, no image tokens


def test_the_loss_trains_tower_projector_and_language_model():
    model = VisionLanguageModel(tiny_config())
    ids = ids_with_images(1)
    labels = torch.where(ids == IMAGE, -100, ids)
    model(ids[:, :-1], torch.randn(1, 3, 32, 32), labels=labels[:, 1:]).backward()
    for part in (model.vision_tower, model.multi_modal_projector, model.language_model):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "kind,layer,act,bias", [(SIGLIP, -1, "gelu", True), (CLIP, -2, "gelu", True), (SIGLIP, -1, "silu", False)]
)
def test_our_llava_directory_loads_in_transformers_with_the_same_logits(kind, layer, act, bias, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tiny_config(kind, layer)
    config.projector_act, config.projector_bias = act, bias
    model = VisionLanguageModel(config).eval()
    assert (model.multi_modal_projector.linear_1.bias is not None) == bias
    read_back = VLMConfig.from_hf_dict(config.to_hf_dict())
    assert (read_back.projector_act, read_back.projector_bias) == (act, bias)
    (tmp_path / "vlm").mkdir()
    save_file(llava_state_dict(model), tmp_path / "vlm" / "model.safetensors")
    (tmp_path / "vlm" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "vlm").eval()
    ids, pixels = ids_with_images(2), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=pixels).logits
        assert torch.allclose(model(ids, pixels), expected, atol=1e-4), (model(ids, pixels) - expected).abs().max()


def test_a_transformers_llava_loads_here_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny_config()
    hf_config = transformers.LlavaConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(1)
    theirs = transformers.LlavaForConditionalGeneration(hf_config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    loaded = VLMConfig.from_hf_dict(json.loads((tmp_path / "hf" / "config.json").read_text()))
    ours = vlm_from_state_dict(loaded, load_file(tmp_path / "hf" / "model.safetensors")).eval()
    ids, pixels = ids_with_images(1, seed=3), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(ids, pixels), theirs(input_ids=ids, pixel_values=pixels).logits, atol=1e-4)
