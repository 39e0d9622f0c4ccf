"""Image loading and preprocessing: clear errors, and the same pixels as transformers' processor."""

import numpy as np
import pytest
import torch
from PIL import Image

from tinylm.data.builtin_images import image_scenes, render
from tinylm.image_processor import ImageError, ImageProcessor, load_image


def test_pixels_match_transformers_image_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    processor = ImageProcessor(size=32, mean=[0.48, 0.45, 0.40], std=[0.27, 0.26, 0.28])
    processor.save(tmp_path)
    theirs = transformers.AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)
    images = [render(s, 64) for s in image_scenes(0, 3)] + [
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ]
    expected = torch.as_tensor(theirs(images, return_tensors="np")["pixel_values"])
    ours = processor(images)
    assert ours.shape == (4, 3, 32, 32) and torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert ImageProcessor.load(tmp_path) == processor


def test_images_load_from_paths_bytes_and_pil_with_named_errors(tmp_path):
    picture = render(image_scenes(0, 1)[0])
    picture.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").size == picture.size
    assert load_image((tmp_path / "a.png").read_bytes()).tobytes() == picture.tobytes()
    assert load_image(picture.convert("L")).mode == "RGB"
    with pytest.raises(ImageError, match=r"data.jsonl:3: image .*missing.png does not exist"):
        load_image(tmp_path / "missing.png", "data.jsonl:3")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="cannot be read"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="expected a square"):
        ImageProcessor.from_hf_dict({"size": {"height": 32, "width": 48}})
