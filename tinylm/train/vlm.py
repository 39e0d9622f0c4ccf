"""A vision-language model, trained in two stages on the one training loop (LLaVA's recipe).

    tinylm vlm pretrain --init runs/quickstart/sft/final --out runs/vlm/pretrain    # stage 1
    tinylm vlm sft --init runs/vlm/pretrain/final --out runs/vlm/sft              # stage 2

Stage 1 (``pretrain``) joins a language model and a vision encoder with a new projector and teaches the
projector, on image–caption pairs, to turn patch features into "words" the frozen language model
already reads. The encoder learns too with ``vision.train`` (a built-in ViT starts from random weights,
so it must); a pretrained CLIP/SigLIP tower is usually left frozen.

Stage 2 (``sft``) starts from stage 1's model and fine-tunes on image conversations (questions and
answers): the projector and the language model learn, every weight or a LoRA adapter (which is merged
into the saved model, so the result is one LLaVA directory); the encoder learns with ``vision.train``.

Each sample is one conversation with its images. Every ``<image>`` tag becomes the encoder's patch
count of placeholder tokens, the conversation is encoded with the chat template (loss on the
assistant's tokens only), and a batch holds the rows padded to the longest, plus the pixels of all
their images in order (none for text-only samples, which mix in freely). The objective is the usual
next-token loss, computed by the vision-language model.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tinylm.chat_template import get_template
from tinylm.config import ConfigError, LoRASection, TrainConfig, resolve_source, save_config
from tinylm.data.builtin_images import write_image_corpus
from tinylm.data.chat_rows import encode_for_training
from tinylm.data.image_chat import read_coco_captions, read_image_conversations
from tinylm.data.walk import Batches
from tinylm.eval.image_questions import heldout_report, render_heldout
from tinylm.image_processor import PROCESSOR_FILE, ImageProcessor, load_image
from tinylm.infer.engine import Engine
from tinylm.io import atomic_write_json
from tinylm.model.lora import merge_lora, restore_full_precision
from tinylm.model.loss import IGNORE
from tinylm.model.vision import PROJECTOR_ACTIVATIONS, SIGLIP, VisionConfig, VisionTransformer
from tinylm.model.vlm import IMAGE_TAG, VisionLanguageModel, VLMConfig, ensure_image_token, expand_image_tags
from tinylm.modelcard import CardFacts, add_evaluation
from tinylm.modeldir import is_vlm_dir, load_vision_tower, load_vlm_dir, resolve_model, save_vlm_dir
from tinylm.train.objectives import NextTokenLoss
from tinylm.train.stage import (
    check_context,
    load_to_fine_tune,
    loss_evaluator,
    prepare_lora,
    run_card,
    split_validation,
    stage_run,
)
from tinylm.train.trainer import FitResult, Task, fit

# -- the stage's config (the YAML sections and --section.key=value keys it takes) ----------------


@dataclass
class VisionSection:
    """The vision encoder of ``tinylm vlm pretrain``: a pretrained tower from a local directory, or a new
    built-in ViT of the shape below (trained from scratch: with ``train`` unset, it trains in stage 1)."""

    tower: str | None = None  # a local SigLIP/CLIP directory (transformers layout); None: a new built-in ViT
    image_size: int = 64  # the built-in ViT's shape (ignored with a tower, which brings its own)
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    image_mean: list[float] | None = None  # the built-in ViT's pixel normalisation, per channel in [0, 1]; None: 0.5
    image_std: list[float] | None = None  # (SigLIP's); a tower brings its own
    feature_layer: int | None = None  # which layer's output feeds the projector (-1 the last, -2 the one before); None:
    # -1 for a new model, and the loaded model's own in stage 2
    train: bool | None = None  # train the encoder too; None: only a new built-in ViT (which starts from random weights)
    projector_act: str = (
        "gelu"  # the projector (Linear → act → Linear): gelu, gelu_pytorch_tanh, quick_gelu, relu or silu
    )
    projector_bias: bool = True

    def __post_init__(self):
        if self.projector_act not in PROJECTOR_ACTIVATIONS:
            raise ConfigError(
                f"projector_act: expected one of {', '.join(PROJECTOR_ACTIVATIONS)}, got {self.projector_act!r}"
            )


@dataclass
class ImageDataConfig:
    # builtin (the generated pictures) | files (image conversations) | coco (caption annotations);
    # unset: files if any are given, else builtin
    source: str | None = None
    # files: LLaVA / MiniMind-V / LLaMA-Factory / XTuner .json(l) / .parquet; coco: captions_*.json;
    # records without images (text-only conversations) may be mixed in with files
    files: list[str] = field(default_factory=list)
    image_root: str | None = None  # relative image paths are looked up here (default: beside the data file)
    coco_images: str | None = None  # coco: the image folder (default: found beside the annotations)
    caption_prompt: str = "Describe the picture."  # the user turn of caption records and COCO captions
    template: str = "chatml"  # chatml | vicuna | llama-chinese | raw
    skip_bad: bool = False  # skip invalid samples (and report how many) instead of stopping
    val_fraction: float = 0.02
    builtin_seed: int = 0
    builtin_images: int = 2000  # training pictures of the built-in corpus (captions for stage 1, questions for stage 2)

    def __post_init__(self):
        resolve_source(self, ("builtin", "files", "coco"))


@dataclass
class VLMStageConfig:
    """``tinylm vlm pretrain`` (stage 1: the projector learns, the language model is frozen) and
    ``tinylm vlm sft`` (stage 2: the projector and the language model learn, fully or with LoRA)."""

    init_from: str | None = None  # stage 1: a language model directory (or a VLM to continue); stage 2: a stage-1 VLM
    vision: VisionSection = field(default_factory=VisionSection)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRASection = field(default_factory=LoRASection)


STAGES = ("pretrain", "sft")
PIXEL_CACHE_BYTES = 1 << 30  # preprocessed images kept in memory between epochs


# -- the model ----------------------------------------------------------------------------------


def build_model(cfg: VLMStageConfig, stage: str):
    """(VisionLanguageModel in fp32, tokenizer, image processor) that ``stage`` starts from."""
    if not cfg.init_from:
        what = (
            "the language model to give eyes to"
            if stage == "pretrain"
            else "the stage-1 model (tinylm vlm pretrain's final/)"
        )
        raise ConfigError(f"init_from is not set: give {what} (--init DIR)")
    if is_vlm_dir(cfg.init_from):
        if cfg.vision.tower:
            raise ConfigError(f"vision.tower is set, but {cfg.init_from} already has its vision tower: drop --vision")
        model, tokenizer, processor = load_vlm_dir(cfg.init_from)
        if cfg.vision.feature_layer is not None and cfg.vision.feature_layer != model.config.feature_layer:
            raise ConfigError(
                f"vision.feature_layer is {cfg.vision.feature_layer}, but {cfg.init_from} was built on layer "
                f"{model.config.feature_layer}; it is fixed once stage 1 has trained the projector on it"
            )
        return model.float().train(), tokenizer, processor
    if stage == "sft":
        raise ConfigError(
            f"{cfg.init_from}: not a vision-language model (config.json is not llava); stage 2 starts from "
            "stage 1's output: run tinylm vlm pretrain first"
        )
    language_model, tokenizer = load_to_fine_tune(cfg.init_from, "vlm pretrain")
    tokenizer, image_id = ensure_image_token(language_model, tokenizer)
    if cfg.vision.tower:
        tower = load_vision_tower(cfg.vision.tower)
        directory = resolve_model(cfg.vision.tower)  # (a Hub id: its snapshot in the cache)
        processor = (
            ImageProcessor.load(directory)
            if (directory / PROCESSOR_FILE).is_file()
            else ImageProcessor(size=tower.config.image_size)
        )
    else:
        v = cfg.vision
        torch.manual_seed(cfg.train.seed)
        tower = VisionTransformer(
            VisionConfig(
                model_type=SIGLIP,
                image_size=v.image_size,
                patch_size=v.patch_size,
                hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers,
                num_attention_heads=v.num_attention_heads,
            )
        )
        normalise = {key: value for key, value in (("mean", v.image_mean), ("std", v.image_std)) if value}
        processor = ImageProcessor(size=v.image_size, **normalise)
    if processor.size != tower.config.image_size:
        raise ConfigError(
            f"{cfg.vision.tower}: the image processor resizes to {processor.size} px but the tower takes "
            f"{tower.config.image_size} px"
        )
    layers, feature_layer = (
        tower.config.num_hidden_layers,
        -1 if cfg.vision.feature_layer is None else cfg.vision.feature_layer,
    )
    if not -layers - 1 <= feature_layer <= layers:
        raise ConfigError(
            f"vision.feature_layer {feature_layer}: the tower has {layers} layers (use -1 … -{layers}, or 0 … {layers})"
        )
    config = VLMConfig(
        vision=tower.config,
        text=language_model.config,
        image_token_id=image_id,
        feature_layer=feature_layer,
        projector_act=cfg.vision.projector_act,
        projector_bias=cfg.vision.projector_bias,
    )
    torch.manual_seed(cfg.train.seed)  # the projector's random start
    return VisionLanguageModel(config, language_model=language_model, vision_tower=tower).train(), tokenizer, processor


def set_trainable(model: VisionLanguageModel, stage: str, train_vision: bool) -> None:
    """Stage 1: the projector (and the encoder with ``train_vision``); stage 2: the language model too."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if train_vision:
        model.vision_tower.requires_grad_(True)
        model.freeze_unused_vision_layers()
    if stage == "sft":
        model.language_model.requires_grad_(True)


def describe_trainable(model: VisionLanguageModel) -> str:
    parts = {
        "vision tower": model.vision_tower,
        "projector": model.multi_modal_projector,
        "language model": model.language_model,
    }
    counts = []
    for name, module in parts.items():
        total = sum(p.numel() for p in module.parameters())
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        counts.append(f"{name} {trained:,} of {total:,}" + (" (frozen)" if not trained else ""))
    return "trainable: " + "; ".join(counts)


# -- the data -----------------------------------------------------------------------------------


def image_conversations(cfg: VLMStageConfig, stage: str, run_dir: Path) -> tuple[list, str]:
    """The samples of this stage (ImageConversation: messages with ``<image>`` tags + images) and a
    line saying where they came from."""
    data = cfg.data
    if data.source == "builtin":
        paths = builtin_corpus(cfg, run_dir)
        files = [paths["captions" if stage == "pretrain" else "questions"]]
        found, report = read_image_conversations(files)
        return (
            found,
            f"built-in pictures: {len(found):,} {'captions' if stage == 'pretrain' else 'questions'} from "
            f"{files[0].parent}",
        )
    if data.source == "files":  # the config checked the source and its files (resolve_source)
        found, report = read_image_conversations(
            data.files, image_root=data.image_root, skip_bad=data.skip_bad, prompt=data.caption_prompt
        )
        return found, report.summary()
    found = [c for f in data.files for c in read_coco_captions(f, data.coco_images, prompt=data.caption_prompt)]
    return found, f"COCO captions: {len(found):,} from {', '.join(data.files)}"


def builtin_corpus(cfg: VLMStageConfig, run_dir: Path) -> dict[str, Path]:
    return write_image_corpus(run_dir / "data" / "builtin", seed=cfg.data.builtin_seed, train=cfg.data.builtin_images)


@dataclass
class ImageExample:
    """One sample as training data: ids, next-token labels (IGNORE off the assistant's tokens), images."""

    input_ids: list[int]
    labels: list[int]
    images: list  # paths or bytes, one per image of the sample, in order

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_samples(
    samples, template, tokenizer, image_seq_length: int, seq_len: int
) -> tuple[list[ImageExample], int, list[str]]:
    """Encode each sample with its image tags expanded; (examples, how many were too long, a few of
    their sources). A sample is never cut: that could separate image tokens from their image."""
    examples, too_long, where = [], 0, []
    for sample in samples:
        images = [m["content"].count(IMAGE_TAG) for m in sample.messages]
        messages = [
            {"role": m["role"], "content": expand_image_tags(m["content"], n, image_seq_length, where=sample.source)}
            for m, n in zip(sample.messages, images)
        ]
        ids, mask = template.encode(tokenizer, messages)
        if len(ids) > seq_len + 1:
            too_long += 1
            where += [sample.source] if len(where) < 3 else []
            continue
        encoded = encode_for_training(ids, mask)
        examples.append(ImageExample(encoded.input_ids, encoded.labels, list(sample.images)))
    return examples, too_long, where


class PixelCache:
    """Preprocessed images by source (a path, or a digest of the bytes), kept while they fit in
    ``budget`` bytes, so later epochs skip decoding and resizing."""

    def __init__(self, processor, budget: int = PIXEL_CACHE_BYTES):
        self.processor, self.room = processor, budget // (3 * processor.size * processor.size * 4)
        self.store: dict[str | bytes, torch.Tensor] = {}

    def pixels(self, source, where: str) -> torch.Tensor:
        key = hashlib.sha256(source).digest() if isinstance(source, (bytes, bytearray)) else str(Path(source).resolve())
        found = self.store.get(key)
        if found is None:
            found = self.processor([load_image(source, where)])[0]
            if len(self.store) < self.room:
                self.store[key] = found
        return found


def image_batch(examples: list[ImageExample], picks, pad_id: int, cache: PixelCache) -> dict:
    """Rows padded on the right to the longest; the pixels of their images in row order."""
    longest = max(len(examples[i]) for i in picks)
    input_ids = np.full((len(picks), longest), pad_id, dtype=np.int64)
    labels = np.full((len(picks), longest), IGNORE, dtype=np.int64)
    pixels = []
    for row, index in enumerate(picks):
        example = examples[index]
        input_ids[row, : len(example)] = example.input_ids
        labels[row, : len(example)] = example.labels
        pixels += [cache.pixels(image, f"sample {index}") for image in example.images]
    size = cache.processor.size
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size),
        "lengths": torch.tensor([len(examples[i]) for i in picks]),
    }


def real_tokens(batch: dict) -> int:
    return int(batch["lengths"].sum())


# -- the recipe ---------------------------------------------------------------------------------


def train_vlm(
    cfg: VLMStageConfig, out_dir: str | Path, stage: str, *, resume: bool = False, callbacks=()
) -> tuple[Path, FitResult]:
    """Stage ``pretrain`` or ``sft``: build or load the model, encode the samples, train, save
    ``out_dir/final`` (a LLaVA directory). On the built-in pictures stage 2 also answers the held-out
    questions and writes ``heldout.json``."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected pretrain or sft")
    if stage == "pretrain" and cfg.lora.enabled:
        raise ConfigError("lora is for stage 2 (tinylm vlm sft): in stage 1 the language model is frozen anyway")
    run_dir = Path(out_dir)
    with stage_run(run_dir, cfg.train.device) as dist:
        model, tokenizer, processor = build_model(cfg, stage)
        check_context(cfg.train.seq_len, model.config.text)
        template = get_template(cfg.data.template)
        tokenizer = template.attach(tokenizer)
        model.config.text.eos_token_id = template.stop_token_ids(tokenizer)
        new_tower = stage == "pretrain" and not cfg.vision.tower and not is_vlm_dir(cfg.init_from)
        set_trainable(model, stage, cfg.vision.train if cfg.vision.train is not None else new_tower)
        lora = prepare_lora(model.language_model, cfg.lora, cfg.train.seed, dist.is_main) if stage == "sft" else None

        if dist.is_main and cfg.data.source == "builtin":
            builtin_corpus(cfg, run_dir)  # written once, then read by every process
        dist.barrier()
        samples, summary = image_conversations(cfg, stage, run_dir)
        train_set, val_set = split_validation(samples, cfg.data.val_fraction, cfg.train.seed)
        n = model.config.image_seq_length
        train_examples, too_long, where = encode_samples(train_set, template, tokenizer, n, cfg.train.seq_len)
        val_examples, _, _ = encode_samples(val_set, template, tokenizer, n, cfg.train.seq_len)
        if not train_examples:
            raise ConfigError(
                f"no sample fits in train.seq_len={cfg.train.seq_len} tokens (an image takes {n}; e.g. "
                f"{', '.join(where)}): "
                "raise train.seq_len"
            )
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
            with_images = sum(bool(e.images) for e in train_examples)
            print(f"data: {summary}", file=sys.stderr)
            print(
                f"train: {len(train_examples):,} samples ({with_images:,} with images, "
                f"{len(train_examples) - with_images:,} text-only); "
                f"validation: {len(val_examples):,}; each image is {n} tokens"
                + (f"; {too_long:,} skipped, longer than train.seq_len (e.g. {', '.join(where)})" if too_long else ""),
                file=sys.stderr,
            )
            print(
                f"model: {model.config.vision.model_type} tower (layer {model.config.feature_layer}) → projector → "
                f"{model.config.text.model_type}; {describe_trainable(model)}",
                file=sys.stderr,
            )
        pad, cache = tokenizer.eos_id, PixelCache(processor)
        collate = partial(image_batch, train_examples, pad_id=pad, cache=cache)
        batches = Batches.for_run(len(train_examples), collate, cfg.train, dist, "samples")
        evaluate = loss_evaluator(
            len(val_examples),
            lambda picks: image_batch(val_examples, picks, pad, cache),
            cfg.train.batch_size,
            cfg.train.eval_batches,
        )
        task = Task(
            model=model, batches=batches, objective=NextTokenLoss(), evaluate=evaluate, tokens_per_batch=real_tokens
        )
        result = fit(task, cfg.train, run_dir, dist, resume=resume, callbacks=callbacks)
        model = result.model  # whole again (a sharded run gathers it on the main process)
        final = run_dir / "final"
        if dist.is_main and not result.interrupted:
            if lora is not None:
                if cfg.lora.quantize != "none":  # QLoRA trained over 4-bit weights; the merge uses the originals
                    restore_full_precision(model.language_model, load_vlm_dir(cfg.init_from)[0].language_model)
                merge_lora(model.language_model)  # one LLaVA directory: the adapter folded into the language model
            card = run_card(stage_card(cfg, stage), result, cfg.train, cfg.data, cfg.init_from, cfg.lora)
            save_vlm_dir(model, final, tokenizer, processor, card)  # (tensors are copied to the CPU as they are saved)
            print(
                f"saved {final}" + (" (the LoRA adapter merged into the language model)" if lora else ""),
                file=sys.stderr,
            )
            if stage == "sft" and cfg.data.source == "builtin":
                report = heldout_report(
                    Engine(model.eval(), tokenizer, processor=processor), builtin_corpus(cfg, run_dir)["heldout"]
                )
                atomic_write_json(run_dir / "heldout.json", report)
                add_evaluation(final, heldout_evaluation(report), "held-out pictures (heldout.json)")
                print(render_heldout(report), file=sys.stderr)
        return final, result


def stage_card(cfg: VLMStageConfig, stage: str) -> CardFacts:
    """The model card's words for a stage's model: which stage, and the vision tower it sees with."""
    words = "stage 1 (captions teach the projector)" if stage == "pretrain" else "stage 2 (image conversations)"
    tower = f"the vision tower of `{cfg.vision.tower}`" if cfg.vision.tower else None
    notes = [f"It sees with {tower}."] if tower and stage == "pretrain" else []
    return CardFacts(stage=f"vision-language training, {words}", tags=["vlm", "llava"], notes=notes)


def heldout_evaluation(report: dict) -> dict[str, dict]:
    """heldout.json as model card evaluation rows: accuracy per kind of question, against chance and
    against the same questions about a blank picture."""
    blank = report["blank_picture"]
    found = {
        "held-out picture questions": {
            "accuracy": report["accuracy"],
            "accuracy, blank picture": blank["accuracy"],
            "items": report["questions"],
        }
    }
    for kind, row in report["by_kind"].items():
        found[f"held-out questions: {kind}"] = {
            "accuracy": row["accuracy"],
            "accuracy, chance": row["chance"],
            "accuracy, blank picture": blank["by_kind"][kind]["accuracy"],
            "items": row["questions"],
        }
    return found


def vlm_pretrain(cfg: VLMStageConfig, out_dir, *, resume: bool = False, callbacks=()):
    return train_vlm(cfg, out_dir, "pretrain", resume=resume, callbacks=callbacks)


def vlm_sft(cfg: VLMStageConfig, out_dir, *, resume: bool = False, callbacks=()):
    return train_vlm(cfg, out_dir, "sft", resume=resume, callbacks=callbacks)
