"""Distillation: a small student learns from a larger teacher's next-token distributions.

    tinylm distill --teacher runs/big/final --student cpu-tiny-student --out runs/student

The student is a model directory, or a config whose ``model`` section shapes a new one (trained with
the teacher's tokenizer). The data and the loop are pretraining's (``distill.corpus: text``) or SFT's
(``distill.corpus: chat``, where only the assistant's tokens are learned); only the objective differs:
``objectives.DistillLoss``. Validation reports the plain cross-entropy, so a distilled student and
one trained on the data alone compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tinylm.config import ConfigError, EvalSection, TrainConfig, save_config
from tinylm.model.llama import ModelConfig
from tinylm.modelcard import CardFacts
from tinylm.modeldir import load_model_dir
from tinylm.tokenizer import Tokenizer
from tinylm.train.objectives import DistillLoss
from tinylm.train.pretrain import DataConfig, PretrainConfig, pretrain
from tinylm.train.sft import ChatDataConfig, SFTConfig, sft
from tinylm.train.trainer import FitResult

# -- the stage's config (the YAML sections and --section.key=value keys it takes) ----------------


@dataclass
class DistillSection:
    teacher: str | None = None  # the teacher model directory (same tokenizer as the student)
    temperature: float = 1.0  # > 1 softens both distributions; the KL term is scaled by T²
    kl_weight: float = 0.5  # loss = (1 - kl_weight) · cross-entropy + kl_weight · T² · KL(teacher ‖ student)
    corpus: str = "text"  # text: pretraining text (``data``) | chat: conversations (``chat``), the assistant's tokens

    def __post_init__(self):
        if self.corpus not in ("text", "chat"):
            raise ConfigError(f"corpus: expected text or chat, got {self.corpus!r}")
        if self.temperature <= 0 or not 0 <= self.kl_weight <= 1:
            raise ConfigError(
                f"temperature must be > 0 and kl_weight in [0, 1] (got {self.temperature}, {self.kl_weight})"
            )


@dataclass
class DistillConfig:
    """A student (a model directory, or a new model of ``model``'s shape) learns from a teacher."""

    init_from: str | None = None  # the student's model directory; None: a new model built from ``model``
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # pretraining text, with distill.corpus: text
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)  # conversations, with distill.corpus: chat
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)  # benchmarks at each evaluation (none by default)


def check_same_tokenizer(teacher, student, teacher_dir, student_dir) -> None:
    """Distillation compares distributions token id by token id: both models must share a vocabulary."""
    a, b = teacher._rust.get_vocab(with_added_tokens=True), student._rust.get_vocab(with_added_tokens=True)
    if a != b:
        differs = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])[:3]
        raise ConfigError(
            f"the teacher {teacher_dir} and the student {student_dir} use different tokenizers "
            f"({len(a):,} vs {len(b):,} tokens; e.g. {differs}): distillation matches the two models' "
            "next-token distributions id by id, so the student must use the teacher's tokenizer"
        )


def distill(cfg: DistillConfig, out_dir: str | Path, *, resume: bool = False, callbacks=()) -> tuple[Path, FitResult]:
    """Train the student (``init_from``, or a new model of ``cfg.model``'s shape) against the teacher."""
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher is not set: give the teacher model directory (--teacher DIR)")
    teacher, teacher_tokenizer = load_model_dir(cfg.distill.teacher)
    if teacher_tokenizer is None:
        raise ConfigError(
            f"{cfg.distill.teacher}: has no tokenizer.json; the student must share the teacher's tokenizer"
        )
    if cfg.init_from:
        student_tokenizer = Tokenizer.load(cfg.init_from)
        check_same_tokenizer(teacher_tokenizer, student_tokenizer, cfg.distill.teacher, cfg.init_from)
    else:
        cfg.data.tokenizer = cfg.distill.teacher  # a new student speaks the teacher's tokens
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(out_dir) / "distill.yaml")
    objective = DistillLoss(
        teacher.float(), cfg.distill.temperature, cfg.distill.kl_weight, vocab_size=teacher_tokenizer.vocab_size
    )
    card = CardFacts(
        stage=f"distillation from the teacher `{cfg.distill.teacher}`",
        tags=["distillation"],
        settings={"distillation": f"temperature {cfg.distill.temperature:g}, KL weight {cfg.distill.kl_weight:g}"},
    )
    if cfg.distill.corpus == "text":
        stage = PretrainConfig(model=cfg.model, data=cfg.data, train=cfg.train, init_from=cfg.init_from, eval=cfg.eval)
        return pretrain(stage, out_dir, resume=resume, callbacks=callbacks, objective=objective, card=card)
    if not cfg.init_from:
        raise ConfigError(
            "distill.corpus is chat: the student must be a model directory (--student DIR) with a tokenizer"
        )
    stage = SFTConfig(init_from=cfg.init_from, data=cfg.chat, train=cfg.train, eval=cfg.eval)
    return sft(stage, out_dir, resume=resume, callbacks=callbacks, objective=objective, card=card)
