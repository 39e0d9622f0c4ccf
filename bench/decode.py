"""Batch-1 greedy decoding speed: tinylm's Engine against transformers' ``generate``.

Both get the same weights, the same prompt and the same number of new tokens, in fp32 on the CPU
(transformers with its SDPA attention). Neither has a token to stop on, so both generate exactly
``--new-tokens``; the script checks that they also generate the *same* tokens. Runs alternate in one
process (ours, theirs, ours, theirs, ...) so a busy machine slows both alike; the summary is the median.

    python bench/decode.py                                  # cpu-tiny and minimind2-small, random weights
    python bench/decode.py --model-dir runs/tiny/final      # a saved model instead
    python bench/decode.py --compile                        # also time Engine(compile=True)

Speed does not depend on what the weights learned, so random weights measure the same thing.
"""

from __future__ import annotations

import argparse
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
SIZES = ("cpu-tiny", "minimind2-small")  # the model shapes of configs/<name>.yaml, vocab 6400


def transformers_twin(model: CausalLM):
    """The same weights in transformers' own implementation of the architecture."""
    import transformers

    config = transformers.AutoConfig.for_model(**model.config.to_hf_dict())
    twin = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def weight_streaming_ceiling(model: CausalLM, rounds: int = 20) -> float:
    """Tokens/s of a decode step that did nothing but multiply one vector by every weight matrix.

    No engine can decode faster than this on the machine: it is the floor set by reading the weights
    from memory (or the CPU cache) once per token, with no attention, norms, sampling or Python.
    """
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    vectors = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in matrices]
    with torch.inference_mode():
        for v, w in zip(vectors, matrices):  # warm-up
            torch.nn.functional.linear(v, w)
        start = time.perf_counter()
        for _ in range(rounds):
            for v, w in zip(vectors, matrices):
                torch.nn.functional.linear(v, w)
    return rounds / (time.perf_counter() - start)


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def compare(name: str, model: CausalLM, prompt: list[int], new_tokens: int, rounds: int, compile: bool) -> float:
    """Print tokens/s of each contestant per round and the median speed-up; return that median."""
    hf = transformers_twin(model)
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0, stop_token_ids=[])
    contestants = {"tinylm": Engine(model)}
    if compile:
        contestants["tinylm+compile"] = Engine(model, compile=True)
    runs = {label: (lambda e=engine: e.generate([prompt], settings)[0]) for label, engine in contestants.items()}
    prompt_tensor = torch.tensor([prompt])

    def transformers_generate():
        with torch.inference_mode():
            out = hf.generate(
                prompt_tensor, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    runs["transformers"] = transformers_generate

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\n{name}: {params:.1f}M parameters, prompt {len(prompt)} tokens, {new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    outputs = {label: run() for label, run in runs.items()}  # warm-up (and compilation)
    reference = outputs["transformers"]
    for label, tokens in outputs.items():
        agree = (
            "same tokens"
            if tokens == reference
            else f"DIFFERENT tokens from transformers ({len(tokens)} vs {len(reference)})"
        )
        print(f"  {label:>15}: {agree}")

    rates = {label: [] for label in runs}
    for round_ in range(rounds):
        for label, run in runs.items():
            seconds, tokens = timed(run)
            assert len(tokens) == new_tokens, f"{label} generated {len(tokens)} tokens, not {new_tokens}"
            rates[label].append(new_tokens / seconds)
        line = "  ".join(f"{label} {rates[label][-1]:7.0f} tok/s" for label in runs)
        print(f"  round {round_ + 1}: {line}  ratio {rates['tinylm'][-1] / rates['transformers'][-1]:.2f}x")

    medians = {label: statistics.median(r) for label, r in rates.items()}
    for label in contestants:
        ratio = statistics.median(a / b for a, b in zip(rates[label], rates["transformers"]))
        print(
            f"  median: {label} {medians[label]:.0f} tok/s vs transformers {medians['transformers']:.0f} tok/s "
            f"→ {ratio:.2f}x"
        )
    ceiling = weight_streaming_ceiling(model)
    print(
        f"  ceiling: one matrix-vector product per weight matrix alone runs at {ceiling:.0f} tok/s, "
        f"{ceiling / medians['transformers']:.2f}x transformers: no fp32 engine can be further ahead"
    )
    return statistics.median(a / b for a, b in zip(rates["tinylm"], rates["transformers"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="benchmark this saved model instead of the random ones")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the engine with torch.compile")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model_dir:
        from tinylm.modeldir import load_model_dir

        model, _ = load_model_dir(args.model_dir, device="cpu", dtype=torch.float32, with_tokenizer=False)
        models = {args.model_dir: model}
    else:
        models = {
            name: CausalLM(load_config(PretrainConfig, CONFIGS / f"{name}.yaml").model).eval() for name in args.sizes
        }
    for name, model in models.items():
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,)).tolist()
        compare(name, model, prompt, args.new_tokens, args.rounds, args.compile)


if __name__ == "__main__":
    main()
