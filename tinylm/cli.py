"""``tinylm <command>``: parse arguments, call one function. No logic lives here.

    tinylm quickstart --out runs/quickstart
    tinylm tokenizer train --data a.txt b.jsonl --vocab-size 6400 --out runs/tok
    tinylm pretrain --config configs/cpu-tiny.yaml --out runs/tiny [--resume] [--train.max_steps=200 ...]
    tinylm sft --init runs/tiny/final --data chats.jsonl --out runs/chat [--template chatml] [--lora | --qlora]
    tinylm dpo --init runs/chat/final --data pairs.jsonl --out runs/dpo [--loss sigmoid|orpo|simpo] [--lora]
    tinylm distill --teacher runs/big/final --student cpu-tiny --out runs/student [--data a.txt] [--chat]
    tinylm vlm quickstart --out runs/vlm
    tinylm vlm pretrain --init runs/chat/final --out runs/vlm1 [--vision SIGLIP_DIR]
                        [--data captions.jsonl | --coco captions.json]
    tinylm vlm sft --init runs/vlm1/final --out runs/vlm2 [--data conversations.jsonl] [--lora]
    tinylm generate runs/tiny/final --prompt "Once upon a time" --max-new-tokens 64
    tinylm chat runs/tiny/final [--system TEXT] [--image PATH]
    tinylm merge runs/tiny/final runs/adapter runs/merged
    tinylm plot runs/tiny
    tinylm tokenizer encode runs/tiny/final "Hello, 世界"
    tinylm configs [list | show cpu-tiny | copy cpu-tiny my.yaml]

Errors in what the user handed us (a config key, a data file, a model directory) print one line naming
the culprit, not a traceback; set TINYLM_DEBUG=1 to see the traceback anyway.

A command imports its modules only when it runs, so ``tinylm --help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import sys
from pathlib import Path

from tinylm import __version__

CONFIG_DIR = Path(__file__).parent / "configs"
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


def add_command(commands, name: str, help: str, overrides: bool = False) -> argparse.ArgumentParser:
    """A subcommand that refuses abbreviated options and shows defaults; ``overrides``: it takes
    --section.key=value (said in its help)."""
    return commands.add_parser(
        name,
        help=help,
        description=help,
        epilog=OVERRIDES_HELP if overrides else "Set TINYLM_DEBUG=1 to see a traceback instead of a one-line error.",
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
    """--device and --dtype: where and in what precision an inference command runs the model."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="the weights' dtype (default: as saved)")


def torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--out, --resume and --device: what every training command takes."""
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default: the config's train.device)")


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


def sampling_settings(args, engine):
    """The model's sampling defaults, with what the command line sets on top."""
    return engine.defaults.updated(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


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

    quick = add_command(
        commands,
        "quickstart",
        "corpus → tokenizer → pretraining → chat fine-tuning → what the models learned, in minutes",
        overrides=True,
    )
    quick.add_argument("--out", required=True, help="run directory")
    quick.add_argument("--config", default="cpu-tiny", help="config name or YAML path (default cpu-tiny)")
    quick.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default: the config's train.device)")

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
    pre.add_argument("--config", default="cpu-tiny", help="config name or YAML path")
    pre.add_argument(
        "--data",
        nargs="+",
        default=None,
        help=".txt / .jsonl / .json / .parquet files, plain or .gz (default: the built-in corpus)",
    )
    pre.add_argument(
        "--tokenizer", default=None, help="a tokenizer (or model) directory (default: train one on the data)"
    )
    add_run_args(pre)
    pre.add_argument("--init", default=None, help="continue pretraining this model directory (its tokenizer too)")
    add_lora_args(pre)

    sft = add_command(commands, "sft", "supervised fine-tuning on conversations", overrides=True)
    sft.add_argument("--config", default="sft-cpu-tiny", help="config name or YAML path")
    sft.add_argument(
        "--init", required=True, help="the model directory to fine-tune (tinylm, or a local Llama/Qwen2/Qwen3)"
    )
    sft.add_argument(
        "--data", nargs="+", default=None, help=".json / .jsonl / .parquet conversations (default: the built-in ones)"
    )
    sft.add_argument(
        "--format",
        default=None,
        choices=["auto", "openai", "sharegpt", "alpaca"],
        help="conversation format (default: auto)",
    )
    sft.add_argument("--template", default=None, help="chat template: chatml | vicuna | llama-chinese | raw")
    sft.add_argument(
        "--skip-bad", action="store_true", help="skip invalid conversations and report counts instead of stopping"
    )
    sft.add_argument(
        "--identity-name", default=None, help="the identity recipe: teach the assistant this name (mixed with the data)"
    )
    sft.add_argument("--identity-author", default=None, help="... and this author (who made it)")
    add_run_args(sft)
    add_lora_args(sft)

    dpo = add_command(commands, "dpo", "align a chat model with preference pairs (DPO, SimPO, ORPO)", overrides=True)
    dpo.add_argument("--config", default="dpo-cpu-tiny", help="config name or YAML path")
    dpo.add_argument(
        "--init", required=True, help="the chat model to align (an SFT run's final/, or a local model directory)"
    )
    dpo.add_argument(
        "--data",
        nargs="+",
        default=None,
        help=".json / .jsonl(.gz) / .parquet preference pairs (default: the built-in ones)",
    )
    dpo.add_argument(
        "--format",
        default=None,
        choices=["auto", "minimind", "llamafactory", "hh-rlhf"],
        help="pair format (default: auto)",
    )
    dpo.add_argument("--template", default=None, help="chat template (default: the model's own)")
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
    dpo.add_argument("--skip-bad", action="store_true", help="skip invalid pairs and report counts instead of stopping")
    add_run_args(dpo)
    add_lora_args(dpo)

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
    vlm_quick = add_command(
        vlm_commands, "quickstart", "built-in pictures → stage 1 → stage 2 → held-out accuracy, in minutes", True
    )
    vlm_quick.add_argument("--out", required=True, help="run directory")
    vlm_quick.add_argument(
        "--llm",
        default=None,
        help="the language model to start from (default: pretrain a small one on the built-in corpus)",
    )
    vlm_quick.add_argument("--device", default=None, help="auto | cpu | cuda | mps")
    for stage, about in (
        (
            "pretrain",
            "stage 1: image-caption pairs train the projector (and --train-vision the encoder); the language model is "
            "frozen",
        ),
        ("sft", "stage 2: image conversations train the projector and the language model (or a LoRA adapter)"),
    ):
        sub = add_command(vlm_commands, stage, about, overrides=True)
        sub.add_argument("--config", default=f"vlm-{stage}-cpu-tiny", help="config name or YAML path")
        sub.add_argument(
            "--init",
            required=True,
            help="the language model directory" if stage == "pretrain" else "stage 1's model directory (its final/)",
        )
        sub.add_argument(
            "--data",
            nargs="+",
            default=None,
            help="LLaVA / MiniMind-V / LLaMA-Factory / XTuner .json(l) / .parquet (default: the built-in pictures)",
        )
        sub.add_argument(
            "--image-root", default=None, help="where relative image paths are found (default: beside each data file)"
        )
        sub.add_argument(
            "--skip-bad", action="store_true", help="skip invalid samples and report counts instead of stopping"
        )
        sub.add_argument("--template", default=None, help="chat template: chatml | vicuna | llama-chinese | raw")
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
        "--prompts",
        default=None,
        help='answer each prompt of this file (.txt: one per line; .jsonl: {"prompt": ...}) and exit',
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

    plot = add_command(commands, "plot", "(re)draw loss.png of a run from its metrics.jsonl")
    plot.add_argument("run_dir")
    return parser


def is_model_dir(path: str) -> bool:
    return (Path(path) / "config.json").is_file() or (Path(path) / "adapter_config.json").is_file()


# training command → (its config class, the module that holds it and the recipe, the recipe function)
STAGES = {
    "pretrain": ("PretrainConfig", "tinylm.train.pretrain", "pretrain"),
    "sft": ("SFTConfig", "tinylm.train.sft", "sft"),
    "dpo": ("DPOConfig", "tinylm.train.dpo", "dpo"),
    "distill": ("DistillConfig", "tinylm.train.distill", "distill"),
}
TRAINING_COMMANDS = ("quickstart", "vlm", *STAGES)  # the ones that take --section.key=value


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
    if args.command == "dpo":
        pairs.update(
            {
                "data.format": args.format,
                "data.template": args.template,
                "data.skip_bad": args.skip_bad or None,
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


def run(args, overrides: list[str]) -> int:
    if overrides and args.command not in TRAINING_COMMANDS:
        raise ValueError(f"unrecognized arguments: {' '.join(overrides)}")
    overrides = [*overrides, *flag_overrides(args)]

    if args.command == "quickstart":
        from tinylm.quickstart import quickstart

        quickstart(args.out, resolve_config_path(args.config), overrides)
    elif args.command == "vlm" and args.vlm_command == "quickstart":
        from tinylm.vlm_quickstart import vlm_quickstart

        vlm_quickstart(args.out, llm=args.llm, device=args.device, overrides=overrides)
    elif args.command == "vlm":
        from tinylm.config import load_config
        from tinylm.train.vlm import VLMStageConfig, train_vlm

        cfg = load_config(VLMStageConfig, resolve_config_path(args.config), overrides)
        _, result = train_vlm(cfg, args.out, args.vlm_command, resume=args.resume)
        if result.interrupted:
            return 130
    elif args.command == "tokenizer" and args.tokenizer_command in ("encode", "decode"):
        tokenizer_tool(args)
    elif args.command == "configs":
        configs_tool(args)
    elif args.command == "tokenizer":
        from tinylm.data.text import train_tokenizer_from_files
        from tinylm.tokenizer import train_tokenizer

        if args.data:
            tokenizer = train_tokenizer_from_files(
                args.data, args.vocab_size, text_field=args.text_field, txt_split=args.txt_split
            )
        else:
            from tinylm.data import builtin

            tokenizer = train_tokenizer(builtin.pretrain_documents(builtin.World(0)), args.vocab_size)
        tokenizer.save(args.out)
        print(f"saved a {tokenizer.vocab_size}-token tokenizer to {args.out}", file=sys.stderr)
    elif args.command in STAGES:
        from tinylm.config import load_config

        class_name, module, function = STAGES[args.command]
        stage = importlib.import_module(module)  # the stage's module holds its config class and its recipe
        # a distillation student given as a config brings its own data and training settings
        name = args.student if args.command == "distill" and not is_model_dir(args.student) else args.config
        cfg = load_config(getattr(stage, class_name), resolve_config_path(name), overrides)
        _, result = getattr(stage, function)(cfg, args.out, resume=args.resume)
        if result.interrupted:
            return 130
    elif args.command == "generate":
        from tinylm.infer.engine import Engine

        engine = Engine.from_dir(
            args.model_dir, device=args.device, dtype=torch_dtype(args.dtype), compile=args.compile
        )
        for piece in engine.stream(args.prompt, sampling_settings(args, engine), images=args.image):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    elif args.command == "chat":
        from tinylm.infer.chat import answer_prompts, chat_format_for, read_prompts, run_chat
        from tinylm.infer.engine import Engine
        from tinylm.io import atomic_write_text

        engine = Engine.from_dir(
            args.model_dir, device=args.device, dtype=torch_dtype(args.dtype), compile=args.compile
        )
        chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
        if args.prompts:
            records = answer_prompts(
                engine,
                read_prompts(args.prompts),
                args.system,
                sampling_settings(args, engine),
                chat_format,
                images=args.image,
            )
            lines = [json.dumps(r, ensure_ascii=False) for r in records]
            if args.output:
                atomic_write_text(args.output, "".join(line + "\n" for line in lines))
                print(f"wrote {len(lines)} answers to {args.output}", file=sys.stderr)
            else:
                for record in records:
                    print(f"> {record['prompt']}\n{record['answer']}\n")
        else:
            run_chat(
                engine,
                system=args.system,
                settings=sampling_settings(args, engine),
                chat_format=chat_format,
                images=args.image,
            )
    elif args.command == "serve":
        from tinylm.serve.app import build_server, serve

        server = build_server(
            args.model_dir,
            name=args.name,
            device=args.device,
            dtype=torch_dtype(args.dtype),
            compile=args.compile,
            max_batch=args.max_batch,
            max_len=args.max_len,
            max_waiting=args.max_waiting,
            api_key=args.api_key,
            max_body=int(args.max_body_mb * 2**20),
            thread=False,
        )
        serve(server, args.host, args.port, args.log_level)
    elif args.command == "merge":
        from tinylm.modeldir import load_adapter_dir, read_adapter_config, save_model_dir

        config = read_adapter_config(args.adapter_dir)
        model, tokenizer = load_adapter_dir(
            args.adapter_dir, base_dir=args.model_dir
        )  # the adapter's tokenizer and stop tokens win
        save_model_dir(model, args.out_dir, tokenizer=tokenizer)
        print(
            f"merged a rank-{config.r} adapter over {len(config.target_modules)} kinds of layer into {args.out_dir}",
            file=sys.stderr,
        )
    elif args.command == "plot":
        from tinylm.train.metrics import plot_losses

        run_dir = Path(args.run_dir)
        if plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png") is None:
            raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no logged losses to plot")
        print(run_dir / "loss.png")
    return 0


def tokenizer_tool(args) -> None:
    """``tinylm tokenizer encode|decode``: ids and the piece of text each stands for, both ways."""
    from tinylm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer_dir)
    if args.tokenizer_command == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        ids = tokenizer.encode(text)
        if args.ids_only:
            print(" ".join(map(str, ids)))
            return
    else:
        try:
            ids = [int(piece) for piece in re.split(r"[\s,\[\]]+", " ".join(args.ids)) if piece]
        except ValueError:
            raise ValueError(
                f"ids: expected integers separated by spaces or commas, got {' '.join(args.ids)!r}"
            ) from None
        if bad := [i for i in ids if not 0 <= i < tokenizer.vocab_size or tokenizer.id_to_token(i) is None]:
            raise ValueError(f"ids {bad[:5]} are not in the vocabulary (0..{tokenizer.vocab_size - 1})")
        print(tokenizer.decode(ids))
    for index in ids:
        piece = tokenizer.token_bytes(index).decode("utf-8", errors="backslashreplace")
        print(f"{index:>8}  {json.dumps(piece, ensure_ascii=False)}")
    print(f"{len(ids)} tokens", file=sys.stderr)


# a shipped config's name → the config class it fills (the first prefix that matches)
CONFIG_STAGES = (
    ("sft-", "tinylm.train.sft", "SFTConfig"),
    ("dpo-", "tinylm.train.dpo", "DPOConfig"),
    ("vlm-", "tinylm.train.vlm", "VLMStageConfig"),
    ("student-", "tinylm.train.distill", "DistillConfig"),
    ("", "tinylm.train.pretrain", "PretrainConfig"),
)


def configs_tool(args) -> None:
    """``tinylm configs``: list the shipped configs, show one, or copy one to edit."""
    if args.action == "list":
        for name in shipped_configs():
            first = (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
            print(f"{name:<24} {first.lstrip('# ') if first.startswith('#') else ''}")
        return
    if args.name is None:
        raise ValueError(f"configs {args.action}: name a config ({', '.join(shipped_configs())})")
    source = resolve_config_path(args.name)
    if args.action == "show":
        from tinylm.config import load_config, to_yaml

        module, stage = next((m, c) for prefix, m, c in CONFIG_STAGES if source.stem.startswith(prefix))
        text = source.read_text(encoding="utf-8")
        comments = [line for line in text.splitlines() if line.startswith("#")]
        resolved = to_yaml(load_config(getattr(importlib.import_module(module), stage), source))
        sys.stdout.write("\n".join([*comments, f"# every key of {stage}, as {source.name} sets them", resolved]))
        return
    dest = Path(args.dest or f"{source.stem}.yaml")
    if dest.is_dir():
        dest = dest / f"{source.stem}.yaml"
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists; choose another destination")
    shutil.copyfile(source, dest)
    print(f"copied {source.stem} to {dest}: edit it, then --config {dest}", file=sys.stderr)


def out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


OUT_OF_MEMORY = (
    "out of memory: lower train.batch_size (and raise train.grad_accum to keep the same tokens per step), "
    "train.seq_len or the model's size; for inference, lower --max-batch / --max-len or use --dtype bfloat16"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        return run(args, overrides)
    except KeyboardInterrupt:  # outside training (which saves and returns 130 itself)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`tinylm generate ... | head`): not an error
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        if os.environ.get("TINYLM_DEBUG"):
            raise
        if isinstance(e, RuntimeError) and not out_of_memory(e):
            raise  # a bug, not the user's input: the traceback is what helps
        print(f"error: {OUT_OF_MEMORY} ({e})" if out_of_memory(e) else f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
