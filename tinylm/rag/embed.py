"""Dense retrieval's half: a local text encoder that turns passages and questions into unit vectors.

Any sentence-transformers or plain transformers encoder directory works (BERT, XLM-R, BGE, E5, GTE,
MiniLM, ...), read with transformers from local files only: a local directory, or a Hugging Face Hub id
fetched into the Hub's cache first (``tinylm.hub.models``). The vector is the encoder's last hidden
states pooled as the directory says: sentence-transformers' ``modules.json`` and ``1_Pooling/config.json``
name the mode (the first token's state, as BGE uses, or the mean over real tokens, as MiniLM and E5
use); a bare transformers directory gets the mean. Vectors are L2-normalised, so a dot product is the
cosine similarity. An encoder that wants a prefix on queries (E5's "query: ", BGE's instruction) gets it
from ``--query-prefix``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tinylm.hub.models import hub_reference, model_reference, resolve_model
from tinylm.io import DataError


class EmbedderError(DataError):
    """An encoder directory that cannot be used, with the reason."""


class Embedder:
    def __init__(self, directory: str | Path, device: str = "cpu", max_length: int = 512, query_prefix: str = ""):
        self.source = directory  # as given: a directory or a Hub id
        self.directory = resolve_model(directory)
        if not (self.directory / "config.json").is_file():
            raise EmbedderError(f"{self.directory / 'config.json'}: missing; --embedder takes an encoder's directory")
        try:
            import transformers
        except ImportError:
            raise EmbedderError(
                "dense retrieval reads the encoder with transformers: pip install transformers"
            ) from None
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(self.directory, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise EmbedderError(f"{self.directory}: cannot be loaded as a text encoder ({e})") from None
        self.pooling = pooling_mode(self.directory)
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.query_prefix = query_prefix
        self.device = device

    @property
    def reference(self) -> str:
        """What an index records to reload the encoder: its Hub id, or its directory's absolute path."""
        return model_reference(self.source)

    @property
    def name(self) -> str:
        """The encoder's name for people: its Hub id, or its directory's name."""
        reference = hub_reference(self.source)
        return reference[0] if reference else self.directory.resolve().name

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def fingerprint(self) -> str:
        """What identifies the encoder (its config and weight files' names and sizes): vectors made by
        another encoder are not comparable, and re-indexing with a new one re-embeds everything."""
        digest = hashlib.sha256((self.directory / "config.json").read_bytes())
        for path in sorted(self.directory.glob("*.safetensors")) + sorted(self.directory.glob("*.bin")):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        digest.update(f"{self.pooling}:{self.query_prefix}".encode())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"][..., None].float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def embed_query(self, question: str) -> np.ndarray:
        return self.embed([self.query_prefix + question])[0]


def pooling_mode(directory: Path) -> str:
    """ "cls" or "mean", from a sentence-transformers layout's pooling config (mean without one)."""
    modules = directory / "modules.json"
    if not modules.is_file():
        return "mean"
    for module in json.loads(modules.read_text(encoding="utf-8")):
        if module.get("type", "").endswith("Pooling"):
            config = directory / module.get("path", "") / "config.json"
            if config.is_file():
                settings = json.loads(config.read_text(encoding="utf-8"))
                if settings.get("pooling_mode_cls_token"):
                    return "cls"
                if settings.get("pooling_mode_mean_tokens", True):
                    return "mean"
                raise EmbedderError(f"{config}: a pooling mode other than cls or mean tokens is not supported")
    return "mean"
