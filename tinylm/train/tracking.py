"""Watching a run live: the records of metrics.jsonl mirrored to TensorBoard and/or Weights & Biases.

``train.report_to`` names them (comma-separated): ``tensorboard`` writes event files under
``RUN/tensorboard/`` (``tensorboard --logdir RUN``); ``wandb`` logs to a Weights & Biases run kept
under ``RUN/wandb/``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it later), so
it works with no network and no account. ``none`` (the default) writes metrics.jsonl alone.

Every numeric field of a record is logged at the record's step under the same name (``loss``, ``lr``,
``tok_s``, ``val_loss``, ``mmlu/acc``, ...). On resume, TensorBoard drops what was logged after the
checkpoint's step (as metrics.jsonl does) and Weights & Biases continues the same run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tinylm.config import ConfigError

TRACKERS = ("tensorboard", "wandb")


def tracker_names(report_to: str) -> list[str]:
    """The trackers of a ``report_to`` value (TrainConfig checked it: none, or some of TRACKERS)."""
    return [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "report_to: tensorboard needs the tensorboard package (pip install tensorboard)"
            ) from None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        if start_step == 0:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict, start_step: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError("report_to: wandb needs the wandb package (pip install wandb)") from None
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if start_step and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tinylm"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers ``report_to`` names, open for one run (the main process's; others log nothing)."""

    def __init__(self, report_to: str, run_dir: str | Path, config: dict, start_step: int = 0, enabled: bool = True):
        names = tracker_names(report_to) if enabled else []
        kinds = {"tensorboard": TensorBoard, "wandb": WandB}
        self.open = [kinds[name](Path(run_dir), config, start_step) for name in names]

    def log(self, record: dict) -> None:
        if not self.open or "step" not in record:
            return
        values = {k: float(v) for k, v in record.items() if k != "step" and is_number(v)}
        for tracker in self.open:
            tracker.log(int(record["step"]), values)

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
