"""Model cards: the README.md of every model directory tinylm saves, in the Hugging Face format.

A card is YAML metadata between two ``---`` lines (license, language, tags, datasets, base_model: what
the Hub indexes), then markdown for people: what the model is and how it was made, its training run,
its shape, its evaluation when it has one, and how to load it in transformers and in tinylm.

    ---
    license: apache-2.0
    language:
    - en
    - zh
    library_name: transformers
    pipeline_tag: text-generation
    tags:
    - tinylm
    - llama
    - sft
    datasets:
    - tinylm built-in world (seed 0)
    ---

    # sft
    ...

The stage that saves a model knows the facts and hands them over as a ``CardFacts``; the model
directory writer adds what the directory itself says (its kind, config.json, parameter count) as a
``SavedModel``. Nothing here needs more than those plain values, and the base model's own card and
config.json, read for the license to inherit and a Hub id to name.

``base_model`` goes into the metadata only as a Hub id (``Qwen/Qwen2.5-0.5B-Instruct``: given as one,
or named by the base directory's config.json), because the Hub refuses metadata whose base_model is not
a model it knows; a local base directory is named in the text instead.

The card is not in the SHA256SUMS manifest (``tinylm.io.MODEL_CARD``): it is documentation, which
people edit and ``add_evaluation`` updates after the model is saved.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from tinylm.hub.models import hub_reference, resolved_snapshot
from tinylm.io import MODEL_CARD, DataError, atomic_write_text, read_json

DEFAULT_LICENSE = "apache-2.0"  # tinylm's own license, for models that inherit none
BUILTIN_LANGUAGES = ["en", "zh"]  # the built-in world is written in English and Chinese
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name", as the Hub spells model ids
RELATIONS = ("adapter", "merge", "quantized", "finetune")  # the Hub's base_model_relation values


def builtin_dataset(seed: int) -> str:
    """How a card names the built-in data of one seed."""
    return f"tinylm built-in world (seed {seed})"


@dataclass
class CardFacts:
    """What the stage that made a model knows about it; every field may stay empty."""

    stage: str = ""  # how it was made, in words: "supervised fine-tuning (SFT)"
    tags: list[str] = field(default_factory=list)  # e.g. ["sft"]; "tinylm" and the model type are added
    base_model: str | None = None  # the model directory (or Hub id) it started from
    relation: str | None = None  # to its base: adapter | merge | quantized | finetune
    datasets: list[str] = field(default_factory=list)  # builtin_dataset(seed), or the data files' names
    language: list[str] = field(default_factory=list)  # empty: the base model's, if its card says
    license: str | None = None  # None: the base model's card's, else DEFAULT_LICENSE
    training: dict = field(default_factory=dict)  # steps, tokens, seconds, train_loss, val_loss, best_val_loss
    settings: dict[str, str] = field(default_factory=dict)  # the run's key settings, as shown: {"learning rate": ...}
    evaluation: dict[str, dict] = field(default_factory=dict)  # task → {metric: value, "items": n}
    evaluation_source: str = ""  # where the evaluation comes from, in words
    notes: list[str] = field(default_factory=list)  # further lines for the text ("teacher: runs/big/final")

    def __post_init__(self):
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r}: expected one of {', '.join(RELATIONS)}")


@dataclass
class SavedModel:
    """What the model directory writer knows of the directory it writes."""

    path: Path  # where the directory will be (the usage snippets load it from there)
    kind: str  # "model", "adapter", "llava" or "reward"
    config: dict  # its config.json (for an adapter: its base model's)
    parameters: int  # every weight, a quantized one counted as one (an adapter: its base model's)
    chat: bool = False  # its tokenizer has a chat template
    adapter: dict | None = None  # an adapter's adapter_config.json
    adapter_parameters: int = 0

    @property
    def rewards(self) -> bool:
        """A reward model, or a reward model's adapter (PEFT's task_type SEQ_CLS): it scores text."""
        return self.kind == "reward" or (self.adapter or {}).get("task_type") == "SEQ_CLS"


# -- the whole card -------------------------------------------------------------------------------


def render_card(facts: CardFacts, saved: SavedModel) -> str:
    """The card's text: the YAML header, then the sections."""
    facts = inherit_from_base(facts)
    sections = [
        introduction(facts, saved),
        training_section(facts),
        model_section(saved),
        evaluation_section(evaluation_rows(facts.evaluation, facts.evaluation_source)),
        usage_section(saved),
    ]
    header = yaml.safe_dump(metadata(facts, saved), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n".join(section for section in sections if section)


def write_card(directory: str | Path, facts: CardFacts | None, saved: SavedModel) -> None:
    """Write ``directory``/README.md (a model directory being saved: ``saved.path`` is where it will be)."""
    atomic_write_text(Path(directory) / MODEL_CARD, render_card(facts or CardFacts(), saved))


def metadata(facts: CardFacts, saved: SavedModel) -> dict:
    """The YAML header: the fields the Hub reads, in the order its own cards use."""
    meta = {"license": facts.license or DEFAULT_LICENSE}
    if facts.language:
        meta["language"] = list(facts.language)
    meta["library_name"] = "peft" if saved.kind == "adapter" else "transformers"
    meta["pipeline_tag"] = (
        "image-text-to-text" if saved.kind == "llava" else "text-classification" if saved.rewards else "text-generation"
    )
    tags = ["tinylm", *model_types(saved.config), *(["reward-model"] if saved.rewards else []), *facts.tags]
    if saved.chat and not saved.rewards:
        tags.append("chat")
    meta["tags"] = list(dict.fromkeys(tags))
    if facts.datasets:
        meta["datasets"] = list(facts.datasets)
    hub_id = base_model_id(facts.base_model)
    if hub_id:
        meta["base_model"] = hub_id
        if facts.relation:
            meta["base_model_relation"] = facts.relation
    return meta


def model_types(config: dict) -> list[str]:
    """["llama"], or for a LLaVA model ["llava", its language model's type]."""
    types = [config.get("model_type") or "llama"]
    if types[0] == "llava":
        types.append(config.get("text_config", {}).get("model_type") or "llama")
    return types


# -- the base model: its Hub id, and what a fine-tune inherits from its card ----------------------


def base_model_id(base: str | None) -> str | None:
    """The Hub id of the base model: ``base`` itself when it is one (and no local directory; its
    @revision dropped), else the one the base directory's config.json names (``_name_or_path``), else None."""
    if not base:
        return None
    reference = hub_reference(base)
    if reference is not None:
        return reference[0] if HUB_ID.match(reference[0]) else None
    directory = Path(base)
    if not directory.exists():
        return None
    try:
        named = read_json(directory / "config.json", default={}).get("_name_or_path")
    except DataError:
        return None
    if isinstance(named, str) and HUB_ID.match(named) and not Path(named).exists():
        return named
    return None


def read_card_metadata(directory: str | Path) -> dict:
    """The YAML header of ``directory``/README.md; {} without a card or a readable header."""
    path = Path(directory) / MODEL_CARD
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if not match:
        return {}
    try:
        found = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def inherit_from_base(facts: CardFacts) -> CardFacts:
    """The license (and, when the data does not say, the languages) of the base model's card: a
    fine-tune keeps its base's license."""
    directory = base_directory(facts.base_model)
    if directory is None or (facts.license and facts.language):
        return facts
    base = read_card_metadata(directory)
    return replace(
        facts,
        license=facts.license or (strings(base.get("license")) or [None])[0],
        language=facts.language or strings(base.get("language")),
    )


def base_directory(base: str | None) -> Path | None:
    """The base model's files: its local directory, or the snapshot its Hub id was loaded from in this
    process (a card reads what is there; it never downloads)."""
    if not base:
        return None
    return Path(base) if Path(base).is_dir() else resolved_snapshot(base)


def derived_card(
    source: str | Path, base_model: str, stage: str, relation: str, tags: list[str], notes: Sequence[str] = ()
) -> CardFacts:
    """The facts of a model that a tool made from another (an adapter merged into its base, weights
    quantized): the data, languages and license of ``source``'s card, with ``base_model`` as its base."""
    meta = read_card_metadata(source)
    return CardFacts(
        stage=stage,
        tags=list(tags),
        base_model=base_model,
        relation=relation,
        datasets=strings(meta.get("datasets")),
        language=strings(meta.get("language")),
        license=(strings(meta.get("license")) or [None])[0],
        notes=list(notes),
    )


def strings(value) -> list[str]:
    """A YAML field that holds a string or a list of them, as a list (anything else: empty)."""
    value = [value] if isinstance(value, str) else value
    return [x for x in value if isinstance(x, str)] if isinstance(value, list) else []


# -- the sections ---------------------------------------------------------------------------------


def card_title(path: Path) -> str:
    """The run's name: ``runs/chat`` for ``runs/chat/final``, the directory's own name otherwise."""
    path = Path(path)
    return path.parent.name if path.name == "final" and path.parent.name else path.name or str(path)


def introduction(facts: CardFacts, saved: SavedModel) -> str:
    """The title and a paragraph: what the model is, how it was made, from what."""
    size = f"{short_count(saved.parameters)}-parameter " if saved.parameters else ""
    kind = family(config_of_text(saved.config))
    adapter = f"A LoRA adapter (PEFT's layout) for a {size}{kind} model"
    what = {
        "adapter": adapter + (" that makes it a reward model (its score head kept whole)" if saved.rewards else ""),
        "llava": f"A {size}vision-language model (LLaVA layout) with a {kind} language model",
        "reward": f"A {size}{kind} reward model: it gives the last answer of a conversation a score, higher "
        "for a better answer",
    }.get(saved.kind, f"A {size}{kind} {'chat ' if saved.chat else ''}model")
    lines = [
        f"# {card_title(saved.path)}",
        "",
        f"{what}, made with tinylm" + (f" by {facts.stage}." if facts.stage else "."),
    ]
    if facts.base_model:
        lines.append(f"It started from `{facts.base_model}`.")
    if facts.datasets:
        lines.append(f"Data: {', '.join(facts.datasets)}.")
    lines += facts.notes
    return "\n".join(lines) + "\n"


def short_count(n: int) -> str:
    """``955k``, ``25.6M``, ``1.5B``."""
    for unit, size in (("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def family(config: dict) -> str:
    names = {"llama": "Llama-style", "qwen2": "Qwen2-style", "qwen3": "Qwen3-style"}
    return names.get(config.get("model_type"), str(config.get("model_type", "")))


def config_of_text(config: dict) -> dict:
    """The language model's config: config.json itself, or a LLaVA model's text_config."""
    return config.get("text_config", config) if config.get("model_type") == "llava" else config


TRAINING_ROWS = (  # (key in CardFacts.training, label, how the value is shown)
    ("steps", "optimizer steps", "{:,}"),
    ("tokens", "tokens seen", "{:,}"),
    ("seconds", "training time", None),
    ("tokens_per_s", "throughput", "{:,.0f} tokens/s"),
    ("train_loss", "final training loss", "{:.4f}"),
    ("val_loss", "final validation loss", "{:.4f}"),
    ("best_val_loss", "best validation loss (the weights saved)", "{:.4f}"),
)


def training_section(facts: CardFacts) -> str:
    rows = [("stage", facts.stage)] if facts.stage else []
    for key, label, shown in TRAINING_ROWS:
        value = facts.training.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        rows.append((label, duration(value) if shown is None else shown.format(value)))
    rows += list(facts.settings.items())
    if not rows:
        return ""
    note = "\nThe run's whole config is its config.yaml, beside this directory in the run directory.\n"
    return "## Training\n\n" + two_columns(rows) + (note if facts.training else "")


def duration(seconds: float) -> str:
    """``95 s``, ``12.5 min`` or ``3.2 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def model_section(saved: SavedModel) -> str:
    text = config_of_text(saved.config)
    heads = text.get("num_attention_heads")
    kv = text.get("num_key_value_heads") or heads
    rows = [
        ("architecture", ", ".join(saved.config.get("architectures") or [saved.config.get("model_type", "")])),
        ("parameters", f"{saved.parameters:,}" if saved.parameters else None),
        ("layers", text.get("num_hidden_layers")),
        ("hidden size", text.get("hidden_size")),
        ("MLP size", text.get("intermediate_size")),
        ("attention heads", f"{heads} ({kv} key/value)" if heads and kv != heads else heads),
        ("vocabulary", f"{text['vocab_size']:,} tokens" if text.get("vocab_size") else None),
        ("context", f"{text['max_position_embeddings']:,} tokens" if text.get("max_position_embeddings") else None),
        ("weights", saved.config.get("dtype") or saved.config.get("torch_dtype")),
        ("quantization", quantization(saved.config.get("quantization_config"))),
    ]
    if saved.kind == "llava":
        vision = saved.config.get("vision_config", {})
        rows.append(
            (
                "vision tower",
                f"{vision.get('model_type', '')}, {vision.get('num_hidden_layers')} layers of "
                f"{vision.get('hidden_size')}, {vision.get('image_size')} px pictures in "
                f"{vision.get('patch_size')} px patches",
            )
        )
    if saved.adapter:
        rows += [
            ("LoRA rank / alpha", f"{saved.adapter.get('r')} / {saved.adapter.get('lora_alpha')}"),
            ("LoRA layers", ", ".join(saved.adapter.get("target_modules") or [])),
            ("adapter parameters", f"{saved.adapter_parameters:,}"),
        ]
    shown = [(label, value) for label, value in rows if value not in (None, "")]
    title = "## Model" + (" (the adapter's base)" if saved.kind == "adapter" else "")
    return f"{title}\n\n" + two_columns(shown)


def quantization(config: dict | None) -> str | None:
    """``int4 weights, groups of 32 (compressed-tensors)`` for a quantized model's config block."""
    if not config:
        return None
    groups = config.get("config_groups") or {}
    weights = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
    size = weights.get("group_size")
    return (
        f"int{weights.get('num_bits')} weights, "
        + (f"groups of {size}" if size else "one scale per channel")
        + f" ({config.get('quant_method')}, {config.get('format')})"
    )


def two_columns(rows) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {label} | {cell(value)} |" for label, value in rows]
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    """A value as one markdown table cell: no line breaks, ``|`` escaped."""
    return str(value).replace("\n", " ").replace("|", "\\|")


# -- evaluation -----------------------------------------------------------------------------------

EVALUATION = "## Evaluation"
EVALUATION_HEADER = ["task", "metric", "value", "items", "source"]
NOT_METRICS = {"items", "seconds", "shots", "chance"}  # fields of a task's entry shown elsewhere, or not at all


def evaluation_rows(tasks: dict[str, dict], source: str = "") -> list[list[str]]:
    """Rows (task, metric, value, items, source) of ``tasks`` in ``tinylm eval``'s results.json shape
    (task → {metric: value, "items": n, ...}); fields that are not numbers (per-subject tables) are
    left out. Accuracies show as percentages, other metrics with four significant digits."""
    rows = []
    for task, entry in tasks.items():
        if not isinstance(entry, dict):
            continue
        items = entry.get("items")
        for metric, value in entry.items():
            shown_elsewhere = metric in NOT_METRICS or metric.endswith("_stderr")
            if shown_elsewhere or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            rows.append([task, metric, metric_value(metric, value), f"{items:,}" if items else "", source])
    return rows


SHARES = re.compile(r"(^|[\W_])(acc|exact_match|hit@|prefers|right|share)")  # metrics that are a share of items


def metric_value(metric: str, value: float) -> str:
    """A metric's value as shown: a share of items (accuracy, exact match...) as a percentage, anything
    else with four significant digits."""
    if not math.isfinite(value):
        return str(value)
    if SHARES.search(metric.split("/")[-1]) and 0 <= value <= 1:
        return f"{value:.1%}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def evaluation_section(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    table = [f"| {' | '.join(EVALUATION_HEADER)} |", "|" + "---|" * len(EVALUATION_HEADER)]
    table += [f"| {' | '.join(cell(value) for value in row)} |" for row in rows]
    return f"{EVALUATION}\n\n" + "\n".join(table) + "\n"


def add_evaluation(directory: str | Path, tasks: dict[str, dict], source: str) -> bool:
    """Put ``tasks`` (task → {metric: value, "items": n}, as in tinylm eval's results.json) into the
    Evaluation table of ``directory``'s card, replacing the rows of the same tasks and keeping the
    others. False (and nothing written) when the directory has no card."""
    path = Path(directory) / MODEL_CARD
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    start = text.find(f"\n{EVALUATION}\n")
    kept: list[list[str]] = []
    if start >= 0:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end
        kept = [row for row in table_rows(text[start:end]) if row[0] not in tasks]
        before, after = text[: start + 1], text[end + 1 :]
    else:
        usage = text.find("\n## How to use")
        cut = len(text) if usage < 0 else usage + 1
        before, after = text[:cut], text[cut:]
    section = evaluation_section(kept + evaluation_rows(tasks, source))
    atomic_write_text(path, before + section + ("\n" if after else "") + after)
    return True


def table_rows(section: str) -> list[list[str]]:
    """The body rows of the evaluation table in ``section`` (as evaluation_section wrote it)."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = []
    for line in lines[2:]:  # past the header and its |---| line
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == len(EVALUATION_HEADER):
            rows.append(cells)
    return rows


# -- how to use -----------------------------------------------------------------------------------


def usage_section(saved: SavedModel) -> str:
    path = saved.path.as_posix()
    snippet = reward_snippet if saved.rewards else transformers_snippet
    parts = ["## How to use", "", "With transformers:", "", "```python", *snippet(saved, path), "```"]
    if saved.rewards:  # no command runs a reward model: it is read from Python (and by later RL stages)
        parts += ["", "With tinylm:", "", "```python", *tinylm_reward_snippet(path), "```", ""]
    else:
        parts += ["", "With tinylm:", "", "```bash", *tinylm_snippet(saved, path), "```", ""]
    return "\n".join(parts)


SCORED = [  # the conversation the reward snippets score
    "messages = [",
    '    {"role": "user", "content": "Who are you?"},',
    '    {"role": "assistant", "content": "I am an assistant. How can I help?"},',
    "]",
]


def reward_snippet(saved: SavedModel, path: str) -> list[str]:
    """Score a conversation with transformers: the reward model as a one-label sequence classifier (an
    adapter: its base loaded as one, with the pad id training used, then the adapter)."""
    if saved.kind == "adapter":
        pad = saved.config.get("pad_token_id")
        load = [
            "import torch",
            "from peft import AutoPeftModelForSequenceClassification",
            "from transformers import AutoTokenizer",
            "",
            "# its base model as a one-score classifier, then the adapter and the score head",
            "model = AutoPeftModelForSequenceClassification.from_pretrained(",
            f'    "{path}", num_labels=1, pad_token_id={pad}',
            ")",
        ]
    else:
        load = [
            "import torch",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'model = AutoModelForSequenceClassification.from_pretrained("{path}")',
        ]
    return [
        *load,
        f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        *SCORED,
        'inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)',
        "with torch.no_grad():",
        "    print(model(**inputs).logits[0, 0].item())  # the reward: higher for a better answer",
    ]


def tinylm_reward_snippet(path: str) -> list[str]:
    return [
        "from tinylm.modeldir import load",
        "from tinylm.train.rm import score_conversations",
        "",
        f'loaded = load("{path}")  # the RewardModel and its tokenizer',
        *SCORED,
        "print(score_conversations(loaded.model, loaded.tokenizer, [messages]))",
    ]


def transformers_snippet(saved: SavedModel, path: str) -> list[str]:
    if saved.kind == "llava":
        return [
            "from PIL import Image",
            "from transformers import AutoProcessor, LlavaForConditionalGeneration",
            "",
            f'model = LlavaForConditionalGeneration.from_pretrained("{path}")',
            f'processor = AutoProcessor.from_pretrained("{path}")',
            'messages = [{"role": "user", "content": "<image>\\nWhat is in the picture?"}]',
            "prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            'inputs = processor(images=Image.open("picture.png"), text=prompt, return_tensors="pt")',
            "out = model.generate(**inputs, max_new_tokens=64)",
            'print(processor.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        ]
    if saved.kind == "adapter":
        load = [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{path}")  # its base model, then the adapter',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        ]
    else:
        load = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
        ]
        if saved.config.get("quantization_config"):
            load.insert(0, "# pip install compressed-tensors: transformers' loader of these integer weights")
    if saved.chat:
        prompt = [
            'messages = [{"role": "user", "content": "Who are you?"}]',
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ")",
        ]
    else:
        prompt = ['inputs = tokenizer("Once upon a time", return_tensors="pt")']
    return [
        *load,
        *prompt,
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]


def tinylm_snippet(saved: SavedModel, path: str) -> list[str]:
    if saved.kind == "llava":
        return [f"tinylm chat {path} --image picture.png", f"tinylm serve {path}"]
    lines = [f"tinylm chat {path}"] if saved.chat else []
    lines.append(f'tinylm generate {path} --prompt "Once upon a time"')
    lines.append(f"tinylm serve {path}")
    if saved.kind == "adapter":
        lines.append(f"tinylm merge BASE_DIR {path} merged  # fold the adapter into its base model")
    return lines
