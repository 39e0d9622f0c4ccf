"""Your own small text: held-out bits per byte after a fixed wall-clock budget on this machine.

    python bench/own_text.py                                   # TinyStories sample, 10 minutes
    python bench/own_text.py --text novel.txt --minutes 10 --label zh
    python bench/own_text.py --minutes 3 --label no-dropout -- --model.hidden_dropout=0 --model.attention_dropout=0

The text is split by characters, the first 90% to train on and the last 10% held out (as nanoGPT's
``prepare.py`` splits its character-level datasets). The model is trained by the command a user runs,

    tinylm pretrain --data train.txt --val-data val.txt --minutes M --out DIR --data.txt_split=file

in its own process (sized to the text and the budget; anything after ``--`` is passed on as
overrides, for ablations), and its final/ is then scored on the held-out text in full: the whole 10%
tokenized as one stream, cut into non-overlapping windows of the training length, every token but the
first predicted, the summed negative log-likelihood divided by the held-out UTF-8 bytes (so
tokenizers of any vocabulary compare). ``txt_split=file`` makes the training text one stream too, as
the held-out one is scored.

Anchor (from the issue that asked for this bench): nanoGPT's character-level "baby GPT" (4 layers,
4 heads, width 128, block 64, batch 12, 0.80M parameters, lr 1e-3 → 1e-4) trained for about 11 minutes
on 2 CPU cores on the same TinyStories sample scores 1.519 bits per byte on the held-out 10%.

Each run appends one JSON line to ``--results`` (default bench/own_text.jsonl) and prints the table of
all runs there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinylm.modeldir import load_model_dir

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_TEXT = SHARED / "pretrain_en" / "tinystories_subset.txt"
NANOGPT_BPB = 1.519  # nanoGPT baby GPT, ~11 minutes on 2 cores, same sample (the anchor the issue gives)


def split_text(text: str, out_dir: Path) -> tuple[Path, Path]:
    cut = int(len(text) * 0.9)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = out_dir / "train.txt", out_dir / "val.txt"
    train.write_text(text[:cut], encoding="utf-8")
    val.write_text(text[cut:], encoding="utf-8")
    return train, val


@torch.no_grad()
def held_out_bpb(model_dir: Path, text: str, seq_len: int) -> float:
    """Bits per byte of ``text`` under the model: non-overlapping windows, every token but the first."""
    model, tokenizer = load_model_dir(model_dir)
    model.eval()
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    nats = 0.0
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start : start + seq_len + 1][None]
        nats += model(window[:, :-1], labels=window[:, 1:]).item()  # the summed cross-entropy
    return nats / math.log(2) / len(text.encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help=f"a UTF-8 text file (default {DEFAULT_TEXT})")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--label", default="tinylm", help="the row's name in the table")
    parser.add_argument("--work", type=Path, default=Path("runs/own_text"), help="where the runs go")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "own_text.jsonl")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for tinylm pretrain")
    args = parser.parse_args()
    if not args.text.is_file():
        sys.exit(f"{args.text}: no such file (give --text)")

    text = args.text.read_text(encoding="utf-8")
    run = args.work / f"{args.text.stem}-{args.label}-{args.minutes:g}min"
    train, val = split_text(text, args.work / f"{args.text.stem}-split")
    command = [
        *(
            sys.executable,
            "-m",
            "tinylm.cli",
            "pretrain",
            "--data",
            str(train),
            "--val-data",
            str(val),
            "--minutes",
            f"{args.minutes:g}",
        ),
        *("--out", str(run), "--data.txt_split=file", "--train.progress=false", *args.overrides),
    ]
    if run.exists():
        sys.exit(f"{run} exists: remove it or choose another --label")
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    began = time.perf_counter()
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stderr[-4000:]}")
    lines = done.stderr.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("sized to the data")), len(lines))
    sizing = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("  "), lines[start:])]
    config = (run / "config.yaml").read_text(encoding="utf-8")
    seq_len = int(next(line.split(":")[1] for line in config.splitlines() if line.strip().startswith("seq_len:")))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    best = json.loads((run / "best" / "best.json").read_text()) if (run / "best" / "best.json").exists() else None
    row = {
        "text": args.text.name,
        "label": args.label,
        "minutes": args.minutes,
        "overrides": args.overrides,
        "wall_s": round(wall, 1),
        "steps": max(r["step"] for r in records),
        "best_step": best and best["step"],
        "held_out_bpb": round(held_out_bpb(run / "final", val.read_text(encoding="utf-8"), seq_len), 4),
        "sizing": sizing,
    }
    row["parameters"] = load_model_dir(run / "final", with_tokenizer=False)[0].num_parameters()
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print_table(args.results)


def print_table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    print("| text | run | budget | wall | steps (best) | parameters | held-out bits/byte |")
    print("|---|---|---|---|---|---|---|")
    print(f"| tinystories_subset.txt | nanoGPT baby GPT (cited) | ~11 min | | | 0.80M | {NANOGPT_BPB} |")
    for r in rows:
        print(
            f"| {r['text']} | {r['label']} {' '.join(r['overrides'])} | {r['minutes']:g} min | {r['wall_s']:.0f} s "
            f"| {r['steps']} ({r['best_step']}) | {r['parameters'] / 1e6:.2f}M | {r['held_out_bpb']:.3f} |"
        )


if __name__ == "__main__":
    main()
