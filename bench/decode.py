"""Batch-1 greedy decoding speed: tinylm's Engine against transformers' ``generate`` (and llama.cpp).

Both get the same weights, the same prompt and the same number of new tokens, in fp32 on the CPU
(transformers with its SDPA attention). Neither has a token to stop on, so both generate exactly
``--new-tokens``; the script checks that they also generate the *same* tokens. Runs alternate in one
process (ours, theirs, ours, theirs, ...) so a busy machine slows both alike; the summary is the median.

    python bench/decode.py                                  # cpu-tiny and minimind2-small, random weights
    python bench/decode.py --model-dir runs/tiny/final      # a saved model instead
    python bench/decode.py --compile                        # also time Engine(compile=True)
    python bench/decode.py --llama-cpp f32 q8_0 q4_0          # also llama.cpp on the same weights, as GGUF
    python bench/decode.py --tinylm bf16 int8 int4           # also tinylm on bf16 / int8 / int4 weights
    python bench/decode.py --sizes 100m                      # a ~100M-parameter shape

llama.cpp (through llama-cpp-python) gets the weights as ``tinylm export gguf`` writes them, runs with
as many threads as torch, and decodes greedily too; at f32 its tokens are checked against the others'.

tinylm's quantized rows run the same weights rounded as ``tinylm quantize --method rtn`` rounds them
(int8: one scale per output channel; int4: groups of 32, as llama.cpp's Q4_0 blocks), through the
engine's low-bit kernels. Each size also gets its memory-bandwidth bound: the bytes a decode step must
read (every weight matrix in its format, one embedding row) against this machine's measured copy speed.

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
from tinylm.model.intquant import IntLinear, IntScheme, decoder_linears, replace_module
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.train.pretrain import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "tinylm" / "configs"
SIZES = ("cpu-tiny", "minimind2-small", "100m")  # configs/<name>.yaml's shapes (vocab 6400), and one of ~100M
SHAPE_100M = dict(
    vocab_size=6400,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
TINYLM_TYPES = ("bf16", "int8", "int4")


def model_of_size(name: str) -> CausalLM:
    if name == "100m":
        return CausalLM(ModelConfig(**SHAPE_100M)).eval()
    return CausalLM(load_config(PretrainConfig, CONFIGS / f"{name}.yaml").model).eval()


def tinylm_variant(model: CausalLM, kind: str) -> CausalLM:
    """A copy of ``model`` in bf16, or with its decoder's linear layers rounded to int8 / int4."""
    copy = CausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    if kind == "bf16":
        return copy.to(torch.bfloat16)
    scheme = IntScheme(8, None) if kind == "int8" else IntScheme(4, 32)
    for name in decoder_linears(copy):
        replace_module(copy, name, IntLinear.from_linear(copy.get_submodule(name), scheme))
    return copy


def step_bytes(model: CausalLM) -> int:
    """Bytes one decode step reads: every matrix in its stored format (the lm_head too) and one embedding row."""
    total = 0
    for module in model.modules():
        if isinstance(module, IntLinear):
            total += module.nbytes
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    embedding = model.model.embed_tokens.weight
    return total + embedding.shape[1] * embedding.element_size()


def memory_bandwidth(megabytes: int = 512, rounds: int = 5) -> float:
    """Bytes per second this machine moves in a large copy (read and write counted), best of ``rounds``."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


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


def llama_cpp_runs(model: CausalLM, prompt: list[int], new_tokens: int, types: list[str], work: Path) -> dict:
    """One greedy run per GGUF type of the same weights, in llama.cpp."""
    import llama_cpp

    from tinylm.export.gguf import export_gguf
    from tinylm.modeldir import save_model_dir
    from tinylm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["a small text to give the file a tokenizer"] * 4, vocab_size=300)
    save_model_dir(model, work / "model", tokenizer)  # rows past the tokenizer's become unused tokens
    runs = {}
    for kind in types:
        path = export_gguf(work / "model", work / f"{kind}.gguf", kind)[0]
        llm = llama_cpp.Llama(
            str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=torch.get_num_threads(), verbose=False
        )

        def generate(llm=llm):
            llm.reset()
            tokens = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    return tokens
            return tokens

        runs[f"llama.cpp {kind}"] = generate
    return runs


def compare(
    name: str,
    model: CausalLM,
    prompt: list[int],
    new_tokens: int,
    rounds: int,
    compile: bool,
    llama_types: list[str] = (),
    work: Path | None = None,
    tinylm_types: list[str] = (),
) -> float:
    """Print tokens/s of each contestant per round and the median speed-up; return that median."""
    hf = transformers_twin(model)
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0, stop_token_ids=[])
    contestants = {"tinylm": Engine(model)}
    if compile:
        contestants["tinylm+compile"] = Engine(model, compile=True)
    variants = {f"tinylm {kind}": tinylm_variant(model, kind) for kind in tinylm_types}
    contestants.update({label: Engine(variant) for label, variant in variants.items()})
    runs = {label: (lambda e=engine: e.generate([prompt], settings)[0]) for label, engine in contestants.items()}
    prompt_tensor = torch.tensor([prompt])

    def transformers_generate():
        with torch.inference_mode():
            out = hf.generate(
                prompt_tensor, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    runs["transformers"] = transformers_generate
    if llama_types:
        runs.update(llama_cpp_runs(model, prompt, new_tokens, llama_types, work / name.replace("/", "_")))

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\n{name}: {params:.1f}M parameters, prompt {len(prompt)} tokens, {new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    outputs = {label: run() for label, run in runs.items()}  # warm-up (and compilation)
    reference = outputs["transformers"]
    for label, tokens in outputs.items():
        if tokens == reference:
            agree = "same tokens"
        elif label in variants or (label.startswith("llama.cpp") and not label.endswith("f32")):
            agree = f"rounded weights: {sum(a == b for a, b in zip(tokens, reference))}/{len(reference)} tokens agree"
        else:
            agree = f"DIFFERENT tokens from transformers ({len(tokens)} vs {len(reference)})"
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
    for label in [*contestants, *(label for label in runs if label.startswith("llama.cpp"))]:
        ratio = statistics.median(a / b for a, b in zip(rates[label], rates["transformers"]))
        print(
            f"  median: {label} {medians[label]:.0f} tok/s vs transformers {medians['transformers']:.0f} tok/s "
            f"→ {ratio:.2f}x"
        )
    bandwidth = memory_bandwidth()
    for label, weights in {"fp32": model, **variants}.items():
        size = step_bytes(weights)
        print(
            f"  bound: {label.removeprefix('tinylm ')} weights, {size / 2**20:.1f} MiB read per token at "
            f"{bandwidth / 1e9:.1f} GB/s → at most {bandwidth / size:.0f} tok/s"
        )
    ceiling = weight_streaming_ceiling(model)
    print(
        f"  ceiling: one matrix-vector product per weight matrix alone runs at {ceiling:.0f} tok/s, "
        f"{ceiling / medians['transformers']:.2f}x transformers: no engine built on torch's fp32 matrix-vector "
        "products can be further ahead"
    )
    return statistics.median(a / b for a, b in zip(rates["tinylm"], rates["transformers"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="benchmark this saved model instead of the random ones")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES[:2]), choices=SIZES)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time the engine with torch.compile")
    parser.add_argument(
        "--llama-cpp",
        nargs="*",
        default=[],
        choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
        help="also time llama.cpp on these GGUF types of the same weights (needs llama-cpp-python)",
    )
    parser.add_argument(
        "--tinylm",
        nargs="*",
        default=[],
        choices=TINYLM_TYPES,
        help="also time tinylm's engine on these weight types (bf16, rounded int8 / int4)",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench_decode"), help="where the GGUF files go")
    args = parser.parse_args()
    if args.llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print('llama.cpp skipped: llama-cpp-python is not installed (pip install -e ".[llama]")')
            args.llama_cpp = []

    torch.manual_seed(0)
    if args.model_dir:
        from tinylm.modeldir import load_model_dir

        model, _ = load_model_dir(args.model_dir, device="cpu", dtype=torch.float32, with_tokenizer=False)
        models = {args.model_dir: model}
    else:
        models = {name: model_of_size(name) for name in args.sizes}
    for name, model in models.items():
        prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,)).tolist()
        compare(name, model, prompt, args.new_tokens, args.rounds, args.compile, args.llama_cpp, args.work, args.tinylm)


if __name__ == "__main__":
    main()
