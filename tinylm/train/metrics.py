"""metrics.jsonl (one JSON object per logged step) and the loss.png drawn from it."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from tinylm.io import atomic_write_text, read_json_lines


class MetricsLog:
    """Appends one JSON line per record; flushed at once so a crash loses nothing already logged."""

    def __init__(self, path: str | Path, enabled: bool = True, trackers=None):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = trackers  # live mirrors of the records (tinylm.train.tracking.Trackers), if any

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step``: on resume those steps will be logged again, and a fresh
        run (step 0) starts an empty log. The file is replaced atomically."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [record for record in read_metrics(self.path) if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict]:
    """The logged records; a line cut short by a crash mid-write is skipped."""
    return read_json_lines(path)


# Fonts with Chinese glyphs, for titles made of run names like 西游记-10min: the first installed one backs
# up matplotlib's default font. Without any, such characters draw as boxes (and warn no more).
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "Microsoft YaHei",
    "SimHei",
    "PingFang SC",
    "Heiti SC",
)


def title_fonts() -> list[str]:
    from matplotlib import font_manager, rcParams

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [*rcParams["font.sans-serif"][:1], *(name for name in CJK_FONTS if name in installed)]


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    """Training loss (and validation loss, where logged) against step; None when nothing was logged."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib  # about half a second to import: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or Path(metrics_path).parent.name, fontfamily=title_fonts())
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_path)


def plot_rewards(
    metrics_path: str | Path, out_path: str | Path, title: str = "", before: dict | None = None
) -> Path | None:
    """A reinforcement-learning run: the training reward and every held-out accuracy (``heldout/...``,
    or ``val_reward``) against step, ``before`` training at step 0; None when nothing was logged."""
    records = ([{"step": 0, **before}] if before else []) + read_metrics(metrics_path)
    reward = [(r["step"], r["reward"]) for r in records if "reward" in r]
    keys = sorted({k for r in records for k in r if k.startswith("heldout/") or k == "val_reward"})
    if not reward and not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if reward:
        ax.plot(*zip(*reward), label="reward (training rollouts)", linewidth=1, color="black")
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        style = "o-" if key in ("heldout/accuracy", "val_reward") or "arithmetic" in key else "o--"
        ax.plot(*zip(*points), style, label=key.removeprefix("heldout/"), markersize=3, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / held-out accuracy")
    ax.set_title(title or Path(metrics_path).parent.name, fontfamily=title_fonts())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return save_figure(fig, out_path)


def save_figure(fig, out_path: str | Path) -> Path:
    """Lay out, write and close a figure (a title's missing CJK glyphs draw as boxes, without warnings)."""
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
