"""The command line's grammar: ``build_parser`` and every command's flags and defaults, the training
commands' in ``training_args`` (with the flags that are config keys), the pieces they share in
``parsing``. Parsing only: nothing here runs a stage."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os

from tinylm import __version__
from tinylm.cli.parsing import (
    MODEL_HELP,
    OVERRIDES_HELP,
    HelpFormatter,
    add_command,
    add_model_args,
    add_quickstart,
    add_revision_arg,
    add_sampling_args,
)
from tinylm.cli.training_args import HUB_DATA, add_training_commands


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
        "--data",
        nargs="+",
        help=f".txt / .jsonl / .json / .parquet files, or {HUB_DATA} (default: the built-in corpus)",
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
    tok_encode.add_argument("tokenizer_dir", help="a tokenizer or model directory, or a model's Hub id")
    add_revision_arg(tok_encode, "TOKENIZER_DIR")
    tok_encode.add_argument("text", nargs="?", default=None, help="the text (default: read standard input)")
    tok_encode.add_argument("--ids-only", action="store_true", help="print the ids alone, on one line")
    tok_decode = add_command(tok, "decode", "token ids → text, and each id's piece")
    tok_decode.add_argument("tokenizer_dir", help="a tokenizer or model directory, or a model's Hub id")
    add_revision_arg(tok_decode, "TOKENIZER_DIR")
    tok_decode.add_argument("ids", nargs="+", help="ids, separated by spaces or commas (brackets allowed)")

    cfgs = add_command(commands, "configs", "list, show or copy the configs shipped with tinylm")
    cfgs.add_argument("action", nargs="?", default="list", choices=["list", "show", "copy"])
    cfgs.add_argument("name", nargs="?", default=None, help="a shipped config (show, copy)")
    cfgs.add_argument("dest", nargs="?", default=None, help="copy: where to (default: NAME.yaml here)")

    add_training_commands(commands)

    gen = add_command(commands, "generate", "complete a prompt, streaming to stdout")
    gen.add_argument("model_dir", help=MODEL_HELP)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--image",
        action="append",
        default=None,
        help="a vision-language model: an image for each <image> tag of the prompt",
    )
    add_sampling_args(gen)

    chat = add_command(commands, "chat", "multi-turn chat in the terminal")
    chat.add_argument("model_dir", help=MODEL_HELP)
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
    srv.add_argument("model_dir", help=MODEL_HELP)
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
        help="the model's name in the API (default: its Hub id, the directory's name, or its run's for .../final)",
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
        help="a sentence-transformers / transformers encoder directory (or Hub id) for /v1/embeddings "
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
    merge.add_argument("model_dir", help="the base model: " + MODEL_HELP)
    merge.add_argument("adapter_dir", help="the adapter's directory, or its Hub id")
    merge.add_argument("out_dir")
    add_revision_arg(merge)

    export = add_command(commands, "export", "convert a model directory for other runtimes")
    formats = export.add_subparsers(dest="export_format", required=True, metavar="gguf")
    gguf = add_command(formats, "gguf", "one GGUF file for llama.cpp, Ollama and LM Studio (and an Ollama Modelfile)")
    gguf.add_argument("model_dir", help=MODEL_HELP)
    add_revision_arg(gguf)
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
    quantize.add_argument("model_dir", help=MODEL_HELP)
    add_revision_arg(quantize)
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
    ev.add_argument("model_dir", help=MODEL_HELP)
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
    ask.add_argument("--model", required=True, help="the chat model: " + MODEL_HELP)
    ask.add_argument("-k", type=int, default=5, help="passages retrieved (those that fit the context go in)")
    ask.add_argument("--system", default=None, help="system prompt")
    ask.add_argument(
        "--prompt-template", default=None, help="the user's turn, with {passages} and {question} (default: docs/rag.md)"
    )
    add_embedder_args(ask)
    add_sampling_args(ask, "--model")
    quick = add_quickstart(
        sub,
        "teach the quickstart's chat model to read passages, then test it on a world it never saw",
        "Overrides (--section.key=value) go to the reading fine-tune (tinylm sft's settings); without --init, "
        "--quickstart.section.key=value to the quickstart's pretraining and --quickstart.sft.section.key=value to "
        "its fine-tuning.",
    )
    quick.add_argument(
        "--init", default=None, help="the chat model to teach, a directory or Hub id (default: run the quickstart)"
    )
    add_revision_arg(quick, "--init")
    quick.add_argument("--questions", type=int, default=None, help="test questions per language (default: all)")


def add_embedder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embedder",
        default=None,
        help="a sentence-transformers / transformers encoder directory, or its Hub id: dense + lexical (hybrid) search",
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
