"""What every part of the command line's grammar shares: the shipped configs, the help layout, a
command with its config overrides, the sampling and model-loading flags, a quickstart's arguments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def add_sampling_args(parser: argparse.ArgumentParser, model: str = "MODEL_DIR") -> None:
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
    add_model_args(parser, model)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step: slow first reply, faster after"
    )


DTYPES = ["float32", "bfloat16", "float16"]
MODEL_HELP = "a model directory, or a Hugging Face Hub id (org/name, org/name@revision)"
# the arguments that name a command's model, the one --revision pins (the first one given)
MODEL_ARGUMENTS = ("model_dir", "init", "model", "teacher", "llm", "tokenizer_dir")


def add_revision_arg(parser: argparse.ArgumentParser, model: str = "MODEL_DIR") -> None:
    """--revision: which commit of a Hub model the command's model (``model``, its argument) is."""
    parser.add_argument(
        "--revision",
        metavar="REV",
        default=None,
        help=f"a branch, tag or commit hash of the Hub model {model} (default: its main branch); "
        "other Hub ids take one as ID@REV",
    )


def pin_revision(args) -> None:
    """--revision REV: the command's model (the first of MODEL_ARGUMENTS it was given) becomes ID@REV, the
    form every loader and config takes, so it reaches a training stage's init_from unchanged."""
    if not getattr(args, "revision", None):
        return
    from tinylm.hub.models import with_revision

    name = next((name for name in MODEL_ARGUMENTS if getattr(args, name, None)), None)
    if name is None:
        raise ValueError(f"--revision {args.revision}: no model to take it (give --init)")
    setattr(args, name, with_revision(getattr(args, name), args.revision))


def add_model_args(parser: argparse.ArgumentParser, model: str = "MODEL_DIR") -> None:
    """--device, --dtype, --kv-cache and --revision: where, in what precision and which commit of a
    Hub model an inference command runs (``model``: its argument)."""
    add_revision_arg(parser, model)
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


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def sampling_settings(args, engine):
    """The model's sampling defaults, with what the command line sets on top."""
    return engine.defaults.updated(**{name: getattr(args, name) for name in SAMPLING_FLAGS})
