"""What quantization costs: held-out bits per byte and chat accuracy, fp32 / bf16 / int8 / int4, each method.

    python bench/quantize.py --model runs/quickstart/sft/final --text held_out.txt --seed 0
    python bench/quantize.py --model runs/own_text/final --text val.txt --no-chat

Every row is the same model: as saved (fp32), loaded in bf16, and written by ``tinylm quantize`` with
each bits / group size / method. Each is scored on the same held-out text (bits per byte: the summed
cross-entropy of non-overlapping windows over the text's UTF-8 bytes) and, for a chat model, on the
built-in held-out questions of the world ``--seed`` (greedy replies through the engine, the quickstart's
score). The table goes to stdout as markdown, the rows to ``--results`` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from tinylm.data import builtin, builtin_chat
from tinylm.eval.questions import chat_accuracy
from tinylm.export.quantize import Calibration, quantize_model_dir
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.model.intquant import IntLinear, decoder_linears

# (label, bits, group size, method): None bits = no quantization
VARIANTS = [
    ("int8 per channel, rtn", 8, None, "rtn"),
    ("int8 per channel, gptq", 8, None, "gptq"),
    ("int4 g32, rtn", 4, 32, "rtn"),
    ("int4 g32, gptq", 4, 32, "gptq"),
    ("int4 g128, rtn", 4, 128, "rtn"),
    ("int4 g128, gptq", 4, 128, "gptq"),
    ("int4 per channel, rtn", 4, None, "rtn"),
    ("int4 per channel, gptq", 4, None, "gptq"),
]


@torch.no_grad()
def bits_per_byte(model, tokenizer, text: str, seq_len: int) -> float:
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    nats = 0.0
    for start in range(0, len(ids) - 1, seq_len):
        window = ids[start : start + seq_len + 1][None]
        nats += model(window[:, :-1], labels=window[:, 1:]).float().item()
    return nats / math.log(2) / len(text.encode("utf-8"))


def linear_bytes(model) -> int:
    """Bytes of the decoder's linear weights: what quantization shrinks (and a decode step reads)."""
    total = 0
    for name in decoder_linears(model):
        layer = model.get_submodule(name)
        total += layer.nbytes if isinstance(layer, IntLinear) else layer.weight.numel() * layer.weight.element_size()
    return total


def score(label: str, model_dir: Path, dtype, args, text: str, seconds: float | None = None) -> dict:
    engine = Engine.from_dir(model_dir, device="cpu", dtype=dtype)
    row = {"variant": label, "linear_bytes": linear_bytes(engine.model)}
    row["bpb"] = bits_per_byte(engine.model, engine.tokenizer, text, args.seq_len)
    if args.chat:
        chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
        items = builtin_chat.heldout_questions(builtin.World(args.seed))
        row["accuracy"] = chat_accuracy(engine, items, chat_format)["accuracy"]
    if seconds is not None:
        row["quantize_s"] = seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a float model directory")
    parser.add_argument("--text", type=Path, required=True, help="held-out UTF-8 text for bits per byte")
    parser.add_argument("--seed", type=int, default=0, help="the built-in world the chat model learned")
    parser.add_argument("--no-chat", dest="chat", action="store_false", help="bits per byte only (a base model)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib", nargs="*", default=None, help="calibration files for gptq (default: built-in)")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows for gptq")
    parser.add_argument("--variants", type=int, default=len(VARIANTS), help="only the first N quantized rows")
    parser.add_argument("--results", type=Path, default=None, help="append the rows here as JSON lines")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")

    rows = [score("fp32", args.model, torch.float32, args, text), score("bf16", args.model, torch.bfloat16, args, text)]
    with tempfile.TemporaryDirectory() as scratch:
        for label, bits, group, method in VARIANTS[: args.variants]:
            out = Path(scratch) / label.replace(" ", "_").replace(",", "")
            start = time.perf_counter()
            quantize_model_dir(
                args.model, out, bits, group, method, Calibration(files=args.calib, samples=args.calib_samples)
            )
            rows.append(score(label, out, None, args, text, time.perf_counter() - start))

    print(f"\n{args.model}, held-out text {args.text} ({len(text.encode('utf-8')):,} bytes)\n")
    header = "| weights | linear layers | bits/byte |" + (" held-out accuracy |" if args.chat else "")
    print(header)
    print("|---|---|---|" + ("---|" if args.chat else ""))
    base = rows[0]
    for row in rows:
        delta = row is not base
        cells = [
            row["variant"],
            f"{row['linear_bytes'] / 1024:,.0f} KiB",
            f"{row['bpb']:.4f}" + (f" ({row['bpb'] - base['bpb']:+.4f})" if delta else ""),
        ]
        if args.chat:
            change = f" ({(row['accuracy'] - base['accuracy']) * 100:+.1f} pt)" if delta else ""
            cells.append(f"{row['accuracy']:.1%}{change}")
        print("| " + " | ".join(cells) + " |")
    if args.results:
        with args.results.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"model": str(args.model), **row}) + "\n")


if __name__ == "__main__":
    main()
