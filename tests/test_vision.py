"""The vision tower and projector: tinylm's ViT computes what transformers' SigLIP and CLIP vision
models compute, both ways, so pretrained towers load here and towers trained here load there."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tinylm.model.vision import CLIP, SIGLIP, Projector, VisionConfig, VisionTransformer
from tinylm.modeldir import load_vision_tower

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)


def hf_tower(kind: str, path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == SIGLIP:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY, vision_use_head=False))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    with torch.no_grad():  # randomise the norms and biases too, so a mix-up cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0, 0.1).add_(1.0 if name.endswith("weight") else 0.0)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kind", [SIGLIP, CLIP])
def test_a_transformers_tower_loads_here_with_the_same_outputs(kind, tmp_path):
    theirs = hf_tower(kind, tmp_path / "tower")
    ours = load_vision_tower(tmp_path / "tower").eval()
    assert ours.config.model_type == kind and ours.config.num_patches == 16
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(pixel_values=pixels, output_hidden_states=True)
        states = ours.hidden_states(pixels)
        assert len(states) == len(expected.hidden_states) == 4
        for a, b in zip(states, expected.hidden_states):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        if kind == SIGLIP:  # SigLIP normalises every patch at the end; CLIP only its pooled class token
            assert torch.allclose(ours.post_layernorm(states[-1]), expected.last_hidden_state, atol=1e-5)
        else:
            assert torch.allclose(ours.post_layernorm(states[-1][:, 0]), expected.pooler_output, atol=1e-5)
        features = ours(pixels, feature_layer=-2)  # LLaVA's usual choice: the layer before the last
    skip = 1 if kind == CLIP else 0  # CLIP's class token is not an image patch
    assert features.shape == (2, 16, 32) and torch.allclose(features, expected.hidden_states[-2][:, skip:], atol=1e-5)


def test_a_tower_made_here_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    ours = VisionTransformer(VisionConfig(**TINY)).eval()
    (tmp_path / "mine").mkdir()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "mine" / "model.safetensors")
    (tmp_path / "mine" / "config.json").write_text(json.dumps({**ours.config.to_hf_dict(), "vision_use_head": False}))
    theirs = transformers.SiglipVisionModel.from_pretrained(tmp_path / "mine").eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            theirs(pixel_values=pixels).last_hidden_state, ours.post_layernorm(ours(pixels)), atol=1e-5
        )


def test_projector_maps_patches_to_the_language_width_and_trains():
    tower, projector = VisionTransformer(VisionConfig(**TINY)), Projector(32, 48)
    out = projector(tower(torch.randn(2, 3, 32, 32)))
    assert out.shape == (2, 16, 48)
    out.square().mean().backward()
    assert tower.embeddings.patch_embedding.weight.grad is not None and projector.linear_1.weight.grad is not None


def test_bad_shapes_and_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="model_type"):
        VisionConfig(model_type="resnet")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": SIGLIP, **TINY}))
    save_file({"unrelated.weight": torch.zeros(2)}, tmp_path / "x" / "model.safetensors")
    with pytest.raises(ValueError, match="no vision weights"):
        load_vision_tower(tmp_path / "x")
