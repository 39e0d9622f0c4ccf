"""SFT throughput: tinylm's packed fine-tuning against padded transformers' LlamaForCausalLM, in one process.

    python bench/sft_throughput.py                          # cpu-tiny, built-in conversations: minutes on 2 cores
    python bench/sft_throughput.py --baseline-pad longest   # the baseline pads each batch to its longest conversation
    python bench/sft_throughput.py --data chats.jsonl --model-dir runs/quickstart/final
    python bench/sft_throughput.py --device cuda --precision bf16 2>/dev/null   # hide the progress bars

What is measured is USEFUL tokens per second: tokens that belong to a conversation (the chat template's
ids: system prompt, user turns, role headers, answers), never padding. Both sides count them the same
way, as the conversations' lengths, and both sides train on exactly the same conversations each round.

Data. The built-in SFT conversations (``builtin_chat.sft_conversations(World(0))``, 2,880 of them) or
``--data FILE...`` (read with ``tinylm.data.chat.read_conversations``), rendered with the chat
template (``--template``, default chatml) and fitted to ``--seq-len`` by
``tinylm.data.chat_rows.encode_conversations`` (which also makes the labels: the next token on assistant
tokens, -100 elsewhere). The tokenizer is trained on the messages' text
(``--vocab-size``), or comes with ``--model-dir``. All of this, and ``pack``, happens once, untimed.

Both sides train the same model (same shape, same initial weights; a fresh copy of those weights each
round) with the same batch size (conversations per row are the only difference, see below), precision,
AdamW hyper-parameters and parameter groups (from configs/sft-cpu-tiny.yaml), fused AdamW, warmup +
cosine schedule (``tinylm.train.optim.lr_lambda`` over each side's own number of steps) and gradient
clipping. Validation is off on both sides: this is training throughput.

* ours: what ``tinylm sft`` runs (``tinylm.train.sft.sft``): the conversations best-fit packed into
  rows of ``seq_len`` (``pack(packed=True)``: several conversations per row, each with its own positions
  and attention), ``Batches`` of ``batch_size`` rows, ``NextTokenLoss``, ``tokens_per_batch=real_tokens``,
  through the real ``tinylm.train.trainer.fit`` with everything a user gets: metrics.jsonl every 10 steps,
  the tqdm bar (on stderr), a checkpoint per round and loss.png at the end. The whole ``fit`` call is
  timed, into a fresh run directory each round, optimizer creation included. It runs ``--steps`` steps.
* transformers: a plain loop as in the common SFT recipe: each batch is ``batch_size`` conversations,
  right-padded (with the tokenizer's end-of-document id, as ours pads) to ``max_length`` = ``seq_len``
  (the usual ``padding="max_length"``; or, with ``--baseline-pad longest``, to the longest conversation
  of the batch), labels -100 on padding and on non-assistant tokens (the same labels as ours), an
  attention_mask on the padding; ``model(input_ids, attention_mask, labels).loss`` → backward → clip →
  AdamW step → LambdaLR step → zero_grad, with the optimizer and scheduler created inside the timed
  region. The padded batches are built inside the timed loop too (as a collator would); that costs
  well under a millisecond a step.

How the work is equalized: before timing, the script replays ours' ``Batches`` (same rows, same seed,
hence exactly the batches ``fit`` will draw) for ``--steps`` steps and cuts every row back into its
conversations. That list is the round's work for both sides: ours trains on it as ``steps`` packed
batches of ``batch_size`` rows; the transformers loop trains on the very same conversations, shuffled
once with a fixed seed (random batches, as a shuffling DataLoader gives), in ceil(conversations /
batch_size) padded batches of ``batch_size`` conversations (the last one may be smaller). So both sides
process the same conversations and the same number of useful tokens per round, and each side's
tokens/s is those useful tokens / its own timed seconds. Ours' count is checked against the trainer's
own (``FitResult.tokens``, summed ``real_tokens``). Because a packed row holds several conversations, ours
takes fewer, fuller optimizer steps; that is the point of packing. A check before timing shows that
the two compute the same thing: with the initial weights, the loss of ours' first packed batch and the
loss of the same conversations padded in transformers agree.

After a warmup round of each side (printed, left out of the summary: it absorbs one-off costs such as
imports, the allocator and matplotlib's start), the two alternate for ``--rounds`` rounds. The table
shows each round's useful tokens/s and the ratio ours / transformers, then the per-column median and
best (on a shared machine other processes only ever slow a round down, so "best" is the least
disturbed). The last line reports the round with the median ratio. "ours (loop)" is the trainer's own
step time (``FitResult.elapsed_s``: it leaves out setup, logging, the progress bar, checkpoints and the
plot). The final losses of the two sides are not comparable (different numbers of steps) and are not shown.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import hf_model, print_summary, synchronize

from tinylm.chat_template import TEMPLATES, get_template
from tinylm.config import load_config
from tinylm.data import builtin, builtin_chat
from tinylm.data.chat import read_conversations
from tinylm.data.chat_rows import PAD_SEGMENT, encode_conversations, pack, real_tokens, rows_batch
from tinylm.data.walk import Batches
from tinylm.device import autocast_dtype, resolve_device
from tinylm.model.llama import CausalLM
from tinylm.model.loss import IGNORE
from tinylm.modeldir import load_model_dir
from tinylm.tokenizer import train_tokenizer
from tinylm.train import checkpoint as ckpt
from tinylm.train import distributed
from tinylm.train.objectives import NextTokenLoss
from tinylm.train.optim import build_optimizer
from tinylm.train.pretrain import PretrainConfig
from tinylm.train.sft import SFTConfig
from tinylm.train.trainer import Task, fit, move

CONFIGS = {"cpu-tiny": ROOT / "configs" / "cpu-tiny.yaml", "minimind2-small": ROOT / "configs" / "minimind2-small.yaml"}
SFT_CONFIG = ROOT / "configs" / "sft-cpu-tiny.yaml"  # the training hyper-parameters of tinylm's SFT recipe
# Sized so that the default run (cpu-tiny) takes a few minutes on 2 CPU cores.
# The padded baseline takes about six of its steps per packed step of ours, so rounds are short.
CPU_DEFAULTS = {
    "cpu-tiny": dict(batch_size=16, seq_len=256, steps=5),
    "minimind2-small": dict(batch_size=2, seq_len=128, steps=10),
}
GPU_STEPS = 50  # on a GPU: the config's own batch and sequence length
PADDINGS = {"max_length": "padded to max_length", "longest": "padded to the batch's longest"}


# -- data ---------------------------------------------------------------------------------------


def load_conversations(files: list[str] | None) -> tuple[list[list[dict]], str]:
    """Message lists to train on, and where they came from."""
    if not files:
        return builtin_chat.sft_conversations(builtin.World(0)), "the built-in SFT conversations"
    conversations, report = read_conversations(files)
    return [c.messages for c in conversations], f"{report.summary()}"


def round_conversations(rows, batch_size: int, steps: int, seed: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step of ours, the conversations it trains on as (input_ids, labels): ``Batches`` replayed
    with the trainer's seed (so exactly the batches ``fit`` draws), every row cut back into its segments."""
    batches = Batches(len(rows), batch_size, partial(rows_batch, rows), seed=seed)
    plan = []
    for _ in range(steps):
        batch, step = batches.next_batch(), []
        for ids, labels, segments in zip(batch["input_ids"], batch["labels"], batch["segments"]):
            for segment in segments[segments != PAD_SEGMENT].unique().tolist():
                keep = segments == segment
                step.append((ids[keep], labels[keep]))
        if sum(len(ids) for ids, _ in step) != real_tokens(batch):
            raise AssertionError("cutting packed rows into conversations lost tokens")
        plan.append(step)
    return plan


def collate(conversations, pad_to: int | None, pad_id: int) -> dict:
    """Right-padded batch: input_ids (pad_id), labels (-100 on padding), attention_mask (0 on padding).
    ``pad_to`` None pads to the longest conversation of the batch."""
    length = pad_to or max(len(ids) for ids, _ in conversations)
    shape = (len(conversations), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, (ids, target) in enumerate(conversations):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = target
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# -- the two sides ------------------------------------------------------------------------------


def run_ours(model, init_state, rows, train_cfg, dist) -> dict:
    """One fresh ``fit`` of ``train_cfg.max_steps`` packed steps into a fresh run directory."""
    model.load_state_dict(init_state)
    batches = Batches(len(rows), train_cfg.batch_size, partial(rows_batch, rows), seed=train_cfg.seed)
    task = Task(model=model, batches=batches, objective=NextTokenLoss(), tokens_per_batch=real_tokens)
    with tempfile.TemporaryDirectory(prefix="tinylm-sft-bench-") as run_dir:
        synchronize(dist.device)
        start = time.perf_counter()
        result = fit(task, train_cfg, run_dir, dist, resume=False)
        synchronize(dist.device)
        seconds = time.perf_counter() - start
        run = Path(run_dir)  # make sure every feature really ran
        missing = [p for p in ("metrics.jsonl", "loss.png") if not (run / p).exists()]
        if missing or not ckpt.list_checkpoints(run):
            raise RuntimeError(f"the trainer did not write {missing or 'a checkpoint'} in {run_dir}")
    return {"seconds": seconds, "loop_seconds": result.elapsed_s, "tokens": result.tokens}


def run_theirs(
    model, init_state, batches, train_cfg, device: torch.device, amp, pad_to: int | None, pad_id: int
) -> dict:
    """A plain transformers SFT loop over padded batches of conversations."""
    model.load_state_dict(init_state)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    synchronize(device)
    start = time.perf_counter()
    model.to(device)
    model.train()
    optimizer, scheduler = build_optimizer(model, train_cfg, device)
    tokens = 0
    for conversations in batches:
        batch = move(collate(conversations, pad_to, pad_id), device)
        tokens += sum(len(ids) for ids, _ in conversations)
        with autocast():
            # labels are already the next token of each position: hand them over as the shifted labels
            loss = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                shift_labels=batch["labels"],
                use_cache=False,
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    synchronize(device)
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


@torch.no_grad()
def same_loss_check(
    ours, theirs, init_state, rows, step_conversations, train_cfg, device, amp, pad_id
) -> tuple[float, float]:
    """Mean loss per target of ours' first packed batch, and of its conversations padded in transformers."""
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    ours.load_state_dict(init_state)
    theirs.load_state_dict(init_state)
    ours.to(device).eval()
    theirs.to(device).eval()
    packed = move(
        Batches(len(rows), train_cfg.batch_size, partial(rows_batch, rows), seed=train_cfg.seed).next_batch(), device
    )
    padded = move(collate(step_conversations, train_cfg.seq_len, pad_id), device)
    with autocast():
        ours_loss = NextTokenLoss()(ours, packed).item() / NextTokenLoss().count(packed)
        theirs_loss = theirs(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            labels=padded["labels"],
            shift_labels=padded["labels"],
            use_cache=False,
        ).loss.item()
    return ours_loss, theirs_loss


# -- the benchmark ------------------------------------------------------------------------------


def bench(args, device: torch.device) -> str:
    template = get_template(args.template)
    conversations, source = load_conversations(args.data)

    if args.model_dir:
        name = Path(args.model_dir).name
        ours, tokenizer = load_model_dir(args.model_dir)
        if tokenizer is None:
            raise SystemExit(f"{args.model_dir}: has no tokenizer.json")
        ours = ours.float()
        cfg = PretrainConfig(model=ours.config)
        defaults = CPU_DEFAULTS["cpu-tiny"]
        shape_cfg = load_config(SFTConfig, SFT_CONFIG).train
        tokenizer_note = f"the model's own tokenizer ({tokenizer.vocab_size:,} ids)"
    else:
        name = args.config
        cfg = load_config(PretrainConfig, CONFIGS[name] if name in CONFIGS else Path(args.config))
        defaults = CPU_DEFAULTS.get(name, CPU_DEFAULTS["cpu-tiny"])
        shape_cfg = cfg.train
        texts = [message["content"] for messages in conversations for message in messages]
        tokenizer = train_tokenizer(texts, args.vocab_size)
        ids = f"{tokenizer.vocab_size:,} ids of --vocab-size {args.vocab_size:,}"
        tokenizer_note = f"a BPE tokenizer trained on the messages ({ids})"
        cfg.model.vocab_size, cfg.model.eos_token_id = tokenizer.vocab_size, tokenizer.eos_id
        ours = None

    if device.type != "cpu":
        defaults = dict(batch_size=shape_cfg.batch_size, seq_len=shape_cfg.seq_len, steps=GPU_STEPS)
    batch_size = args.batch_size or defaults["batch_size"]
    seq_len = args.seq_len or defaults["seq_len"]
    steps = args.steps or defaults["steps"]
    if seq_len > cfg.model.max_position_embeddings:
        raise SystemExit(f"--seq-len {seq_len} exceeds the model's context ({cfg.model.max_position_embeddings})")
    train_cfg = dataclasses.replace(
        load_config(SFTConfig, SFT_CONFIG).train,
        max_steps=steps,
        batch_size=batch_size,
        grad_accum=1,
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

    # the data, once, untimed: encode + fit to the context, pack, and the round's conversations
    examples, fit_report = encode_conversations(conversations, template, tokenizer, seq_len)
    if not examples:
        raise SystemExit(f"no conversation fits in --seq-len {seq_len}: {fit_report.summary()}")
    pad_id = tokenizer.eos_id
    rows = pack(examples, seq_len, pad_id, packed=True)
    plan = round_conversations(rows, batch_size, steps, train_cfg.seed)
    work = [conversation for step in plan for conversation in step]
    order = np.random.default_rng(train_cfg.seed).permutation(len(work))
    shuffled = [work[i] for i in order]
    padded_batches = [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    theirs_cfg = dataclasses.replace(train_cfg, max_steps=len(padded_batches))  # the schedule over its own steps
    pad_to = seq_len if args.baseline_pad == "max_length" else None
    useful = sum(len(ids) for ids, _ in work)
    theirs_positions = sum(len(b) * (pad_to or max(len(ids) for ids, _ in b)) for b in padded_batches)

    torch.manual_seed(train_cfg.seed)
    if ours is None:
        ours = CausalLM(cfg.model)
    init_state = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs = hf_model(cfg)
    theirs.load_state_dict(init_state)
    check = same_loss_check(ours, theirs, init_state, rows, plan[0], train_cfg, device, amp, pad_id)

    lengths = np.array([len(e) for e in examples])
    precision = "fp32" if amp is None else f"{amp}".replace("torch.", "") + " autocast"
    padding = f"{PADDINGS[args.baseline_pad]}" + (f" {seq_len}" if pad_to else "")
    print(
        f"\n== {name}: {ours.num_parameters():,} parameters, {template.name} template, {tokenizer_note}, {precision}, "
        f"{device}"
        + (
            f", {torch.get_num_threads()} threads"
            if device.type == "cpu"
            else f" ({torch.cuda.get_device_name(device)})"
        ),
        flush=True,
    )
    print(
        f"data: {source}: {fit_report.summary()}; {lengths.sum():,} tokens, {lengths.mean():.1f} per conversation "
        f"(median {np.median(lengths):.0f}, max {lengths.max()}), packed into {len(rows):,} rows of {seq_len} "
        f"({rows.real_tokens / rows.input_ids.size:.0%} real)",
        flush=True,
    )
    print(
        f"per round, both sides: the same {len(work):,} conversations = {useful:,} useful tokens; "
        f"{args.rounds} rounds + warmup",
        flush=True,
    )
    print(
        f"  ours:         {steps} steps of {batch_size} packed rows x {seq_len} "
        f"({useful / (steps * batch_size * seq_len):.0%} of positions useful)",
        flush=True,
    )
    print(
        f"  transformers: {len(padded_batches)} steps of {batch_size} conversations {padding} "
        f"({useful / theirs_positions:.0%} of positions useful)",
        flush=True,
    )
    print(
        f"check, initial weights, ours' first batch: loss {check[0]:.4f} packed (ours) / {check[1]:.4f} padded "
        "(transformers)",
        flush=True,
    )

    header = f"{'round':>7} {'ours tok/s':>12} {'ours (loop)':>12} {'transformers':>13} {'ratio':>7}"
    print(header, flush=True)
    busy = []  # the 1-minute load average seen at each round, to flag a shared, busy machine
    rows_out = []
    for round_ in range(args.rounds + 1):
        o = run_ours(ours, init_state, rows, train_cfg, dist)
        t = run_theirs(theirs, init_state, padded_batches, theirs_cfg, device, amp, pad_to, pad_id)
        if o["tokens"] != useful or t["tokens"] != useful:
            raise AssertionError(
                f"useful tokens differ: planned {useful}, ours {o['tokens']}, transformers {t['tokens']}"
            )
        row = {"ours": useful / o["seconds"], "ours_loop": useful / o["loop_seconds"], "theirs": useful / t["seconds"]}
        row["ratio"] = row["ours"] / row["theirs"]
        label = "warmup" if round_ == 0 else str(round_)
        print(
            f"{label:>7} {row['ours']:>12,.0f} {row['ours_loop']:>12,.0f} {row['theirs']:>13,.0f} "
            f"{row['ratio']:>6.2f}x",
            flush=True,
        )
        if round_ > 0:
            rows_out.append(row)
        busy.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)

    middle = print_summary(rows_out, busy, device)
    return (
        f"{name} SFT: ours (packed) {middle['ours']:,.0f} useful tok/s, transformers ({padding}) "
        f"{middle['theirs']:,.0f} useful tok/s, ratio {middle['ratio']:.2f}x (median of {len(rows_out)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default="cpu-tiny",
        help=f"the model's shape: {' | '.join(CONFIGS)} | a config YAML (default cpu-tiny)",
    )
    parser.add_argument(
        "--model-dir", default=None, help="fine-tune this saved model with its tokenizer (instead of --config)"
    )
    parser.add_argument(
        "--data", nargs="+", default=None, help="conversation files (.json/.jsonl/.parquet); default: the built-in ones"
    )
    parser.add_argument("--template", choices=list(TEMPLATES), default="chatml")
    parser.add_argument(
        "--vocab-size", type=int, default=2000, help="of the tokenizer trained on the data (without --model-dir)"
    )
    parser.add_argument(
        "--baseline-pad",
        choices=list(PADDINGS),
        default="max_length",
        help="transformers batches: padded to --seq-len (max_length), or to the longest conversation of the batch",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="ours' optimizer steps per round (default: per config and device)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warmup round")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="packed rows / padded conversations per step (default: per config and device)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="tokens per row, and the max_length (default: per config and device)"
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
    if args.config not in CONFIGS and not Path(args.config).is_file():
        parser.error(f"--config {args.config!r}: expected {', '.join(CONFIGS)} or a YAML file")

    line = bench(args, resolve_device(args.device))
    print()
    print(line)


if __name__ == "__main__":
    main()
