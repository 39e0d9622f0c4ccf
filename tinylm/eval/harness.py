"""``tinylm eval``: run tasks on a model and write what they found.

``evaluate`` loads the model once, runs each task (``tinylm.eval.tasks``) with a progress bar, and, given
``out``, writes:

- ``results.json``: per task its metrics (named as lm-evaluation-harness names them), the item count,
  the number of shots, chance level for multiple choice, per-subject accuracy; and how it was run;
- ``results.md``: the same as a table;
- ``samples_<task>.jsonl``: one line per item (``doc_id``, ``target``, ``pred``, ``scores``: each
  choice's log-likelihood in choice order; a generation task's reply);
- ``prompts_<name>.md`` for a prompts file: each prompt and its reply, for reading.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from tinylm.eval import tasks as T
from tinylm.eval.benchmarks import READERS, load_benchmark
from tinylm.eval.loglik import Scorer
from tinylm.infer.chat import PLAIN, chat_format_for
from tinylm.io import DataError, atomic_write_json, atomic_write_text

DEFAULT_SHOTS = {"gsm8k": 5}  # the harness's defaults; every other task is zero-shot unless --shots says
GROUPED = ("mmlu", "cmmlu", "ceval")  # --limit counts per subject here, as the harness's per-subtask limit


def task_names(spec: str | list[str]) -> list[str]:
    """The task list of ``--tasks`` (comma-separated; ``ppl:`` and ``prompts:`` take files after the colon)."""
    names = spec if isinstance(spec, list) else split_tasks(spec)
    for name in names:
        kind = name.split(":", 1)[0]
        if name not in READERS and name != "builtin" and kind not in ("ppl", "prompts"):
            known = ", ".join([*READERS, "builtin", "ppl:FILE", "prompts:FILE"])
            raise DataError(f"unknown task {name!r}: expected one of {known}")
        if kind in ("ppl", "prompts") and ":" not in name:
            raise DataError(f"task {name!r}: name the file, as {kind}:FILE")
    return names


def split_tasks(spec: str) -> list[str]:
    """Split at commas, except between the files of one ppl:/prompts: task (a file name never begins
    a task: "ppl:a.txt,b.txt,mmlu" is one ppl task over two files, then mmlu)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if (
            names
            and names[-1].split(":", 1)[0] in ("ppl", "prompts")
            and part not in READERS
            and ":" not in part
            and part != "builtin"
        ):
            names[-1] += "," + part
        else:
            names.append(part)
    return names


def limited(benchmark, limit: int | None):
    if limit is None:
        return benchmark
    if benchmark.name in GROUPED:
        kept, counts = [], {}
        for doc in benchmark.docs:
            counts[doc.subject] = counts.get(doc.subject, 0) + 1
            if counts[doc.subject] <= limit:
                kept.append(doc)
        benchmark.docs = kept
    else:
        benchmark.docs = benchmark.docs[:limit]
    return benchmark


def evaluate(
    engine,
    tasks: str | list[str],
    *,
    data_dir: str | Path | None = None,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    chat: bool = False,
    max_new_tokens: int = 256,
    seed: int = 0,
    out: str | Path | None = None,
    model_name: str = "",
    progress: bool = True,
) -> dict:
    """Run ``tasks`` on ``engine``'s model; return (and, given ``out``, write) the results."""
    names = task_names(tasks)
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    if chat and chat_format is PLAIN:
        raise ValueError("--chat: this model has no chat template (evaluate it without --chat)")
    scorer = Scorer(engine, batch_size)
    results = {
        "model": model_name,
        "tasks": {},
        "config": {
            "shots": shots,
            "limit": limit,
            "batch_size": batch_size,
            "chat": chat,
            "data_dir": None if data_dir is None else str(data_dir),
        },
    }
    written = []
    for name in names:
        started = time.perf_counter()
        result = run_task(
            name,
            engine,
            scorer,
            chat_format if chat else None,
            chat_format,
            data_dir,
            shots,
            limit,
            batch_size,
            max_new_tokens,
            seed,
            progress,
        )
        entry = {**result.metrics, "items": result.items, **result.details, "seconds": time.perf_counter() - started}
        if name in READERS:
            entry["shots"] = DEFAULT_SHOTS.get(name, 0) if shots is None else shots
        results["tasks"][name] = entry
        if out is not None:
            written += write_task(Path(out), name, result)
    if out is not None:
        out = Path(out)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", markdown(results))
        print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(written)} sample files", file=sys.stderr)
    return results


def run_task(
    name, engine, scorer, chat_format, own_format, data_dir, shots, limit, batch_size, max_new_tokens, seed, progress
) -> T.TaskResult:
    kind, _, spec = name.partition(":")
    if kind == "ppl":
        files = T.task_files(spec)
        with bar(name, len(T.read_documents(files)), "doc", progress) as b:
            return T.perplexity(name, files, scorer, b.update)
    if kind == "prompts":
        files = T.task_files(spec)
        with bar(name, None, "prompt", progress) as b:
            return T.prompts_task(name, files[0], engine, own_format, batch_size, max_new_tokens, b.update)
    if name == "builtin":
        return builtin_task(engine, own_format, seed)
    benchmark = limited(load_benchmark(name, data_dir), limit)
    k = DEFAULT_SHOTS.get(name, 0) if shots is None else shots
    with bar(name, len(benchmark.docs), "item", progress) as b:
        if benchmark.kind == "generate":
            return T.gsm8k(name, benchmark, engine, k, batch_size, chat_format, b.update, max_new_tokens)
        return T.multiple_choice(name, benchmark, scorer, k, chat_format, b.update)


def builtin_task(engine, chat_format, seed: int) -> T.TaskResult:
    """The built-in world's held-out chat questions, answered greedily in the model's chat format."""
    from tinylm.data import builtin, builtin_chat
    from tinylm.eval.questions import answer

    items = builtin_chat.heldout_questions(builtin.World(seed))
    replies = answer(engine, items, chat_format)
    samples, by_kind = [], {}
    for i, (item, reply) in enumerate(zip(items, replies)):
        ok = builtin_chat.score_reply(item, reply)
        samples.append(
            {
                "doc_id": i,
                "kind": f"{item.kind}/{item.lang}",
                "question": item.messages[-1]["content"],
                "target": item.answer,
                "pred": reply,
                "acc": float(ok),
            }
        )
        by_kind.setdefault(f"{item.kind}/{item.lang}", []).append(ok)
    metrics = {"acc": T.mean(s["acc"] for s in samples)}
    return T.TaskResult(
        "builtin", metrics, len(samples), samples, {"kinds": {k: T.mean(v) for k, v in sorted(by_kind.items())}}
    )


def bar(name: str, total: int | None, unit: str, progress: bool):
    return tqdm(total=total, desc=name, unit=unit, disable=not progress, file=sys.stderr, dynamic_ncols=True)


def file_stem(name: str) -> str:
    """A task's name as a file name part: ppl:/prompts: tasks by their first file's stem."""
    kind, _, spec = name.partition(":")
    return f"{kind}_{Path(spec.split(',')[0]).stem}" if spec else name


def write_task(out: Path, name: str, result: T.TaskResult) -> list[Path]:
    paths = [out / f"samples_{file_stem(name)}.jsonl"]
    atomic_write_text(paths[0], T.sample_lines(result))
    if name.startswith("prompts:"):
        paths.append(out / f"{file_stem(name)}.md")
        atomic_write_text(paths[1], T.prompts_markdown(result))
    return paths


METRIC_ORDER = (
    "acc",
    "acc_norm",
    "exact_match,strict-match",
    "exact_match,flexible-extract",
    "word_perplexity",
    "byte_perplexity",
    "bits_per_byte",
    "perplexity",
)


def markdown(results: dict) -> str:
    """The results as a table: one row per task and metric, with chance beside accuracy."""
    lines = [
        f"# Evaluation of {results['model'] or 'the model'}",
        "",
        "| task | shots | metric | value | chance | items |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results["tasks"].items():
        shown = [m for m in METRIC_ORDER if m in entry] or ["—"]
        for metric in shown:
            value = entry.get(metric)
            text = (
                "—"
                if value is None
                else f"{value:.4f}"
                if metric.endswith("perplexity") or metric == "bits_per_byte"
                else f"{value:.1%}"
            )
            chance = f"{entry['chance']:.1%}" if "chance" in entry and metric.startswith("acc") else ""
            shots = entry.get("shots", "")
            lines.append(f"| {name} | {shots} | {metric} | {text} | {chance} | {entry['items']} |")
    return "\n".join(lines) + "\n"
