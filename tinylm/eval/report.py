"""``tinylm report RUN_DIR``: one page about a training run and every stage of it.

    write_report("runs/quickstart")  →  runs/quickstart/report/report.html and report/report.md

A run directory holds one or more stage runs, each a folder with config.yaml and metrics.jsonl: the
run itself, and under it, for a quickstart, sft/ (the vision-language quickstart: llm/, pretrain/, sft/;
the RAG quickstart: quickstart/, quickstart/sft/, sft/). Each stage gets a summary (its kind, where it
started from, its data and model, steps, tokens, training time, tokens/s, final losses), its key
settings and whole config, its loss curves (training and validation) and the measurements found in its
folder: ``tinylm eval``'s results.json, a vision-language stage's heldout.json, DPO's dpo.json, the
identity recipe's identity.json. A quickstart's report.json adds its tables and sample generations.

This module gathers all of that into plain tables (``Report``); ``report_page`` draws the page. The
report goes into its own folder so that it never collides with a quickstart's report.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.config import load_yaml
from tinylm.eval.report_page import render_html, render_markdown
from tinylm.io import DataError, atomic_write_text, missing_directory, read_json, read_json_lines
from tinylm.model.llama import ModelConfig
from tinylm.modelcard import builtin_dataset, evaluation_rows, metric_value

REPORT_DIR = "report"  # RUN_DIR/report/: report.html and report.md
SKIPPED = {"checkpoints", "data", "tokenizer", REPORT_DIR}  # folders that hold no run and no measurements


class ReportError(DataError):
    """The run directory is missing or holds no training run; the message names it."""


@dataclass
class Table:
    """A titled table of text cells; ``wide`` cells (generated text) wrap instead of widening the page."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    wide: bool = False


@dataclass
class Stage:
    """One training run inside the run directory."""

    name: str  # its folder, relative to the run directory (the run itself: the run directory's name)
    path: Path
    kind: str
    config_text: str  # config.yaml as written
    records: list[dict]  # metrics.jsonl
    tables: list[Table] = field(default_factory=list)

    def curve(self, key: str) -> list[tuple[float, float]]:
        """(step, value) of every logged record with a finite ``key``."""
        return [
            (r["step"], r[key])
            for r in self.records
            if isinstance(r.get(key), (int, float)) and r[key] == r[key] and abs(r[key]) != float("inf")
        ]


@dataclass
class Report:
    title: str
    run_dir: Path
    stages: list[Stage]
    tables: list[Table]  # the run's own: the overview, then any quickstart report


# -- writing it -----------------------------------------------------------------------------------


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Gather the run in ``run_dir`` and write report.html and report.md into ``out_dir`` (default
    ``run_dir``/report); returns their paths."""
    report = gather(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / REPORT_DIR
    html, markdown = out / "report.html", out / "report.md"
    atomic_write_text(html, render_html(report))
    atomic_write_text(markdown, render_markdown(report, out))
    return html, markdown


def gather(run_dir: str | Path) -> Report:
    """Every stage of the run and every measurement found in it, as tables."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(missing_directory(run_dir, "run directory"))
    folders = list(walk(run_dir))
    stages = [read_stage(run_dir, path) for path, files in folders if {"config.yaml", "metrics.jsonl"} <= files]
    if not stages:
        raise ReportError(
            f"{run_dir}: no training run in it (a run directory holds config.yaml and metrics.jsonl, "
            "as tinylm pretrain, sft, dpo, distill and vlm write them)"
        )
    stages.sort(key=lambda s: ((s.path / "metrics.jsonl").stat().st_mtime, s.name))  # in the order they ran
    tables = [overview(stages)]
    for path, files in folders:
        owner = owning_stage(stages, path)
        for name in sorted(files & set(MEASUREMENTS)):
            found = measurements(path / name, where(run_dir, path / name))
            if name == "report.json" or owner is None:
                tables += found
            else:
                owner.tables += found
    return Report(f"tinylm report: {run_dir.resolve().name}", run_dir, stages, tables)


def measurements(path: Path, name: str) -> list[Table]:
    """The tables of one measurements file; a file in another layout than tinylm's is left out, saying so."""
    try:
        return MEASUREMENTS[path.name](read_json(path), name)
    except (DataError, KeyError, TypeError, AttributeError) as e:
        why = str(e) if isinstance(e, DataError) else f"not in the layout tinylm writes ({type(e).__name__}: {e})"
        return [Table(f"{name}: left out", ["why"], [[why]])]


def walk(run_dir: Path):
    """(folder, names of its files) under ``run_dir``, itself first, skipping what holds no run."""
    for root, folders, files in os.walk(run_dir):
        folders[:] = sorted(f for f in folders if f not in SKIPPED and not f.startswith("."))
        yield Path(root), set(files)


def owning_stage(stages: list[Stage], path: Path) -> Stage | None:
    """The innermost stage whose folder holds ``path``."""
    holders = [s for s in stages if path == s.path or s.path in path.parents]
    return max(holders, key=lambda s: len(s.path.parts), default=None)


def where(run_dir: Path, path: Path) -> str:
    return path.relative_to(run_dir).as_posix()


# -- a stage --------------------------------------------------------------------------------------


def read_stage(run_dir: Path, path: Path) -> Stage:
    config = load_yaml(path / "config.yaml")
    if not isinstance(config, dict):
        raise ReportError(f"{path / 'config.yaml'}: expected a mapping of config sections, got {type(config).__name__}")
    if (path / "distill.yaml").is_file():  # a distillation run: its teacher and settings are there
        config = {**config, "distill": load_yaml(path / "distill.yaml").get("distill", {})}
    name = where(run_dir, path) if path != run_dir else run_dir.resolve().name
    stage = Stage(
        name=name,
        path=path,
        kind=stage_kind(config, path),
        config_text=(path / "config.yaml").read_text(encoding="utf-8"),
        records=read_json_lines(path / "metrics.jsonl"),
    )
    stage.tables = [summary(stage, config, path / "final"), settings(config)]
    return stage


def stage_kind(config: dict, path: Path | None = None) -> str:
    """What a stage did, told from the sections of its config (and a reward model by its rm.json)."""
    if "grpo" in config:
        return f"reinforcement learning (GRPO, reward {config['grpo'].get('reward', 'arithmetic')})"
    if path is not None and (path / "rm.json").is_file():
        return "reward model"
    if "distill" in config:
        return "distillation"
    if "dpo" in config:
        return f"preference optimisation ({config['dpo'].get('loss', 'sigmoid')})"
    if "vision" in config:
        return "vision-language training"
    if "model" in config:
        return "continued pretraining" if config.get("init_from") else "pretraining"
    return "supervised fine-tuning"


def summary(stage: Stage, config: dict, final: Path) -> Table:
    """Kind, start, data, model; steps, tokens, time, throughput; the final losses."""
    records = stage.records
    last = {key: value for record in records for key, value in record.items()}  # the latest value of each key
    tokens, seconds = last.get("tokens"), last.get("elapsed_s")
    rows = [
        ["kind", stage.kind],
        ["started from", config.get("init_from") or ("a new model" if "model" in config else "")],
        ["data", data_of(config.get("data") or {})],
        ["model", model_of(final)],
        ["optimizer steps", f"{last['step']:,}" if "step" in last else ""],
        ["tokens seen", f"{tokens:,}" if tokens else ""],
        ["training time", f"{seconds:,.0f} s" if seconds else ""],
        ["throughput", f"{tokens / seconds:,.0f} tokens/s" if tokens and seconds else ""],
        ["final training loss", number(last.get("loss"))],
    ]
    evaluations = [r for r in records if any(k.startswith("val_") for k in r)]
    if evaluations:
        rows += [[f"final validation {k.removeprefix('val_')}", number(v)] for k, v in val_metrics(evaluations[-1])]
        benchmarks = [(k, v) for k, v in evaluations[-1].items() if "/" in k and isinstance(v, (int, float))]
        rows += [
            [f"final {k.removeprefix('heldout/')} (held-out questions)", metric_value(k, v)]
            if k.startswith("heldout/")
            else [f"final {k} (eval.tasks)", metric_value(k, v)]
            for k, v in benchmarks
        ]
        best = min(stage.curve("val_loss"), key=lambda point: point[1], default=None)
        if best is not None and len(evaluations) > 1:
            rows.append(["best validation loss", f"{best[1]:.4f} at step {best[0]:,}"])
    if any(r.get("stopped_early") for r in records):
        rows.append(["stopped early", "validation loss stopped improving (train.patience)"])
    return Table("Summary", ["", ""], [row for row in rows if row[1]])


def val_metrics(record: dict) -> list[tuple[str, float]]:
    return [(k, v) for k, v in record.items() if k.startswith("val_") and isinstance(v, (int, float))]


def number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def data_of(section: dict) -> str:
    if section.get("source") == "builtin":
        return builtin_dataset(section.get("builtin_seed", 0))
    return ", ".join(Path(f).name for f in section.get("files") or [])


def model_of(final: Path) -> str:
    """The saved model's shape in a line, from final/config.json (or adapter_config.json)."""
    if (final / "adapter_config.json").is_file():
        adapter = read_json(final / "adapter_config.json")
        return f"a LoRA adapter of rank {adapter.get('r')} over {adapter.get('base_model_name_or_path')}"
    if not (final / "config.json").is_file():
        return ""
    hf = read_json(final / "config.json")
    text = hf.get("text_config", hf) if hf.get("model_type") == "llava" else hf
    try:
        parameters = f", {ModelConfig.from_hf_dict(text).num_parameters():,} parameters"
    except (KeyError, TypeError, ValueError):
        parameters = ""
    shape = (
        f"{text.get('model_type')}: {text.get('num_hidden_layers')} layers of {text.get('hidden_size')}, "
        f"{text.get('vocab_size'):,} tokens, context {text.get('max_position_embeddings')}{parameters}"
    )
    return f"llava: a vision tower and a projector before {shape}" if text is not hf else shape


KEY_SETTINGS = (  # (section, key) of the config, shown in this order where set
    (None, "init_from"),
    ("train", "max_steps"),
    ("train", "max_minutes"),
    ("train", "batch_size"),
    ("train", "grad_accum"),
    ("train", "seq_len"),
    ("train", "lr"),
    ("train", "min_lr_ratio"),
    ("train", "warmup_steps"),
    ("train", "weight_decay"),
    ("train", "optimizer"),
    ("train", "precision"),
    ("train", "device"),
    ("train", "seed"),
    ("data", "source"),
    ("data", "files"),
    ("data", "template"),
    ("data", "builtin_seed"),
    ("lora", "r"),
    ("lora", "alpha"),
    ("lora", "target_modules"),
    ("lora", "quantize"),
    ("dpo", "loss"),
    ("dpo", "beta"),
    ("dpo", "reference"),
    ("grpo", "reward"),
    ("grpo", "group_size"),
    ("grpo", "beta"),
    ("grpo", "updates"),
    ("data", "kinds"),
    ("distill", "teacher"),
    ("distill", "temperature"),
    ("distill", "kl_weight"),
    ("distill", "corpus"),
    ("vision", "tower"),
    ("vision", "image_size"),
    ("vision", "patch_size"),
    ("vision", "train"),
)


def settings(config: dict) -> Table:
    """The key settings (the whole config.yaml is shown beside them)."""
    rows = []
    for section, key in KEY_SETTINGS:
        values = config if section is None else config.get(section)
        if not isinstance(values, dict) or values.get(key) in (None, "", []):
            continue
        if (section == "lora" and not values.get("enabled")) or (key == "max_minutes" and not values[key]):
            continue
        value = values[key]
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        rows.append([f"{section}.{key}" if section else key, shown])
    return Table("Key settings", ["setting", "value"], rows)


def overview(stages: list[Stage]) -> Table:
    """One line per stage: what it did, how long, how far the losses came."""
    rows = []
    for stage in stages:
        cells = {row[0]: row[1] for row in stage.tables[0].rows}
        rows.append(
            [
                stage.name,
                stage.kind,
                cells.get("optimizer steps", ""),
                cells.get("tokens seen", ""),
                cells.get("training time", ""),
                cells.get("throughput", "").removesuffix(" tokens/s"),
                cells.get("final training loss", ""),
                cells.get("final validation loss", ""),
            ]
        )
    columns = ["stage", "kind", "steps", "tokens", "training time", "tokens/s", "train loss", "validation loss"]
    return Table("Stages", columns, rows)


# -- measurements found in the run ----------------------------------------------------------------


def percent(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else ""


def eval_results(results: dict, name: str) -> list[Table]:
    """``tinylm eval``'s results.json: one row per task and metric, chance beside accuracy."""
    rows = []
    for task, entry in (results.get("tasks") or {}).items():
        for row in evaluation_rows({task: entry}):
            rows.append([*row[:4], percent(entry.get("chance")) if row[1].startswith("acc") else ""])
    model = results.get("model") or "the model"
    return [Table(f"tinylm eval of {model} ({name})", ["task", "metric", "value", "items", "chance"], rows)]


def heldout_pictures(heldout: dict, name: str) -> list[Table]:
    """A vision-language model's held-out pictures (heldout.json): per kind against chance and a blank picture."""
    blank = heldout["blank_picture"]
    rows = [
        [
            kind,
            percent(row["accuracy"]),
            percent(row["chance"]),
            percent(blank["by_kind"][kind]["accuracy"]),
            str(row["questions"]),
        ]
        for kind, row in heldout["by_kind"].items()
    ]
    rows.append(["all", percent(heldout["accuracy"]), "", percent(blank["accuracy"]), str(heldout["questions"])])
    examples = [
        [e["image"], e["question"], e["reply"], e["answer"], "✓" if e["right"] else "✗"]
        for e in heldout.get("examples", [])
    ]
    return [
        Table(
            f"Held-out pictures, greedy answers ({name})",
            ["question", "right", "chance", "blank picture", "questions"],
            rows,
        ),
        Table(
            f"Held-out pictures: examples ({name})", ["picture", "question", "reply", "answer", ""], examples, wide=True
        ),
    ]


def dpo_report(report: dict, name: str) -> list[Table]:
    """DPO's dpo.json: the held-out pairs' measures before and after, and the held-out questions."""
    before, after = report.get("before") or {}, report.get("after") or {}
    rows = [
        [key.removeprefix("val_"), metric_value(key, before.get(key, float("nan"))), metric_value(key, value)]
        for key, value in val_metrics(after)
    ]
    rows += [
        [f"prefers chosen: {group} ({row['pairs']})", percent(row["before"]), percent(row["after"])]
        for group, row in report.get("pairs", {}).items()
        if group != "all"
    ]
    qa = report.get("heldout_qa")
    if qa:
        rows.append(
            ["held-out questions answered", percent(qa["before"]["accuracy"]), percent(qa["after"]["accuracy"])]
        )
        rows += [
            [f"held-out questions: {kind}", percent(qa["before"]["by_kind"][kind]), percent(share)]
            for kind, share in qa["after"]["by_kind"].items()
        ]
    return [Table(f"Preference optimisation, held-out pairs ({name})", ["measure", "before", "after"], rows)]


def grpo_report(report: dict, name: str) -> list[Table]:
    """GRPO's grpo.json: the held-out results before and after, and at each evaluation."""
    before, after = report.get("before") or {}, report.get("after") or {}
    keys = [k for k in after if k.startswith("heldout/") or k in ("val_reward", "val_length")]

    def shown(key, value):
        return percent(value) if key.startswith("heldout/") else metric_value(key, value)

    rows = [[k.removeprefix("heldout/"), shown(k, before.get(k, float("nan"))), shown(k, after[k])] for k in keys]
    columns = [k for k in keys if k in ("heldout/accuracy", "val_reward") or "arithmetic" in k]
    curve = [
        [f"{p['step']:,}", f"{p['seconds']:,.0f} s", *(shown(k, p.get(k, float("nan"))) for k in columns)]
        for p in report.get("curve", [])
    ]
    return [
        Table(f"GRPO, held-out ({name}; reward {report.get('reward')})", ["measure", "before", "after"], rows),
        Table(
            f"GRPO, each evaluation ({name})",
            ["step", "training", *(k.removeprefix("heldout/") for k in columns)],
            curve,
        ),
    ]


def identity_report(report: dict, name: str) -> list[Table]:
    """The identity recipe's identity.json: its numbers."""
    rows = [[key, metric_value(key, value)] for key, value in report.items() if isinstance(value, (int, float))]
    rows += [[key, str(value)] for key, value in report.items() if isinstance(value, str)]
    return [Table(f"Identity ({name})", ["measure", "value"], rows)]


def quickstart_report(report: dict, name: str) -> list[Table]:
    """A quickstart's report.json, by the kind of quickstart its keys show."""
    if "facts" in report and "validation" in report:
        return language_quickstart(report, name)
    if "heldout" in report:  # the held-out pictures are shown with the stage that wrote them (sft/heldout.json)
        seconds = [[part, f"{value:,.0f} s"] for part, value in report.get("seconds", {}).items()]
        return [Table(f"Wall time ({name})", ["part", "time"], seconds)]
    if "retrieval" in report:
        return rag_quickstart(report, name)
    return []


def language_quickstart(report: dict, name: str) -> list[Table]:
    """tinylm quickstart: the pretrained model's held-out text and facts, the chat model's held-out
    questions (against the pretrained model's), samples, a chat and the wall times."""
    validation, facts, chat = report["validation"], report["facts"], report["sft"]
    measures = [
        ["validation loss (nats/token)", f"{validation['loss']:.4f}"],
        ["bits per byte", f"{validation['bpb']:.4f}"],
        ["bits per byte of a unigram model (the baseline)", f"{validation['unigram_bpb']:.4f}"],
        ["held-out facts completed (greedy)", f"{facts['correct']}/{facts['total']} = {facts['accuracy']:.1%}"],
        *([f"held-out facts, {kind}", percent(share)] for kind, share in facts["by_kind"].items()),
    ]
    questions = chat["questions"]
    answered = [
        [
            "all",
            percent(questions["chat"]["accuracy"]),
            percent(questions["base"]["accuracy"]),
            str(questions["chat"]["total"]),
        ]
    ]
    answered += [
        [kind, percent(share), percent(questions["base"]["by_kind"].get(kind)), ""]
        for kind, share in questions["chat"]["by_kind"].items()
    ]
    seconds = [
        ["pretraining (training only)", f"{report['training']['seconds']:,.0f} s"],
        ["pretraining with data and evaluation", f"{report['pretraining_seconds']:,.0f} s"],
        ["fine-tuning (training only)", f"{chat['seconds']:,.0f} s"],
        ["the whole quickstart", f"{report['total_seconds']:,.0f} s"],
    ]
    return [
        Table(f"Pretrained model: held-out text and facts ({name})", ["measure", "value"], measures),
        Table(
            f"Held-out questions answered, greedy ({name})",
            ["kind", "chat model", "pretrained model", "questions"],
            answered,
        ),
        Table(
            f"Samples of the pretrained model, temperature 0.8 ({name})",
            ["prompt", "continuation"],
            [[s["prompt"], s["text"]] for s in report["samples"]],
            wide=True,
        ),
        Table(
            f"Held-out facts, first few ({name})",
            ["prompt", "completion", "answer", ""],
            [[e["prompt"], e["completion"], e["answer"], "✓" if e["correct"] else "✗"] for e in facts["examples"]],
            wide=True,
        ),
        Table(
            f"A short chat with the chat model, greedy ({name})",
            ["role", "message"],
            [[m["role"], m["content"]] for m in chat["chat"]],
            wide=True,
        ),
        Table(f"Wall time ({name})", ["part", "time"], seconds),
    ]


def rag_quickstart(report: dict, name: str) -> list[Table]:
    """tinylm rag quickstart: retrieval and answers in both languages, and examples."""
    languages = ("en", "zh")

    def row(label: str, numbers: dict) -> list[str]:
        return [label, *(percent(numbers.get(lang)) for lang in languages)]

    retrieval = report["retrieval"]
    rows = [row(f"retrieval {k}", {lang: retrieval[lang][k] for lang in languages}) for k in ("hit@1", "hit@5")]
    rows.append(row("answers without RAG", report["without_rag"]["accuracy"]))
    for key in sorted(k for k in report if k.startswith("with_rag_")):
        _, _, label, k = key.split("_")
        rows.append(
            row(
                f"answers with RAG, {k.removeprefix('k')} passage(s), {label} reading practice", report[key]["accuracy"]
            )
        )
    best = max((k for k in report if k.startswith("with_rag_after_")), default=None)
    examples = [
        [e["question"], e["reply"], e["answer"], "✓" if e["correct"] else "✗"]
        for e in (report[best]["examples"] if best else [])
    ]
    return [
        Table(
            f"Reading a world it never saw ({name}, {report['questions']} questions)",
            ["measure", "English", "Chinese"],
            rows,
        ),
        Table(f"Answers with RAG, first few ({name})", ["question", "reply", "answer", ""], examples, wide=True),
    ]


# the files whose measurements the report shows, and how
MEASUREMENTS = {
    "report.json": quickstart_report,
    "results.json": eval_results,
    "heldout.json": heldout_pictures,
    "dpo.json": dpo_report,
    "grpo.json": grpo_report,
    "identity.json": identity_report,
}
