"""Training throughput: the tinylm trainer against transformers' LlamaForCausalLM, in one process.

    python bench/train_throughput.py                        # both configs, defaults sized for a 2-core CPU
    python bench/train_throughput.py --config cpu-tiny --steps 30 --rounds 5
    python bench/train_throughput.py --device cuda --precision bf16 2>/dev/null   # hide the progress bars

Both sides train the same model (same shape, same initial weights) on the same random token windows
with the same batch, sequence length, precision, AdamW hyper-parameters and parameter groups, warmup +
cosine schedule and gradient clipping. Tokens are counted alike: batch × seq_len per optimizer step.

* ours: the real ``tinylm.train.trainer.fit`` with everything a user gets: metrics.jsonl every 10 steps,
  the tqdm bar (on stderr), a checkpoint (at least one per round) and loss.png at the end. The whole
  ``fit`` call is timed, into a fresh run directory each round, optimizer creation included.
* transformers: a plain loop, ``model(input_ids=..., labels=...).loss`` → backward → clip → step →
  zero_grad, with the optimizer and scheduler also created inside the timed region. Both use the
  fused AdamW kernel, as transformers' own Trainer does by default; so the optimizer is not where a
  difference can come from. (What differs: the trainer computes the loss from the hidden states
  block by block, see tinylm/model/loss.py, where transformers materialises the full logits.)

After a warmup round of each side (printed, left out of the summary: it absorbs one-off costs such as
imports, the allocator and matplotlib's start), the two alternate for ``--rounds`` rounds. The table
shows each round's tokens/s and the ratio ours / transformers, then the per-column median and best
(on a shared machine other processes only ever slow a round down, so "best" is the least disturbed).
The last line reports the round with the median ratio. "ours (loop)" is the trainer's own step time
(``FitResult.elapsed_s``: it leaves out setup, logging, the progress bar, checkpoints and the plot),
so the gap between the two ours columns is what those features cost at this many steps per round.
Equal final losses show that both sides did the same computation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinylm.config import TrainConfig, load_config
from tinylm.device import autocast_dtype, resolve_device
from tinylm.model.llama import CausalLM
from tinylm.train import checkpoint as ckpt
from tinylm.train import distributed
from tinylm.train.objectives import NextTokenLoss, shift_window
from tinylm.train.optim import build_optimizer
from tinylm.train.pretrain import PretrainConfig
from tinylm.train.trainer import Task, fit

CONFIGS = {"cpu-tiny": ROOT / "configs" / "cpu-tiny.yaml", "minimind2-small": ROOT / "configs" / "minimind2-small.yaml"}
# Sized so that the whole benchmark (both configs) takes a few minutes on 2 CPU cores.
CPU_DEFAULTS = {
    "cpu-tiny": dict(batch_size=16, seq_len=256, steps=20),
    "minimind2-small": dict(batch_size=2, seq_len=128, steps=30),
}
GPU_STEPS = 50  # on a GPU: the config's own batch and sequence length


class RandomWindows:
    """Trainer batches cut in turn from a fixed pool of random token windows [P, T+1]."""

    def __init__(self, windows: torch.Tensor, batch_size: int):
        self.windows, self.batch_size, self.cursor = windows, batch_size, 0

    def next_batch(self) -> dict:
        rows = torch.arange(self.cursor, self.cursor + self.batch_size) % len(self.windows)
        self.cursor += self.batch_size
        return shift_window(self.windows[rows])

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model, init_state, windows, train_cfg: TrainConfig, dist) -> dict:
    """One fresh ``fit`` of ``train_cfg.max_steps`` steps into a fresh run directory."""
    model.load_state_dict(init_state)
    task = Task(model=model, batches=RandomWindows(windows, train_cfg.batch_size), objective=NextTokenLoss())
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as run_dir:
        synchronize(dist.device)
        start = time.perf_counter()
        result = fit(task, train_cfg, run_dir, dist, resume=False)
        synchronize(dist.device)
        seconds = time.perf_counter() - start
        run = Path(run_dir)  # make sure every feature really ran
        missing = [p for p in ("metrics.jsonl", "loss.png") if not (run / p).exists()]
        if missing or not ckpt.list_checkpoints(run):
            raise RuntimeError(f"the trainer did not write {missing or 'a checkpoint'} in {run_dir}")
    return {"seconds": seconds, "loop_seconds": result.elapsed_s, "loss": result.last_metrics["loss"]}


def run_theirs(model, init_state, windows, train_cfg: TrainConfig, device: torch.device, amp) -> dict:
    """A plain transformers training loop with the same optimizer, schedule, clipping and batches."""
    model.load_state_dict(init_state)
    batches = RandomWindows(windows, train_cfg.batch_size)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    synchronize(device)
    start = time.perf_counter()
    model.to(device)
    model.train()
    optimizer, scheduler = build_optimizer(model, train_cfg, device)
    for _ in range(train_cfg.max_steps):
        batch = batches.next_batch()
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        # the T inputs predict the T next tokens: hand transformers the already shifted labels
        labels = batch["labels"].contiguous().to(device, non_blocking=True)
        with autocast():
            loss = model(input_ids=input_ids, labels=labels, shift_labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    final_loss = loss.item()
    synchronize(device)
    return {"seconds": time.perf_counter() - start, "loss": final_loss}


def hf_model(cfg: PretrainConfig):
    import transformers

    hf = cfg.model.to_hf_dict()
    model_type = hf.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, attn_implementation="sdpa", **hf)
    if model_type != "llama":
        raise ValueError(f"{model_type}: this benchmark compares against LlamaForCausalLM")
    return transformers.LlamaForCausalLM(config)


def print_summary(rows: list[dict], busy: list[float], device: torch.device) -> dict:
    """Print the per-column median and best of the timed rounds (and a note when other processes shared
    the CPU); return the round whose ratio is the median (the lower middle one for an even count), so
    a summary line quoting it adds up."""

    def print_row(label: str, ours: float, ours_loop: float, theirs: float) -> None:
        print(f"{label:>7} {ours:>12,.0f} {ours_loop:>12,.0f} {theirs:>13,.0f} {ours / theirs:>6.2f}x", flush=True)

    columns = ("ours", "ours_loop", "theirs")
    print_row("median", *(statistics.median(r[key] for r in rows) for key in columns))
    print_row("best", *(max(r[key] for r in rows) for key in columns))  # least disturbed by other processes
    cores = os.cpu_count() or 1
    if device.type == "cpu" and max(busy) > cores + 0.5:
        print(
            f"note: the load average reached {max(busy):.1f} on {cores} cores: other processes shared the CPU, "
            "so single rounds are noisy (trust 'best' and the median ratio; rerun idle or with more --rounds)",
            flush=True,
        )
    return sorted(rows, key=lambda r: r["ratio"])[(len(rows) - 1) // 2]


def bench_config(name: str, args, device: torch.device) -> dict:
    cfg = load_config(PretrainConfig, CONFIGS[name])
    defaults = (
        CPU_DEFAULTS[name]
        if device.type == "cpu"
        else dict(batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len, steps=GPU_STEPS)
    )
    batch_size = args.batch_size or defaults["batch_size"]
    seq_len = args.seq_len or defaults["seq_len"]
    steps = args.steps or defaults["steps"]
    train_cfg = dataclasses.replace(
        cfg.train,
        max_steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        precision=args.precision,
        device=str(device),
        compile=False,
        log_every=10,
        eval_every=0,
        save_every=steps,  # one checkpoint per round (the trainer also always saves at the last step)
        keep_checkpoints=2,
        progress=True,
    )
    amp = autocast_dtype(args.precision, device)
    dist = distributed.setup(str(device))

    torch.manual_seed(train_cfg.seed)
    ours = CausalLM(cfg.model)
    init_state = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs = hf_model(cfg)
    theirs.load_state_dict(init_state)
    g = torch.Generator().manual_seed(1234)
    windows = torch.randint(0, cfg.model.vocab_size, (8 * batch_size, seq_len + 1), generator=g)

    tokens = steps * batch_size * seq_len
    precision = "fp32" if amp is None else f"{amp}".replace("torch.", "") + " autocast"
    print(
        f"\n== {name}: {ours.num_parameters():,} parameters, batch {batch_size} x seq {seq_len} = "
        f"{batch_size * seq_len:,} "
        f"tokens/step, {steps} steps/round, {args.rounds} rounds + warmup, {precision}, {device}"
        + (
            f", {torch.get_num_threads()} threads"
            if device.type == "cpu"
            else f" ({torch.cuda.get_device_name(device)})"
        ),
        flush=True,
    )
    header = f"{'round':>7} {'ours tok/s':>12} {'ours (loop)':>12} {'transformers':>13} {'ratio':>7}"
    header += "   final loss ours / transformers"
    print(header, flush=True)
    busy = []  # the 1-minute load average seen at each round, to flag a shared, busy machine

    rows = []
    for round_ in range(args.rounds + 1):
        o = run_ours(ours, init_state, windows, train_cfg, dist)
        t = run_theirs(theirs, init_state, windows, train_cfg, device, amp)
        row = {
            "ours": tokens / o["seconds"],
            "ours_loop": tokens / o["loop_seconds"],
            "theirs": tokens / t["seconds"],
            "loss": (o["loss"], t["loss"]),
        }
        row["ratio"] = row["ours"] / row["theirs"]
        label = "warmup" if round_ == 0 else str(round_)
        print(
            f"{label:>7} {row['ours']:>12,.0f} {row['ours_loop']:>12,.0f} {row['theirs']:>13,.0f} {row['ratio']:>6.2f}x"
            f"   {row['loss'][0]:.4f} / {row['loss'][1]:.4f}",
            flush=True,
        )
        if round_ > 0:
            rows.append(row)
        busy.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)

    middle = print_summary(rows, busy, device)
    line = (
        f"{name}: ours {middle['ours']:,.0f} tok/s, transformers {middle['theirs']:,.0f} tok/s, "
        f"ratio {middle['ratio']:.2f}x (median of {len(rows)})"
    )
    summary = {"ratio": middle["ratio"], "line": line}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per round (default: per config and device)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warmup round")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="sequences per step (default: per config and device)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per sequence (default: per config and device)"
    )
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    device = resolve_device(args.device)
    names = list(CONFIGS) if args.config == "all" else [args.config]
    lines = [bench_config(name, args, device)["line"] for name in names]
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
