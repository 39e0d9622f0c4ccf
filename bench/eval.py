"""How fast `tinylm eval` scores multiple choice: the shared-context scorer against one forward per choice.

    python bench/eval.py                                   # cpu-tiny and minimind2-small shapes
    python bench/eval.py --sizes minimind2-small --items 128 --context 512 --results eval.jsonl

Each item is a context of ``--context`` random token ids and four continuations: one token each (the
letters " A" … " D" of MMLU, C-Eval, CMMLU) or ``--answer-tokens`` tokens each (whole answers, as ARC and
HellaSwag score them). Random weights of each config's shape: speed does not depend on what a model
learned.

- **naive**: for every choice, one forward over context + continuation (what a simple loop does);
- **scorer**: ``tinylm.eval.loglik.Scorer``: the contexts of ``--batch-size`` items in one left-padded
  forward into a KV cache, every first continuation token scored from it, longer continuations run
  as one batch on copies of their item's cache rows.

Both run on the same items in alternating rounds (so a change in the machine's speed hits both alike);
the table gives the median items/s of each, the speedup, and the largest difference between their
log-likelihoods (they compute the same numbers). Markdown to stdout; ``--results`` appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tinylm.config import load_config
from tinylm.eval.loglik import Request, Scorer, naive_scores
from tinylm.infer.engine import Engine
from tinylm.model.llama import CausalLM
from tinylm.train.pretrain import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "tinylm" / "configs"


def items(vocab: int, count: int, context: int, answer_tokens: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(4, vocab) for _ in range(n)]  # noqa: E731
    return [Request(ids(context), [ids(answer_tokens) for _ in range(4)]) for _ in range(count)]


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def naive_all(model, requests: list[Request]) -> list:
    return [naive_scores(model, r) for r in requests]


def measure(size: str, args) -> list[dict]:
    torch.manual_seed(0)
    model = CausalLM(load_config(PretrainConfig, CONFIGS / f"{size}.yaml").model).eval()
    engine = Engine(model, device="cpu")
    rows = []
    for kind, length in (("letters", 1), ("answers", args.answer_tokens)):
        requests = items(model.config.vocab_size, args.items, args.context, length)
        scorer = Scorer(engine, args.batch_size)
        times = {"naive": [], "scorer": []}
        scored = naive = None
        for _ in range(args.rounds):
            seconds, scored = timed(scorer.score, requests)
            times["scorer"].append(seconds)
            seconds, naive = timed(naive_all, model, requests)
            times["naive"].append(seconds)
        difference = max(abs(a.logprob - b.logprob) for x, y in zip(scored, naive) for a, b in zip(x, y))
        rate = {k: args.items / statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "size": size,
                "continuations": kind,
                "tokens_per_choice": length,
                "context": args.context,
                "items": args.items,
                "naive_items_s": rate["naive"],
                "scorer_items_s": rate["scorer"],
                "speedup": rate["scorer"] / rate["naive"],
                "max_logprob_difference": difference,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["cpu-tiny", "minimind2-small"])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--context", type=int, default=256, help="context tokens per item")
    parser.add_argument("--answer-tokens", type=int, default=8, help="tokens per continuation of the answers kind")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--results", type=Path, help="append one JSON line per row here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for size in args.sizes for row in measure(size, args)]
    print("| shape | continuations | naive items/s | scorer items/s | speedup | max Δ log-lik |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kind = f"{r['continuations']} ({r['tokens_per_choice']} token{'s' * (r['tokens_per_choice'] > 1)})"
        print(
            f"| {r['size']} | {kind} | {r['naive_items_s']:.1f} | {r['scorer_items_s']:.1f} | "
            f"{r['speedup']:.1f}× | {r['max_logprob_difference']:.1e} |"
        )
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
