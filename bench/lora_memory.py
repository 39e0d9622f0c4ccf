"""Peak memory and step time of full fine-tuning, LoRA and QLoRA, on the minimind2-small shape (26M
parameters) and a ~100M one, on this machine's CPU (or a GPU with --device cuda).

    python bench/lora_memory.py                      # both shapes, all three methods
    python bench/lora_memory.py --shapes cpu-tiny --steps 1   # a quick check that every part runs
    python bench/lora_memory.py --shapes minimind2-small --steps 5 --plot lora_memory.png

Each (shape, method) runs in a fresh process, so one measurement cannot inherit another's memory:
the model is built (random weights: memory and time do not depend on their values), then
    full   every parameter trains (AdamW state for all of them),
    lora   rank-16 adapters on every decoder linear layer; the base is frozen fp32,
    qlora  the same adapters over a base whose linear layers are held in 4-bit NF4 (double quantized).
Then ``--steps`` optimizer steps run on random tokens exactly as the trainer runs them (forward with
the block-wise loss, backward, clip, fused AdamW). "peak" is the process's resident memory high-water
mark (Linux VmHWM; cudaMaxMemoryAllocated on a GPU) during those steps, and "training" that peak minus
the process's memory just before the model was built (the torch runtime, warmed up by one step of a
tiny model first, the same for all three). Memory is measured in a process run with
MALLOC_MMAP_THRESHOLD_=65536, so every freed tensor goes back to the OS at once and the peak is that
of live tensors rather than of what malloc kept; the step time (the median of the timed steps, after
one warmup step) comes from a second, ordinary process.

At a batch of 4 × 256 tokens the activations (what backward needs, the same for all three methods)
are most of the memory; the weights, gradients and AdamW state that LoRA and QLoRA save weigh more
with bigger models and smaller micro-batches (``--batch 1 --seq-len 128``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tinylm.config import LoRASection, TrainConfig, load_config
from tinylm.device import resolve_device
from tinylm.model.llama import CausalLM
from tinylm.train.optim import build_optimizer
from tinylm.train.pretrain import PretrainConfig
from tinylm.train.stage import prepare_lora

SHAPES = {  # overrides of configs/minimind2-small.yaml
    "minimind2-small": [],
    "100M": [
        "--model.hidden_size=768",
        "--model.num_hidden_layers=16",
        "--model.num_attention_heads=12",
        "--model.num_key_value_heads=4",
        "--model.intermediate_size=2048",
    ],
    "cpu-tiny": [  # the quickstart's shape (with minimind2-small's vocabulary): a check that takes seconds
        "--model.hidden_size=128",
        "--model.num_hidden_layers=4",
        "--model.num_attention_heads=4",
        "--model.num_key_value_heads=2",
    ],
}
DEFAULT_SHAPES = ["minimind2-small", "100M"]
METHODS = {
    "full": LoRASection(),
    "lora": LoRASection(enabled=True, r=16, alpha=32),
    "qlora": LoRASection(enabled=True, r=16, alpha=32, quantize="nf4", double_quant=True),
}


def resident_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Hand freed heap back to the OS (the fp32 weights QLoRA just quantized), then restart the Linux
    high-water mark VmHWM from the current resident size."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def warm_up_runtime(cfg: PretrainConfig, device: torch.device) -> None:
    """One step of a tiny model of the same family: torch loads its kernels and libraries lazily, on
    first use, and that (the same for every method) should not count as the method's memory."""
    import dataclasses

    tiny = CausalLM(
        dataclasses.replace(
            cfg.model,
            hidden_size=64,
            num_hidden_layers=1,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=None,
        )
    ).to(device)
    prepare_lora(tiny, METHODS["qlora"], seed=0, main=False)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 9), device=device)
    tiny(ids[:, :-1], labels=ids[:, 1:]).backward()
    optimizer, _scheduler = build_optimizer(tiny, TrainConfig(), device)
    optimizer.step()


def measure(shape: str, method: str, steps: int, batch: int, seq_len: int, device: torch.device) -> dict:
    """One (shape, method) in this process: {"peak_mb", "training_mb", "step_s", "trainable", "params"}."""
    cfg = load_config(PretrainConfig, ROOT / "configs" / "minimind2-small.yaml", SHAPES[shape])
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    warm_up_runtime(cfg, device)
    before = torch.cuda.memory_allocated() if cuda else resident_kb("VmRSS") * 1024
    model = CausalLM(cfg.model)
    params = model.num_parameters()
    prepare_lora(model, METHODS[method], seed=0, main=False)  # QLoRA quantizes the fp32 layers, then frees them
    model.to(device).train()
    train_cfg = TrainConfig(lr=1e-4, warmup_steps=0, max_steps=steps + 1, progress=False)
    optimizer, scheduler = build_optimizer(model, train_cfg, device)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step is warmup (allocator, optimizer state)
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else resident_kb("VmHWM") * 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "shape": shape,
        "method": method,
        "params": params,
        "trainable": trainable,
        "peak_mb": peak / 2**20,
        "training_mb": (peak - before) / 2**20,
        "step_s": statistics.median(times),
        "loss": loss.item(),
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "training_mb", "training memory (MB)"), (axes[1], "step_s", "step time (s)")):
        for i, method in enumerate(METHODS):
            values = [next((r[key] for r in rows if r["shape"] == s and r["method"] == method), 0) for s in shapes]
            ax.bar([x + i * 0.27 for x in range(len(shapes))], values, width=0.27, label=method)
        ax.set_xticks([x + 0.27 for x in range(len(shapes))], shapes)
        ax.set_ylabel(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def child(cmd: list[str], env) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:5])} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warmup step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", default=None, help="also draw the table as bars into this PNG")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.batch, args.seq_len, device)))
        return
    rows = []
    print(
        f"batch {args.batch} × {args.seq_len} tokens, {args.steps} timed steps, {device.type}; each row a fresh "
        "process",
        file=sys.stderr,
    )
    for shape in args.shapes:
        for method in args.methods:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                shape,
                method,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq-len",
                str(args.seq_len),
                "--device",
                args.device,
            ]
            timed = child(cmd, os.environ)
            # Memory in a second process whose allocator returns every freed tensor to the OS at once,
            # so the high-water mark is the peak of live tensors, not what malloc kept around.
            measured = child(cmd, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            rows.append({**timed, "peak_mb": measured["peak_mb"], "training_mb": measured["training_mb"]})
            print(f"  {shape} {method}: done", file=sys.stderr)
    print("| shape | method | parameters | trainable | peak memory | training memory | vs full | step time | vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        full = next((r for r in rows if r["shape"] == row["shape"] and r["method"] == "full"), row)
        print(
            f"| {row['shape']} | {row['method']} | {row['params'] / 1e6:.1f}M | {row['trainable'] / 1e6:.2f}M | "
            f"{row['peak_mb']:,.0f} MB "
            f"| {row['training_mb']:,.0f} MB | {row['training_mb'] / full['training_mb']:.2f}× | {row['step_s']:.2f} s "
            f"| {row['step_s'] / full['step_s']:.2f}× |"
        )
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
