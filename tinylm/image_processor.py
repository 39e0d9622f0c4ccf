"""Images in: reading a picture and turning it into the tensor a vision tower takes.

    processor = ImageProcessor(size=64)            # resize to 64×64, scale to [0, 1], normalise
    pixels = processor([load_image("cat.png")])    # [1, 3, 64, 64] float32
    processor.save(model_dir)                      # preprocessor_config.json, as transformers writes it

The preprocessing is saved with the model (``preprocessor_config.json`` in the format of transformers'
SigLIP / CLIP image processors), so inference prepares an image exactly as training did, and
transformers' ``AutoImageProcessor`` reads the same settings (tests/test_image_processor.py checks the pixels
agree).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tinylm.io import check_choice, read_json

RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's numbering, which transformers' configs use
PROCESSOR_FILE = "preprocessor_config.json"


class ImageError(ValueError):
    """An image is missing or cannot be read; the message names it (and the sample it belongs to)."""


def load_image(source, where: str | None = None):
    """A PIL RGB image from a path, raw bytes, or a PIL image. ``where`` names the sample in errors."""
    from PIL import Image, UnidentifiedImageError  # Pillow, loaded when a picture is first read

    label = f"{where}: " if where else ""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        if isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageError(f"{label}image {path} does not exist")
            image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(
            f"{label}image {source if not isinstance(source, (bytes, bytearray)) else '(bytes)'} cannot be read ({e})"
        ) from None
    return image.convert("RGB")


@dataclass
class ImageProcessor:
    """Resize to ``size``×``size``, scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel."""

    size: int = 64
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])  # SigLIP's; CLIP uses its dataset's
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resample: str = "bicubic"
    processor_type: str = "SiglipImageProcessor"

    def __post_init__(self):
        check_choice("resample", self.resample, RESAMPLE)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std: expected three numbers each, std > 0 (got {self.mean}, {self.std})")

    def __call__(self, images) -> torch.Tensor:
        """PIL images (or paths, or bytes) → float32 [n, 3, size, size]."""
        from PIL import Image  # Pillow, loaded when a picture is first read

        arrays = []
        for image in images:
            image = load_image(image).resize((self.size, self.size), Image.Resampling(RESAMPLE[self.resample]))
            pixels = np.asarray(image, dtype=np.float32) / 255.0
            arrays.append((pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def to_hf_dict(self) -> dict:
        return {
            "image_processor_type": self.processor_type,
            "do_resize": True,
            "size": {"height": self.size, "width": self.size},
            "resample": RESAMPLE[self.resample],
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = PROCESSOR_FILE) -> ImageProcessor:
        """From a SigLIP- or CLIP-style preprocessor_config.json (square resize; CLIP's shortest-edge
        resize and centre crop to the same size give a square too, and are read as that square)."""
        size = hf.get("size", {})
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        if not side or (isinstance(size, dict) and size.get("width", side) != side):
            raise ValueError(f"{where}: size {size!r}: expected a square (height = width, or shortest_edge)")
        names = {v: k for k, v in RESAMPLE.items()}
        if hf.get("resample", 3) not in names:
            raise ValueError(f"{where}: resample {hf.get('resample')!r}: expected one of {sorted(names)}")
        return cls(
            size=int(side),
            mean=list(hf.get("image_mean", [0.5] * 3)),
            std=list(hf.get("image_std", [0.5] * 3)),
            resample=names[hf.get("resample", 3)],
            processor_type=hf.get("image_processor_type", "SiglipImageProcessor"),
        )

    def save(self, directory: str | Path) -> None:
        Path(directory, PROCESSOR_FILE).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> ImageProcessor:
        path = Path(directory) / PROCESSOR_FILE
        return cls.from_hf_dict(read_json(path), str(path))
