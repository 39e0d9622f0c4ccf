"""How fast the engine samples a group of answers to one prompt (the rollouts of RL methods like GRPO).

    python bench/rollouts.py                              # cpu-tiny and minimind2-small, groups of 8
    python bench/rollouts.py --sizes minimind2-small --group 16 --prompt-tokens 256 --new-tokens 64

Three ways to get ``--group`` sampled answers of ``--new-tokens`` tokens to one prompt of
``--prompt-tokens`` tokens (random weights of each config's shape; sampling at temperature 1, so
no row stops early and every way generates the same number of tokens):

- **one at a time**: the group's answers generated one after another (prefill, then decode, G times);
- **batched**: the G answers decoded together, each row prefilled on its own (G copies of the prompt
  that differ in their first token, so nothing is shared);
- **batched, shared prefill**: the prompt repeated G times, as RL asks for a group: the engine prefills
  it once and copies its cache rows to the group (``Engine.shared_prefill``).

The ways alternate over ``--rounds`` so a change in the machine's speed hits all alike; the table gives
the median generated tokens per second of each and the speedups over one at a time. Markdown to
stdout; ``--results`` appends JSON lines.
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
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.model.llama import CausalLM
from tinylm.train.pretrain import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "tinylm" / "configs"


def one_at_a_time(engine: Engine, prompt: list[int], group: int, settings: SamplingSettings):
    return [engine.generate([prompt], settings)[0] for _ in range(group)]


def batched(engine: Engine, prompt: list[int], group: int, settings: SamplingSettings):
    distinct = [[4 + i, *prompt[1:]] for i in range(group)]  # no two rows alike: each prefilled
    return engine.generate(distinct, settings)


def shared(engine: Engine, prompt: list[int], group: int, settings: SamplingSettings):
    return engine.generate([prompt] * group, settings)


WAYS = {"one at a time": one_at_a_time, "batched": batched, "batched, shared prefill": shared}


def measure(size: str, args) -> dict:
    torch.manual_seed(0)
    model = CausalLM(load_config(PretrainConfig, CONFIGS / f"{size}.yaml").model).eval()
    engine = Engine(model, device="cpu")
    rng = random.Random(0)
    prompt = [rng.randrange(4, model.config.vocab_size) for _ in range(args.prompt_tokens)]
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=1.0, seed=0, stop_token_ids=[])
    rates = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way, run in WAYS.items():
            start = time.perf_counter()
            answers = run(engine, prompt, args.group, settings)
            seconds = time.perf_counter() - start
            rates[way].append(sum(len(a) for a in answers) / seconds)
    row = {"size": size, "group": args.group, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    row.update({f"{way} tokens/s": statistics.median(r) for way, r in rates.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["cpu-tiny", "minimind2-small"])
    parser.add_argument("--group", type=int, default=8, help="answers sampled per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--results", type=Path, help="append one JSON line per row here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(size, args) for size in args.sizes]
    print("| shape | group | one at a time tok/s | batched tok/s | shared prefill tok/s | speedup (batched, shared) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        alone, each, one = (r[f"{way} tokens/s"] for way in WAYS)
        print(
            f"| {r['size']} | {r['group']} | {alone:.1f} | {each:.1f} | {one:.1f} | "
            f"{each / alone:.2f}×, {one / alone:.2f}× |"
        )
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
