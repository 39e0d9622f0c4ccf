"""The small commands that only read: ``tinylm tokenizer encode|decode`` and ``tinylm configs``."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

from tinylm.cli.parsing import CONFIG_DIR, resolve_config_path, shipped_configs


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
    ("rm-", "tinylm.train.rm", "RMConfig"),
    ("grpo-", "tinylm.train.grpo", "GRPOConfig"),
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
