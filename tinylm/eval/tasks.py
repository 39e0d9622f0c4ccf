"""Tasks: what ``tinylm eval --tasks`` runs, each giving metrics and one sample line per item.

- a benchmark (``tinylm.eval.benchmarks``): multiple choice scored by log-likelihood (``acc``: the
  choice with the highest summed log-probability; ``acc_norm``: the same divided by the choice's
  length in characters, as the harness normalises), or GSM8K generated greedily and matched
  (``exact_match,strict-match``: the number after "#### "; ``exact_match,flexible-extract``: the last
  number in the reply);
- ``ppl:FILE[,FILE…]``: perplexity of text files (``word_perplexity``, ``byte_perplexity``,
  ``bits_per_byte``, and the token-level ``perplexity``), each document scored whole;
- ``builtin``: the built-in world's held-out chat questions (``acc``, by kind and language);
- ``prompts:FILE``: a fixed list of prompts (as ``tinylm chat --prompts`` reads them) answered
  greedily, saved side by side for reading.

Few-shot examples come from each benchmark's few-shot split: the first k of the same subject (MMLU,
C-Eval, CMMLU, as the harness's ``first_n``), or drawn with ``random.Random(1234)`` item after item
(ARC, HellaSwag, GSM8K, as the harness's default sampler). With ``chat=True`` the prompt goes through
the model's chat template: the description as the system turn, the examples and the question as one
user turn, and the continuation after the assistant's opening.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tinylm.eval.benchmarks import Benchmark, Doc
from tinylm.eval.loglik import Scorer
from tinylm.infer.chat import answer_prompts, read_prompts
from tinylm.infer.sampling import SamplingSettings
from tinylm.io import DataError, iter_records

FEWSHOT_SEED = 1234  # the harness's few-shot seed
GSM8K_STOPS = ["Question:", "</s>", "<|im_end|>"]
GSM8K_IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]  # removed from reply and reference before matching


@dataclass
class TaskResult:
    name: str
    metrics: dict[str, float]
    items: int
    samples: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # per subject or kind, examples


# -- prompts ---------------------------------------------------------------------------------------


def fewshot_examples(benchmark: Benchmark, shots: int) -> list[list[Doc]]:
    """The few-shot examples of every item, in item order."""
    if shots <= 0:
        return [[] for _ in benchmark.docs]
    rng = random.Random(FEWSHOT_SEED)
    examples = []
    for doc in benchmark.docs:
        pool = benchmark.fewshot.get(doc.subject, [])
        if len(pool) < shots:
            raise DataError(
                f"{benchmark.name}: {shots}-shot needs {shots} few-shot examples"
                f"{' of ' + doc.subject if doc.subject else ''}, the few-shot split has {len(pool)}"
            )
        examples.append(pool[:shots] if benchmark.sampler == "first_n" else rng.sample(pool, shots))
    return examples


def plain_prompt(benchmark: Benchmark, doc: Doc, shots: list[Doc]) -> str:
    """Description, then each example's text, a space and its answer, a blank line; then the item."""
    worked = "".join(f"{s.text} {s.answer_text}\n\n" for s in shots)
    return benchmark.descriptions.get(doc.subject, "") + worked + doc.text


def prompt_for(benchmark: Benchmark, doc: Doc, shots: list[Doc], chat_format=None) -> str:
    if chat_format is None:
        return plain_prompt(benchmark, doc, shots)
    messages = []
    description = benchmark.descriptions.get(doc.subject, "").strip()
    if description:
        messages.append({"role": "system", "content": description})
    worked = "".join(f"{s.text} {s.answer_text}\n\n" for s in shots)
    messages.append({"role": "user", "content": worked + doc.text})
    return chat_format.render(messages)


# -- multiple choice -------------------------------------------------------------------------------


def multiple_choice(name: str, benchmark: Benchmark, scorer: Scorer, shots: int, chat_format=None, progress=None):
    examples = fewshot_examples(benchmark, shots)
    prompts = [prompt_for(benchmark, doc, ex, chat_format) for doc, ex in zip(benchmark.docs, examples)]
    requests = [scorer.request(p, [" " + c for c in doc.choices]) for p, doc in zip(prompts, benchmark.docs)]
    scored = scorer.score(requests, progress)
    samples, by_subject = [], {}
    for i, (doc, scores) in enumerate(zip(benchmark.docs, scored)):
        logprobs = [s.logprob for s in scores]
        normed = [lp / len(c) for lp, c in zip(logprobs, doc.choices)]  # characters of the choice itself
        pred, pred_norm = argmax(logprobs), argmax(normed)
        samples.append(
            {
                "doc_id": i,
                "subject": doc.subject,
                "target": doc.gold,
                "pred": pred,
                "pred_norm": pred_norm,
                "scores": logprobs,
                "greedy": [s.greedy for s in scores],
                "acc": float(pred == doc.gold),
                "acc_norm": float(pred_norm == doc.gold),
            }
        )
        by_subject.setdefault(doc.subject, []).append(pred == doc.gold)
    metrics = {"acc": mean(s["acc"] for s in samples), "acc_norm": mean(s["acc_norm"] for s in samples)}
    metrics["acc_stderr"] = stderr([s["acc"] for s in samples])
    details = {"chance": mean(1 / len(doc.choices) for doc in benchmark.docs)}
    if len(by_subject) > 1:
        details["subjects"] = {subject: mean(v) for subject, v in sorted(by_subject.items())}
    if prompts:
        details["first_prompt"] = prompts[0]
    return TaskResult(name, metrics, len(samples), samples, details)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else float("nan")


def stderr(values: list[float]) -> float:
    """The standard error of the mean (sample standard deviation / √n), as the harness reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1) / n)


# -- GSM8K -----------------------------------------------------------------------------------------


def strict_answer(reply: str) -> str:
    found = re.search(r"#### (\-?[0-9\.\,]+)", reply)
    return found.group(1) if found else "[invalid]"


def flexible_answer(reply: str) -> str:
    found = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", reply)
    if not found:
        return "[invalid]"
    return next(group for group in found[-1] if group)


def normalise(text: str) -> str:
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower().strip()


def gsm8k(
    name: str,
    benchmark: Benchmark,
    engine,
    shots: int,
    batch_size: int,
    chat_format=None,
    progress=None,
    max_new_tokens: int = 256,
):
    examples = fewshot_examples(benchmark, shots)
    prompts = [prompt_for(benchmark, doc, ex, chat_format) for doc, ex in zip(benchmark.docs, examples)]
    stops = sorted({*engine.model.config.eos_token_ids(), engine.tokenizer.eos_id})  # any end token, as HF stops
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=0, stop_strings=GSM8K_STOPS, stop_token_ids=stops
    )
    if chat_format is not None:
        settings = chat_format.settings(settings, engine.tokenizer)
    replies = generate(engine, prompts, settings, batch_size, progress)
    samples = []
    for i, (doc, reply) in enumerate(zip(benchmark.docs, replies)):
        target = normalise(str(doc.gold))
        strict, flexible = normalise(strict_answer(reply)), normalise(flexible_answer(reply))
        samples.append(
            {
                "doc_id": i,
                "target": doc.gold.split("####")[-1].strip(),
                "pred": strict,
                "pred_flexible": flexible,
                "reply": reply,
                "exact_match,strict-match": float(strict == target),
                "exact_match,flexible-extract": float(flexible == target),
            }
        )
    metrics = {
        key: mean(s[key] for s in samples) for key in ("exact_match,strict-match", "exact_match,flexible-extract")
    }
    return TaskResult(name, metrics, len(samples), samples, {"first_prompt": prompts[0] if prompts else ""})


def generate(engine, prompts: list[str], settings: SamplingSettings, batch_size: int, progress=None) -> list[str]:
    """Greedy replies, ``batch_size`` prompts at a time through the engine; a prompt longer than the
    context keeps its last tokens."""
    replies = []
    room = engine.context_length - settings.max_new_tokens  # as the harness leaves room for the reply
    if room < 1:
        raise ValueError(
            f"max_new_tokens {settings.max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{engine.context_length} tokens"
        )
    for start in range(0, len(prompts), batch_size):
        ids = [engine.encode(p)[-room:] for p in prompts[start : start + batch_size]]
        replies += [c.text for c in engine.run(ids, settings)]
        if progress is not None:
            progress(len(ids))
    return replies


# -- perplexity ------------------------------------------------------------------------------------


def read_documents(paths: list[str]) -> list[tuple[str, str]]:
    """(where, text) of every document: a .txt file whole, each record of .jsonl/.json/.parquet
    (a string, or an object's "text" field), plain or gzip-compressed."""
    documents = []
    for path in paths:
        for where, record in iter_records(path, txt_split="file"):
            if isinstance(record, DataError):
                raise record
            text = record if isinstance(record, str) else record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{where}: expected a string or an object with a "text" field')
            if text.strip():
                documents.append((where, text))
    if not documents:
        raise DataError(f"{', '.join(paths)}: no text to score")
    return documents


def perplexity(name: str, paths: list[str], scorer: Scorer, progress=None) -> TaskResult:
    tokenizer = scorer.engine.tokenizer
    total, words, nbytes, tokens, samples = 0.0, 0, 0, 0, []
    for i, (where, text) in enumerate(read_documents(paths)):
        ids = tokenizer.encode(text)
        logprob = scorer.rolling(ids)
        doc_words, doc_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
        total, words, nbytes, tokens = total + logprob, words + doc_words, nbytes + doc_bytes, tokens + len(ids)
        samples.append(
            {
                "doc_id": i,
                "source": where,
                "logprob": logprob,
                "tokens": len(ids),
                "words": doc_words,
                "bytes": doc_bytes,
            }
        )
        if progress is not None:
            progress(1)
    metrics = {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / nbytes),
        "bits_per_byte": -total / nbytes / math.log(2),
        "perplexity": math.exp(-total / tokens),
    }
    return TaskResult(name, metrics, len(samples), samples, {"tokens": tokens, "words": words, "bytes": nbytes})


# -- a prompts file --------------------------------------------------------------------------------


def prompts_task(name: str, path: str, engine, chat_format, batch_size: int, max_new_tokens: int, progress=None):
    """A prompts file (``tinylm chat --prompts``'s: .txt lines or {"prompt": ...} lines) answered greedily
    in the model's chat format, ``batch_size`` at a time."""
    prompts = read_prompts(path)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    records = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        records += answer_prompts(engine, chunk, settings=settings, chat_format=chat_format)
        if progress is not None:
            progress(len(chunk))
    samples = [
        {"doc_id": i, "prompt": r["prompt"], "reply": r["answer"], "finish_reason": r["finish_reason"]}
        for i, r in enumerate(records)
    ]
    return TaskResult(name, {}, len(samples), samples, {"file": path})


def prompts_markdown(result: TaskResult) -> str:
    lines = [f"# {result.name}: {result.details['file']}", ""]
    for s in result.samples:
        lines += [f"## {s['doc_id'] + 1}. {s['prompt']}", "", s["reply"] or "(no reply)", ""]
    return "\n".join(lines)


def sample_lines(result: TaskResult) -> str:
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.samples)


def task_files(spec: str) -> list[str]:
    """The files of a ``ppl:`` or ``prompts:`` task: comma-separated, each one existing."""
    files = [f for f in spec.split(",") if f]
    for f in files:
        if not Path(f).is_file():
            raise DataError(f"{f}: no such file")
    return files
