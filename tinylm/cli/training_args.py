"""The training commands' grammar (pretrain, sft, dpo, rm, grpo, distill, vlm) and the flags that are
config keys, turned into ``--section.key=value`` overrides. Parsing only: nothing here runs a stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tinylm.cli.parsing import add_command, add_quickstart, add_revision_arg, shipped_configs


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--out, --resume and --device: what every training command takes."""
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | mps (default: the config's train.device)")


TEMPLATE_HELP = "chat template: chatml | vicuna | llama-chinese | raw"
# what --data takes besides files, in every command that reads data (tinylm.hub.data)
HUB_DATA = "hf:NAME[:CONFIG][@SPLIT] (a Hugging Face Hub dataset, or a saved one's folder; SPLIT default train)"


def add_fine_tune_args(
    parser: argparse.ArgumentParser,
    config: str,
    what: str,
    formats=(),
    init: str = "the model to fine-tune (tinylm's, or a Llama/Qwen2/Qwen3)",
    data: str | None = None,
) -> None:
    """What every stage that starts from a model takes: its config, the model (--init), the data files
    (--data, and --format where there are several), the chat template and --skip-bad; ``what`` the
    data's records are called."""
    parser.add_argument("--config", default=config, help="config name or YAML path")
    parser.add_argument("--init", required=True, help=f"{init}: a directory or Hugging Face Hub id")
    add_revision_arg(parser, "--init")
    data = data or f".json / .jsonl(.gz) / .parquet {what}, or {HUB_DATA} (default: the built-in ones)"
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


def add_training_commands(commands) -> None:
    """pretrain, sft, dpo, rm, grpo, distill and vlm, in that order."""
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
        help=f".txt / .jsonl / .json / .parquet files, plain or .gz, or {HUB_DATA} (default: the built-in corpus)",
    )
    pre.add_argument(
        "--val-data",
        nargs="+",
        default=None,
        help="validation text, as --data (default: a share of --data's documents)",
    )
    pre.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="train for this long (train.max_minutes): the schedule ends on time, the best evaluation is kept",
    )
    pre.add_argument(
        "--tokenizer", default=None, help="a tokenizer or model directory, or a Hub id (default: train one on the data)"
    )
    add_run_args(pre)
    pre.add_argument(
        "--init", default=None, help="continue pretraining this model, a directory or Hub id (its tokenizer too)"
    )
    add_revision_arg(pre, "--init")
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
        data=".json / .jsonl(.gz) / .parquet prompts with answers, GSM8K's layout too, or "
        f"{HUB_DATA} (default: the built-in prompts)",
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
    dis.add_argument("--teacher", required=True, help="the teacher model: a directory or Hugging Face Hub id")
    add_revision_arg(dis, "--teacher")
    dis.add_argument(
        "--student",
        required=True,
        help="the student: a model directory or Hub id, or a config (name or YAML) whose model section shapes a "
        "new one",
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
        help=f"text files or {HUB_DATA} (default: the built-in corpus); with --chat, conversations",
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
        help="the language model to start from, a directory or Hub id (default: pretrain a small one on the "
        "built-in corpus)",
    )
    add_revision_arg(vlm_quick, "--llm")
    for stage, about in (
        (
            "pretrain",
            "stage 1: image-caption pairs train the projector (and --train-vision the encoder); the language model is "
            "frozen",
        ),
        ("sft", "stage 2: image conversations train the projector and the language model (or a LoRA adapter)"),
    ):
        sub = add_command(vlm_commands, stage, about, overrides=True)
        init = "the language model" if stage == "pretrain" else "stage 1's model (its final/)"
        data = f"LLaVA / MiniMind-V / LLaMA-Factory / XTuner .json(l) / .parquet, or {HUB_DATA}"
        data += " (default: the built-in pictures)"
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


def is_model(name: str) -> bool:
    """Whether distill's --student names a model rather than a config: a local model directory, or an
    ``org/name`` Hub id (a YAML file or a shipped config's name is a config; so is a mistyped one)."""
    if (Path(name) / "config.json").is_file() or (Path(name) / "adapter_config.json").is_file():
        return True
    if Path(name).suffix in (".yaml", ".yml") or Path(name).is_file() or name in shipped_configs():
        return False
    from tinylm.hub.models import hub_reference

    reference = hub_reference(name)
    return reference is not None and "/" in reference[0]


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
                "init_from": json.dumps(args.student) if is_model(args.student) else None,
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
