"""The RAG quickstart: teach the quickstart's chat model to read, then test it on a world it never saw.

    tinylm rag quickstart --out runs/rag                       # runs the quickstart first (a few minutes)
    tinylm rag quickstart --out runs/rag --init runs/quickstart/sft/final

→ the chat model (the quickstart's, or ``--init``)
→ fine-tuned on reading practice (tinylm.rag.builtin) mixed with its own conversations → sft/final
→ the test world's documents written as files and indexed (tinylm rag index) → test_world.db
→ every test-world fact asked in both languages: retrieval hit@1 / hit@5, the answers with the best
  passage and with five (before and after the practice), and without any
→ report.json and report.md; the whole run on one page (tinylm report): report/report.html
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tinylm.config import load_config
from tinylm.eval.report import write_report
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.io import atomic_write_json, atomic_write_text
from tinylm.quickstart import SFT_CONFIG, quickstart
from tinylm.rag.ask import Asker
from tinylm.rag.builtin import ReadingTest, practice_mix, training_names
from tinylm.rag.index import build_index
from tinylm.rag.search import Searcher
from tinylm.train.sft import SFTConfig, sft

PRETRAIN_CONFIG = Path(__file__).parent / "configs" / "cpu-tiny.yaml"
READING, CHAT = 3000, 3000  # practice conversations, and the built-in ones mixed in to keep the rest
# the reading fine-tune: prompts with passages need the model's whole context
READING_SFT = ["--train.seq_len=512", "--train.max_steps=400", "--train.lr=0.001", "--train.batch_size=16"]
KS = (1, 5)  # passages retrieved per question: the best one alone, and rag ask's default


def rag_quickstart(
    out_dir: str | Path,
    init: str | Path | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    quickstart_overrides: list[str] | None = None,
    questions: int | None = None,
) -> dict:
    """Teach ``init`` (default: a new quickstart's chat model) to read; test it on ``questions`` per
    language (default all) of the test world; write report.json / report.md into ``out_dir``."""
    started = time.perf_counter()
    run_dir = Path(out_dir)
    if init is None:  # --quickstart.sft.key=value reach its fine-tuning, --quickstart.key=value its pretraining
        sft_first = [f"--{o[len('--sft.') :]}" for o in quickstart_overrides or [] if o.startswith("--sft.")]
        pretraining = [o for o in quickstart_overrides or [] if not o.startswith("--sft.")]
        quickstart(run_dir / "quickstart", PRETRAIN_CONFIG, pretraining, sft_overrides=sft_first)
        init = run_dir / "quickstart" / "sft" / "final"

    data = run_dir / "data" / "reading.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": c}, ensure_ascii=False) for c in practice_mix(seed, READING, CHAT)]
    atomic_write_text(data, "".join(line + "\n" for line in lines))
    cfg = load_config(
        SFTConfig,
        SFT_CONFIG,
        [*READING_SFT, *(overrides or []), f"--init_from={init}", "--data.source=files", f"--data.files=[{data}]"],
    )
    final, result = sft(cfg, run_dir / "sft", resume=True)
    if result.interrupted:
        raise SystemExit(130)

    test = ReadingTest(seed, run_dir / "test_world", exclude=training_names(seed), limit=questions)
    index = run_dir / "test_world.db"
    build_index([test.folder], index, progress=False)
    searcher = Searcher(index)
    settings = SamplingSettings(max_new_tokens=48, temperature=0)
    report = {"run_dir": str(run_dir), "init": str(init), "questions": len(test.questions)}
    report["retrieval"] = test.retrieval(searcher)
    for label, model in (("before", init), ("after", final)):
        engine = Engine.from_dir(model, device=cfg.train.device)
        for k in KS:
            report[f"with_rag_{label}_k{k}"] = test.answers(asker=Asker(engine, searcher, k, settings))
        if label == "after":
            chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
            report["without_rag"] = test.answers(engine=engine, chat_format=chat_format)
    report["sft"] = {"steps": result.step, "seconds": result.elapsed_s}
    report["total_seconds"] = time.perf_counter() - started
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render(report))
    page, _ = write_report(run_dir)
    print(render(report))
    print(f"The whole run on one page: {page}")
    return report


def render(report: dict) -> str:
    def row(name: str, numbers: dict) -> str:
        return f"| {name} | {numbers['en']:.1%} | {numbers['zh']:.1%} |"

    retrieval = report["retrieval"]
    lines = [
        f"# RAG quickstart: {report['run_dir']}",
        "",
        f"Reading practice fine-tuned {report['init']} for {report['sft']['steps']} steps "
        f"({report['sft']['seconds']:.0f} s); {report['questions']} questions about a world it never saw, "
        f"its documents indexed and searched ({report['total_seconds']:.0f} s in all).",
        "",
        "| | English | Chinese |",
        "|---|---|---|",
        row("retrieval hit@1", {lang: retrieval[lang]["hit@1"] for lang in ("en", "zh")}),
        row("retrieval hit@5", {lang: retrieval[lang]["hit@5"] for lang in ("en", "zh")}),
        row("answers without RAG", report["without_rag"]["accuracy"]),
    ]
    for label in ("before", "after"):
        for k in KS:
            name = f"answers with RAG ({k} passage{'s' if k > 1 else ''}), {label} reading practice"
            lines.append(row(name, report[f"with_rag_{label}_k{k}"]["accuracy"]))
    lines += ["", f"## Answers with RAG, {KS[-1]} passages (first few)", ""]
    for e in report[f"with_rag_after_k{KS[-1]}"]["examples"]:
        lines.append(f"- {'✓' if e['correct'] else '✗'} {e['question']} → {e['reply'][:80]!r} (answer {e['answer']})")
    return "\n".join(lines) + "\n"
