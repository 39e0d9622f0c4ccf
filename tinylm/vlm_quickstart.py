"""The vision-language quickstart: a model that sees, from nothing, in minutes on a laptop CPU.

built-in corpus → a small language model (skipped with --llm)
→ built-in pictures (coloured shapes in a 3×3 grid) with captions and questions, English and Chinese
→ stage 1: a new ViT and the projector learn from the captions; the language model is frozen
→ stage 2: the questions fine-tune projector, language model and ViT into a model that answers
→ held-out pictures: accuracy per kind of question against its chance rate, and against the same
  questions asked about a blank picture (what the wording alone gives away)
→ report.json and report.md in the run directory, with the wall time of each part; the whole run on one
  page (tinylm report): report/report.html
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tinylm.config import load_config
from tinylm.eval.image_questions import follow_up_line
from tinylm.eval.report import write_report
from tinylm.io import atomic_write_text
from tinylm.train.pretrain import PretrainConfig, pretrain
from tinylm.train.vlm import VLMStageConfig, train_vlm

CONFIGS = Path(__file__).parent / "configs"
LLM_STEPS = 300  # the language model only has to know the words; the pictures' questions teach the rest


def vlm_quickstart(
    out_dir: str | Path,
    llm: str | None = None,
    device: str | None = None,
    overrides: list[str] | None = None,
    llm_overrides: list[str] | None = None,
) -> dict:
    """Run every part (resuming any that already finished), write and print the report. ``overrides``
    reach both stages' configs, ``llm_overrides`` the language model's pretraining."""
    if llm is not None and llm_overrides:
        raise ValueError(
            f"{' '.join(llm_overrides)}: --llm.* overrides set the language model this run trains, not one given"
        )
    run_dir = Path(out_dir)
    device_override = [f"--train.device={device}"] if device else []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if llm is None:
        cfg = load_config(
            PretrainConfig,
            CONFIGS / "cpu-tiny.yaml",
            [f"--train.max_steps={LLM_STEPS}", "--train.save_every=0", *(llm_overrides or []), *device_override],
        )
        final, result = pretrain(cfg, run_dir / "llm", resume=True)
        if result.interrupted:
            raise SystemExit(130)
        llm = str(final)
        seconds["language model"] = time.perf_counter() - started

    finals = {}
    init = llm
    for stage in ("pretrain", "sft"):
        began = time.perf_counter()
        cfg = load_config(
            VLMStageConfig,
            CONFIGS / f"vlm-{stage}-cpu-tiny.yaml",
            [*(overrides or []), *device_override, f"--init_from={json.dumps(init)}"],
        )
        finals[stage], result = train_vlm(cfg, run_dir / stage, stage, resume=True)
        if result.interrupted:
            raise SystemExit(130)
        init = str(finals[stage])
        seconds["stage 1 (captions)" if stage == "pretrain" else "stage 2 (questions) and held-out answers"] = (
            time.perf_counter() - began
        )
    seconds["total"] = time.perf_counter() - started

    pictures = sorted((run_dir / "sft" / "data" / "builtin").glob("*/heldout/00000.png"))
    report = {
        "run_dir": str(run_dir),
        "language_model": llm,
        "model": str(finals["sft"]),
        "picture": str(pictures[-1]) if pictures else None,
        "heldout": json.loads((run_dir / "sft" / "heldout.json").read_text(encoding="utf-8")),
        "seconds": seconds,
    }
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    text = render_report(report)
    atomic_write_text(run_dir / "report.md", text)
    page, _ = write_report(run_dir)
    print(text)
    print(f"The whole run on one page: {page}")
    return report


def render_report(report: dict) -> str:
    heldout = report["heldout"]
    lines = [
        f"# Vision-language quickstart: {report['run_dir']}",
        "",
        f"Held-out pictures, greedy answers: {heldout['accuracy']:.1%} of {heldout['questions']} questions right "
        f"(asked about a blank picture instead: {heldout['blank_picture']['accuracy']:.1%}).",
        "",
        "| question | right | chance | blank picture | questions |",
        "|---|---|---|---|---|",
    ]
    for kind, row in heldout["by_kind"].items():
        blank = heldout["blank_picture"]["by_kind"][kind]["accuracy"]
        lines.append(f"| {kind} | {row['accuracy']:.1%} | {row['chance']:.1%} | {blank:.1%} | {row['questions']} |")
    if "follow_up_by_kind" in heldout:
        lines += [
            "",
            "A follow-up is a second or third question about the same picture in one conversation, asked after "
            f"the model's own replies; by what they ask: {follow_up_line(heldout)}.",
        ]
    lines += ["", "Examples:", ""]
    lines += [
        f"- {'✓' if e['right'] else '✗'} `{e['image']}` "
        + "".join(f"{asked} … " for asked in e.get("before", ()))  # a follow-up: the questions asked before it
        + f"{e['question']} → {e['reply']} (answer: {e['answer']})"
        for e in heldout["examples"]
    ]
    lines += ["", "Wall time:", ""]
    lines += [f"- {part}: {value:.0f} s" for part, value in report["seconds"].items()]
    picture = report["picture"] or "PICTURE.png"
    lines += [
        "",
        f"Chat with it: `tinylm chat {report['model']} --image {picture}` (a held-out picture; /image PATH shows it "
        "another)",
        "",
    ]
    return "\n".join(lines)
