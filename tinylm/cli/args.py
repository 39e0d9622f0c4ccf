"""The command line's grammar: every command, its flags and their defaults, and the flags that are
config keys turned into ``--section.key=value`` overrides. Parsing only: nothing here runs a stage."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

from tinylm import __version__

CONFIG_DIR = Path(__file__).parents[1] / "configs"
OVERRIDES_HELP = (
    "Any config key can be set on the command line as --section.key=value, e.g. --train.max_steps=200 "
    "--model.num_hidden_layers=2 --train.precision=fp32 (values are YAML; `tinylm configs show NAME` prints "
    "every key). Set TINYLM_DEBUG=1 to see a traceback instead of a one-line error."
)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a config shipped with tinylm (``cpu-tiny``, ``minimind2-small``). A path
    like ``configs/cpu-tiny.yaml`` that does not exist here is the shipped config of that name (the
    README's commands then work from any folder)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{name}.yaml")
    if shipped.exists() and (path.suffix in (".yaml", ".yml") or len(path.parts) == 1):
        if path.suffix:
            print(f"{path} does not exist here: using the shipped {shipped.stem} config", file=sys.stderr)
        return shipped
    raise FileNotFoundError(f"config {name!r}: no such file, and not a shipped config ({', '.join(shipped_configs())})")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (unless it is empty or the help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


def add_command(commands, name: str, help: str, overrides: bool = False, stages: str = "") -> argparse.ArgumentParser:
    """A subcommand that refuses abbreviated options and shows defaults; ``overrides``: it takes
    --section.key=value (said in its help); ``stages``: what a prefixed override reaches (quickstarts)."""
    epilog = OVERRIDES_HELP if overrides else "Set TINYLM_DEBUG=1 to see a traceback instead of a one-line error."
    return commands.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"{epilog} {stages}".rstrip(),
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Sampling flags; each one left out keeps the model's default (its generation_config.json, where
    tinylm saves do_sample: false: greedy), as the server does for a request's missing fields."""
    group = parser.add_argument_group(
        "sampling (default: the model's generation_config.json; a model tinylm saved answers greedily)"
    )
    group.add_argument("--max-new-tokens", type=int, default=None, help="at most this many new tokens (256)")
    group.add_argument("--temperature", type=float, default=None, help="0 = greedy (tinylm's models: 0)")
    group.add_argument("--top-k", type=int, default=None, help="0 = off")
    group.add_argument("--top-p", type=float, default=None, help="1.0 = off")
    group.add_argument("--repetition-penalty", type=float, default=None, help="1.0 = off")
    group.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (as the API's seed)")
    add_model_args(parser)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step: slow first reply, faster after"
    )


DTYPES = ["float32", "bfloat16", "float16"]


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --kv-cache: where and in what precision an inference command runs the model."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="the weights' dtype (default: as saved)")
    parser.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "int8"],
        help="the KV cache's keys and values: auto = in the model's dtype; int8 = about half bf16's memory",
    )


def torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def add_quickstart(commands, help: str, stages: str) -> argparse.ArgumentParser:
    """A quickstart command: --out and --device, and overrides for the stages ``stages`` describes."""
    quick = add_command(commands, "quickstart", help, overrides=True, stages=stages)
    quick.add_argument("--out", required=True, help="run directory")
    quick.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default: the config's train.device)")
    return quick


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--out, --resume and --device: what every training command takes."""
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default: the config's train.device)")


TEMPLATE_HELP = "chat template: chatml | vicuna | llama-chinese | raw"


def add_fine_tune_args(
    parser: argparse.ArgumentParser,
    config: str,
    what: str,
    formats=(),
    init: str = "the model directory to fine-tune (tinylm's, or a local Llama/Qwen2/Qwen3)",
    data: str | None = None,
) -> None:
    """What every stage that starts from a model takes: its config, the model (--init), the data files
    (--data, and --format where there are several), the chat template and --skip-bad; ``what`` the
    data's records are called."""
    parser.add_argument("--config", default=config, help="config name or YAML path")
    parser.add_argument("--init", required=True, help=init)
    data = data or f".json / .jsonl(.gz) / .parquet {what} (default: the built-in ones)"
    parser.add_argument("--data", nargs="+", default=None, help=data)
    if formats:
        parser.add_argument("--format", default=None, choices=["auto", *formats], help=f"the {what}' format")
    parser.add_argument("--template", default=None, help=f"{TEMPLATE_HELP} (default: the config's, or the model's)")
    parser.add_argument(
        "--skip-bad", action="store_true", help=f"skip invalid {what} and report counts instead of stopping"
    )


def add_lora_args(parser: argparse.ArgumentParser, output: str = "the output is the adapter") -> None:
    group = parser.add_argument_group(
        "LoRA (more keys: --lora.dropout=0.05 --lora.target_modules=[q_proj,v_proj] --lora.rslora=true)"
    )
    group.add_argument("--lora", action="store_true", help=f"train a LoRA adapter instead of the whole model; {output}")
    group.add_argument(
        "--qlora", action="store_true", help="LoRA over a 4-bit NF4 copy of the frozen base (implies --lora)"
    )
    group.add_argument("--double-quant", action="store_true", help="QLoRA: quantize the 4-bit blocks' scales too")
    group.add_argument("--lora-r", type=int, default=None, help="adapter rank (default 8)")
    group.add_argument(
        "--lora-alpha", type=float, default=None, help="scaling numerator: the update is alpha / r · B A (default 16)"
    )


def lora_overrides(args) -> dict:
    qlora = getattr(args, "qlora", False)
    given = [
        flag
        for flag, value in (
            ("--lora-r", getattr(args, "lora_r", None)),
            ("--lora-alpha", getattr(args, "lora_alpha", None)),
            ("--double-quant", getattr(args, "double_quant", False) or None),
        )
        if value is not None
    ]
    if given and not (getattr(args, "lora", False) or qlora):
        raise ValueError(
            f"{', '.join(given)} given without --lora or --qlora: add one, or the run fine-tunes every weight"
        )
    if getattr(args, "double_quant", False) and not qlora:
        raise ValueError("--double-quant is part of QLoRA: use it with --qlora")
    return {
        "lora.enabled": (getattr(args, "lora", False) or qlora) or None,
        "lora.quantize": "nf4" if qlora else None,
        "lora.double_quant": getattr(args, "double_quant", False) or None,
        "lora.r": getattr(args, "lora_r", None),
        "lora.alpha": getattr(args, "lora_alpha", None),
    }


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def sampling_settings(args, engine):
    """The model's sampling defaults, with what the command line sets on top."""
    return engine.defaults.updated(**{name: getattr(args, name) for name in SAMPLING_FLAGS})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm",
        description="Build a small language model end to end. `tinylm COMMAND --help` tells more.",
        epilog=OVERRIDES_HELP,
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    torch_version = importlib.metadata.version("torch")
    parser.add_argument("--version", action="version", version=f"tinylm {__version__} (torch {torch_version})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quick = add_quickstart(
        commands,
        "corpus → tokenizer → pretraining → chat fine-tuning → what the models learned, in minutes",
        "Overrides set the pretraining; --sft.section.key=value the fine-tuning (--sft.train.max_steps=100).",
    )
    quick.add_argument("--config", default="cpu-tiny", help="config name or YAML path (default cpu-tiny)")

    tok = add_command(commands, "tokenizer", "train a tokenizer; encode and decode text with one").add_subparsers(
        dest="tokenizer_command", required=True, metavar="train|encode|decode"
    )
    tok_train = add_command(tok, "train", "train a byte-level BPE tokenizer")
    tok_train.add_argument(
        "--data", nargs="+", help=".txt / .jsonl / .json / .parquet files (default: the built-in corpus)"
    )
    tok_train.add_argument("--vocab-size", type=int, default=6400)
    tok_train.add_argument("--text-field", default="text", help="field holding the text in .jsonl / .json / .parquet")
    tok_train.add_argument(
        "--txt-split",
        default="blank",
        choices=["blank", "line", "file"],
        help=".txt documents: blank-line separated, one per line, or one per file",
    )
    tok_train.add_argument("--out", required=True, help="output directory")
    tok_encode = add_command(tok, "encode", "text → token ids, each with the piece of text it stands for")
    tok_encode.add_argument("tokenizer_dir", help="a tokenizer or model directory")
    tok_encode.add_argument("text", nargs="?", default=None, help="the text (default: read standard input)")
    tok_encode.add_argument("--ids-only", action="store_true", help="print the ids alone, on one line")
    tok_decode = add_command(tok, "decode", "token ids → text, and each id's piece")
    tok_decode.add_argument("tokenizer_dir", help="a tokenizer or model directory")
    tok_decode.add_argument("ids", nargs="+", help="ids, separated by spaces or commas (brackets allowed)")

    cfgs = add_command(commands, "configs", "list, show or copy the configs shipped with tinylm")
    cfgs.add_argument("action", nargs="?", default="list", choices=["list", "show", "copy"])
    cfgs.add_argument("name", nargs="?", default=None, help="a shipped config (show, copy)")
    cfgs.add_argument("dest", nargs="?", default=None, help="copy: where to (default: NAME.yaml here)")

    pre = add_command(commands, "pretrain", "pretrain (or continue pretraining) a model", overrides=True)
    pre.add_argument(
        "--config",
        default=None,
        help="config name or YAML path (default: cpu-tiny; with --minutes and --data, one sized to them)",
    )
    pre.add_argument(
        "--data",
        nargs="+",
        default=None,
        help=".txt / .jsonl / .json / .parquet files, plain or .gz (default: the built-in corpus)",
    )
    pre.add_argument(
        "--val-data", nargs="+", default=None, help="validation text (default: a share of --data's documents)"
    )
    pre.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="train for this long (train.max_minutes): the schedule ends on time, the best evaluation is kept",
    )
    pre.add_argument(
        "--tokenizer", default=None, help="a tokenizer (or model) directory (default: train one on the data)"
    )
    add_run_args(pre)
    pre.add_argument("--init", default=None, help="continue pretraining this model directory (its tokenizer too)")
    add_lora_args(pre)

    sft = add_command(commands, "sft", "supervised fine-tuning on conversations", overrides=True)
    add_fine_tune_args(sft, "sft-cpu-tiny", "conversations", ["openai", "sharegpt", "alpaca"])
    sft.add_argument(
        "--identity-name", default=None, help="the identity recipe: teach the assistant this name (mixed with the data)"
    )
    sft.add_argument("--identity-author", default=None, help="... and this author (who made it)")
    add_run_args(sft)
    add_lora_args(sft)

    dpo = add_command(commands, "dpo", "align a chat model with preference pairs (DPO, SimPO, ORPO)", overrides=True)
    formats = ["minimind", "llamafactory", "hh-rlhf"]
    add_fine_tune_args(dpo, "dpo-cpu-tiny", "pairs", formats, init="the chat model to align (an SFT run's final/)")
    dpo.add_argument(
        "--loss",
        default=None,
        choices=["sigmoid", "orpo", "simpo"],
        help="sigmoid = DPO (default); orpo and simpo need no reference",
    )
    dpo.add_argument("--beta", type=float, default=None, help="DPO/SimPO reward scale, ORPO odds-ratio weight")
    dpo.add_argument(
        "--precompute-ref",
        action="store_true",
        help="score the reference once before training instead of batch by batch",
    )
    add_run_args(dpo)
    add_lora_args(dpo)

    rm = add_command(commands, "rm", "train a reward model on preference pairs (Bradley-Terry)", overrides=True)
    add_fine_tune_args(rm, "rm-cpu-tiny", "pairs", formats, init="the chat model it starts from (an SFT run's final/)")
    add_run_args(rm)
    add_lora_args(rm, output="the output is the adapter and the score head (PEFT's SEQ_CLS layout)")

    grpo = add_command(
        commands, "grpo", "reinforcement learning with GRPO on verifiable or learned rewards", overrides=True
    )
    add_fine_tune_args(
        grpo,
        "grpo-cpu-tiny",
        "prompts",
        init="the chat model to train (an SFT run's final/)",
        data=".json / .jsonl(.gz) / .parquet prompts with answers, GSM8K's layout too (default: the built-in prompts)",
    )
    grpo.add_argument(
        "--reward",
        default=None,
        help="arithmetic | facts | think (built-in verifiers, joined by +) | rm:REWARD_MODEL_DIR | "
        "python:MODULE:FUNCTION (default: the config's; grpo-cpu-tiny's is facts)",
    )
    grpo.add_argument("--group-size", type=int, default=None, help="replies sampled per prompt (default 8)")
    add_run_args(grpo)
    add_lora_args(grpo)

    dis = add_command(
        commands, "distill", "train a small student on a teacher's next-token distributions", overrides=True
    )
    dis.add_argument("--teacher", required=True, help="the teacher model directory")
    dis.add_argument(
        "--student",
        required=True,
        help="the student: a model directory, or a config (name or YAML) whose model section shapes a new one",
    )
    dis.add_argument(
        "--config",
        default="cpu-tiny",
        help="data and training settings when --student is a model directory (default cpu-tiny)",
    )
    dis.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="text files (default: the built-in corpus); with --chat, conversation files",
    )
    dis.add_argument(
        "--chat", action="store_true", help="distill on conversations (the assistant's tokens) instead of text"
    )
    dis.add_argument("--temperature", type=float, default=None, help="above 1 softens both distributions (default 1)")
    dis.add_argument(
        "--kl-weight", type=float, default=None, help="share of the teacher term in the loss (default 0.5)"
    )
    add_run_args(dis)

    vlm = add_command(commands, "vlm", "vision-language models: two-stage training and a quickstart")
    vlm_commands = vlm.add_subparsers(dest="vlm_command", required=True, metavar="quickstart|pretrain|sft")
    vlm_quick = add_quickstart(
        vlm_commands,
        "built-in pictures → stage 1 → stage 2 → held-out accuracy, in minutes",
        "Overrides set both stages; --llm.section.key=value the language model's pretraining "
        "(--llm.train.max_steps=100).",
    )
    vlm_quick.add_argument(
        "--llm",
        default=None,
        help="the language model to start from (default: pretrain a small one on the built-in corpus)",
    )
    for stage, about in (
        (
            "pretrain",
            "stage 1: image-caption pairs train the projector (and --train-vision the encoder); the language model is "
            "frozen",
        ),
        ("sft", "stage 2: image conversations train the projector and the language model (or a LoRA adapter)"),
    ):
        sub = add_command(vlm_commands, stage, about, overrides=True)
        init = "the language model directory" if stage == "pretrain" else "stage 1's model directory (its final/)"
        data = "LLaVA / MiniMind-V / LLaMA-Factory / XTuner .json(l) / .parquet (default: the built-in pictures)"
        add_fine_tune_args(sub, f"vlm-{stage}-cpu-tiny", "samples", init=init, data=data)
        sub.add_argument(
            "--image-root", default=None, help="where relative image paths are found (default: beside each data file)"
        )
        sub.add_argument("--train-vision", action="store_true", help="train the vision encoder too")
        add_run_args(sub)
        if stage == "pretrain":
            sub.add_argument(
                "--vision",
                default=None,
                help="a local SigLIP/CLIP directory as the encoder (default: a new built-in ViT)",
            )
            sub.add_argument(
                "--feature-layer",
                type=int,
                default=None,
                help="the encoder layer that feeds the projector (default -1, the last)",
            )
            sub.add_argument(
                "--coco", nargs="+", default=None, help="COCO caption annotations (captions_*.json) instead of --data"
            )
            sub.add_argument(
                "--coco-images", default=None, help="the COCO image folder (default: found beside the annotations)"
            )
        else:
            add_lora_args(sub, output="it is merged into the saved model")

    gen = add_command(commands, "generate", "complete a prompt, streaming to stdout")
    gen.add_argument("model_dir")
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--image",
        action="append",
        default=None,
        help="a vision-language model: an image for each <image> tag of the prompt",
    )
    add_sampling_args(gen)

    chat = add_command(commands, "chat", "multi-turn chat in the terminal")
    chat.add_argument("model_dir")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument(
        "--prompts", help='answer the prompts of this file (.txt lines, .jsonl {"prompt": ...}), then exit'
    )
    chat.add_argument(
        "--output", default=None, help="with --prompts: write the answers here as JSON lines instead of printing them"
    )
    chat.add_argument(
        "--image",
        action="append",
        default=None,
        help="a vision-language model: show it this picture with the first message "
        "(with --prompts: with every prompt); repeat for several",
    )
    chat.add_argument("--rag", metavar="INDEX", default=None, help="answer every turn from this tinylm rag index")
    chat.add_argument("--rag-k", type=int, default=5, help="with --rag: passages retrieved per turn (default 5)")
    add_sampling_args(chat)

    srv = add_command(commands, "serve", "an OpenAI-compatible API and a web chat page, with continuous batching")
    srv.add_argument("model_dir")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key",
        default=os.environ.get("TINYLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $TINYLM_API_KEY; none: open)",
    )
    srv.add_argument(
        "--name",
        default=None,
        help="the model's name in the API (default: the directory's, or its run's for .../final)",
    )
    srv.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (each n>1 choice is one)")
    srv.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="prompt + reply tokens per sequence (default: the model's context, at most 4096)",
    )
    srv.add_argument(
        "--max-waiting", type=int, default=256, help="requests queued beyond the batch before new ones get 429"
    )
    srv.add_argument("--max-body-mb", type=float, default=16, help="largest request body (pictures travel inside it)")
    srv.add_argument(
        "--rag", metavar="INDEX", default=None, help="answer chat requests from this tinylm rag index, with sources"
    )
    srv.add_argument("--rag-k", type=int, default=5, help="with --rag: passages retrieved per request (default 5)")
    srv.add_argument(
        "--embedder",
        metavar="DIR",
        default=None,
        help="a local sentence-transformers / transformers encoder directory for /v1/embeddings "
        "(default: the --rag index's encoder, if it has one)",
    )
    srv.add_argument("--query-prefix", default="", help="what the encoder wants before a question (E5: 'query: ')")
    add_model_args(srv)
    srv.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step the scheduler runs: a slow start"
    )
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    merge = add_command(
        commands, "merge", "fold a LoRA adapter (tinylm's or PEFT's) into its base model: a plain model directory"
    )
    merge.add_argument("model_dir")
    merge.add_argument("adapter_dir")
    merge.add_argument("out_dir")

    export = add_command(commands, "export", "convert a model directory for other runtimes")
    formats = export.add_subparsers(dest="export_format", required=True, metavar="gguf")
    gguf = add_command(formats, "gguf", "one GGUF file for llama.cpp, Ollama and LM Studio (and an Ollama Modelfile)")
    gguf.add_argument("model_dir")
    gguf.add_argument("out", help="the .gguf file to write")
    gguf.add_argument(
        "--type",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"],
        help="the matrices' type (norms and biases stay f32; default f16; q4_k_m: by llama.cpp's quantizer)",
    )

    quantize = add_command(
        commands, "quantize", "8- or 4-bit integer weights (compressed-tensors' layout, for vLLM too)"
    )
    quantize.add_argument("model_dir")
    quantize.add_argument("--out", required=True, help="the model directory to write")
    quantize.add_argument("--bits", type=int, default=4, choices=[8, 4])
    quantize.add_argument(
        "--group-size",
        type=group_size,
        default=None,
        help="input columns per scale: 32, 64, 128, ... or 'channel' (default: 32 at 4 bits, channel at 8)",
    )
    quantize.add_argument(
        "--method", default="gptq", choices=["gptq", "rtn"], help="gptq: calibrated (default); rtn: round to nearest"
    )
    quantize.add_argument(
        "--calib", nargs="+", metavar="FILE", help="calibration text for gptq (default: the built-in corpus)"
    )
    quantize.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    quantize.add_argument("--calib-seq-len", type=int, default=256, help="tokens per window (default 256)")

    add_rag(commands)
    add_eval(commands)

    plot = add_command(commands, "plot", "(re)draw loss.png of a run from its metrics.jsonl")
    plot.add_argument("run_dir")
    report = add_command(
        commands,
        "report",
        "one self-contained HTML page (and markdown) about a run: every stage's settings, loss curves, "
        "evaluations, samples, wall times and tokens/s",
    )
    report.add_argument("run_dir")
    report.add_argument("--out", default=None, help="the folder for report.html and report.md (default RUN_DIR/report)")
    return parser


def add_eval(commands) -> None:
    ev = add_command(
        commands,
        "eval",
        "score a model on benchmarks (MMLU, C-Eval, CMMLU, ARC, HellaSwag, GSM8K), perplexity, prompts",
    )
    ev.add_argument("model_dir")
    ev.add_argument(
        "--tasks",
        required=True,
        help="comma-separated: mmlu, cmmlu, ceval, arc_challenge, arc_easy, hellaswag, gsm8k, builtin, "
        "ppl:FILE[,FILE...] (perplexity), prompts:FILE (answers saved for reading)",
    )
    ev.add_argument(
        "--data-dir",
        default=None,
        help="benchmark files in their published layout under DIR/<task>/ (default: through the datasets library)",
    )
    ev.add_argument("--shots", type=int, default=None, help="few-shot examples per item (default: 0; gsm8k 5)")
    ev.add_argument("--limit", type=int, default=None, help="the first N items of each task (of each subject)")
    ev.add_argument("--batch-size", type=int, default=32, help="items scored or generated together (default 32)")
    ev.add_argument("--chat", action="store_true", help="put each prompt through the model's chat template")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="generation tasks: reply budget (default 256)")
    ev.add_argument("--seed", type=int, default=0, help="builtin: the world whose held-out questions are asked")
    ev.add_argument("--out", default=None, help="write results.json, results.md and samples_<task>.jsonl here")
    ev.add_argument(
        "--card", action="store_true", help="also put the results in the model directory's card (its README.md)"
    )
    add_model_args(ev)


def add_rag(commands) -> None:
    rag = add_command(commands, "rag", "ask your documents: index files, search them, answer with citations")
    sub = rag.add_subparsers(dest="rag_command", required=True, metavar="index|search|ask|quickstart")
    index = add_command(sub, "index", "index files and folders into one SQLite file (again: brings it up to date)")
    index.add_argument("paths", nargs="+", help=".txt .md .html .pdf .json .jsonl files, or folders of them")
    index.add_argument("--out", required=True, help="the index file to write (or update)")
    index.add_argument("--chunk-size", type=int, default=120, help="passage size in terms: words, CJK characters")
    index.add_argument("--chunk-overlap", type=int, default=20, help="terms a passage repeats of the one before")
    add_embedder_args(index)
    search = add_command(sub, "search", "the passages a question retrieves, best first")
    search.add_argument("index")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="how many passages (default 5)")
    search.add_argument("--json", action="store_true", help="one JSON line per passage: source, score, text, ...")
    add_embedder_args(search)
    ask = add_command(sub, "ask", "answer a question from the index's passages, citing them")
    ask.add_argument("index")
    ask.add_argument("question")
    ask.add_argument("--model", required=True, help="the chat model's directory")
    ask.add_argument("-k", type=int, default=5, help="passages retrieved (those that fit the context go in)")
    ask.add_argument("--system", default=None, help="system prompt")
    ask.add_argument(
        "--prompt-template", default=None, help="the user's turn, with {passages} and {question} (default: docs/rag.md)"
    )
    add_embedder_args(ask)
    add_sampling_args(ask)
    quick = add_quickstart(
        sub,
        "teach the quickstart's chat model to read passages, then test it on a world it never saw",
        "Overrides (--section.key=value) go to the reading fine-tune (tinylm sft's settings); without --init, "
        "--quickstart.section.key=value to the quickstart's pretraining and --quickstart.sft.section.key=value to "
        "its fine-tuning.",
    )
    quick.add_argument("--init", default=None, help="the chat model to teach (default: run the quickstart first)")
    quick.add_argument("--questions", type=int, default=None, help="test questions per language (default: all)")


def add_embedder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embedder",
        default=None,
        help="a local sentence-transformers / transformers encoder directory: dense + lexical (hybrid) search",
    )
    parser.add_argument("--query-prefix", default="", help="what the encoder wants before a question (E5: 'query: ')")


def group_size(text: str) -> int | str:
    """--group-size: a whole number of input columns, or "channel" (one scale per output channel)."""
    if text == "channel":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of columns or 'channel', got {text!r}") from None


def is_model_dir(path: str) -> bool:
    return (Path(path) / "config.json").is_file() or (Path(path) / "adapter_config.json").is_file()


# training command → (its config class, the module that holds it and the recipe, the recipe function)
STAGES = {
    "pretrain": ("PretrainConfig", "tinylm.train.pretrain", "pretrain"),
    "sft": ("SFTConfig", "tinylm.train.sft", "sft"),
    "dpo": ("DPOConfig", "tinylm.train.dpo", "dpo"),
    "rm": ("RMConfig", "tinylm.train.rm", "rm"),
    "grpo": ("GRPOConfig", "tinylm.train.grpo", "grpo"),
    "distill": ("DistillConfig", "tinylm.train.distill", "distill"),
}
TRAINING_COMMANDS = ("quickstart", "vlm", *STAGES)  # the ones that take --section.key=value


def split_overrides(overrides: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """``--PREFIX.section.key=value`` overrides (without the prefix), and the rest: a quickstart runs two
    configs, and the prefix says which one an override is for."""
    start = f"--{prefix}."
    ours = [f"--{o[len(start) :]}" for o in overrides if o.startswith(start)]
    return ours, [o for o in overrides if not o.startswith(start)]


def flag_overrides(args) -> list[str]:
    """The command-line flags that are config keys, as --section.key=value overrides (flags win)."""
    if args.command not in TRAINING_COMMANDS:
        return []
    pairs = {
        "train.device": getattr(args, "device", None),
        "init_from": getattr(args, "init", None),
        **lora_overrides(args),
    }
    if args.command == "pretrain":
        pairs["data.tokenizer"] = args.tokenizer and json.dumps(args.tokenizer)
    if args.command == "sft":
        pairs.update(
            {
                "data.format": args.format,
                "data.template": args.template,
                "data.skip_bad": args.skip_bad or None,
                "data.identity_name": args.identity_name and json.dumps(args.identity_name, ensure_ascii=False),
                "data.identity_author": args.identity_author and json.dumps(args.identity_author, ensure_ascii=False),
            }
        )
    if args.command == "grpo":
        pairs.update(
            {
                "data.template": args.template,
                "data.skip_bad": args.skip_bad or None,
                "grpo.reward": args.reward and json.dumps(args.reward),
                "grpo.group_size": args.group_size,
            }
        )
    if args.command in ("dpo", "rm"):
        pairs.update(
            {
                "data.format": args.format,
                "data.template": args.template,
                "data.skip_bad": args.skip_bad or None,
            }
        )
    if args.command == "dpo":
        pairs.update(
            {
                "dpo.loss": args.loss,
                "dpo.beta": args.beta,
                "dpo.reference": "precomputed" if args.precompute_ref else None,
            }
        )
    if args.command == "distill":
        pairs.update(
            {
                "distill.teacher": json.dumps(args.teacher),
                "distill.corpus": "chat" if args.chat else None,
                "distill.temperature": args.temperature,
                "distill.kl_weight": args.kl_weight,
                "init_from": json.dumps(args.student) if is_model_dir(args.student) else None,
            }
        )
    if args.command == "vlm" and args.vlm_command != "quickstart":
        pairs.update(
            {
                "data.image_root": args.image_root and json.dumps(args.image_root),
                "data.skip_bad": args.skip_bad or None,
                "data.template": args.template,
                "vision.train": args.train_vision or None,
            }
        )
        if args.vlm_command == "pretrain":
            pairs.update(
                {
                    "vision.tower": args.vision and json.dumps(args.vision),
                    "vision.feature_layer": args.feature_layer,
                    "data.coco_images": args.coco_images and json.dumps(args.coco_images),
                }
            )
            if args.coco and args.data:
                raise ValueError("give --data or --coco, not both")
            if args.coco:
                pairs.update(
                    {"data.source": "coco", "data.files": "[" + ", ".join(json.dumps(f) for f in args.coco) + "]"}
                )
    if getattr(args, "val_data", None):
        pairs["data.val_files"] = "[" + ", ".join(json.dumps(f) for f in args.val_data) + "]"
    if getattr(args, "minutes", None):
        pairs["train.max_minutes"] = args.minutes
    if getattr(args, "data", None):
        section = "chat" if getattr(args, "chat", False) else "data"  # distill --chat reads conversations
        pairs.update(
            {f"{section}.source": "files", f"{section}.files": "[" + ", ".join(json.dumps(f) for f in args.data) + "]"}
        )
    return [
        f"--{key}={value}" if not isinstance(value, bool) else f"--{key}={str(value).lower()}"
        for key, value in pairs.items()
        if value is not None
    ]
