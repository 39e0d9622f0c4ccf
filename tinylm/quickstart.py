"""The quickstart: the whole foundation in one command, then an honest account of what was learned.

built-in corpus → BPE tokenizer → token shards → pretraining → final model directory
→ validation loss and bits per byte against a unigram baseline
→ held-out facts completed greedily, a few samples
→ supervised fine-tuning on the built-in conversations (chatml) → a chat model in sft/final
→ held-out questions answered by the base model and by the chat model, a short chat
→ report.json and report.md in the run directory; the evaluations on each model's card (README.md);
  the whole run on one page (tinylm report): report/report.html
"""

from __future__ import annotations

import time
from pathlib import Path

from tinylm.config import load_config
from tinylm.data import builtin, builtin_chat
from tinylm.data.builtin import score_completion
from tinylm.data.text import load_shard_info
from tinylm.eval.questions import chat_accuracy, tally
from tinylm.eval.report import REPORT_DIR, write_report
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings
from tinylm.io import atomic_write_json, atomic_write_text
from tinylm.modelcard import add_evaluation
from tinylm.train.pretrain import PretrainConfig, evaluator, pretrain, unigram_bpb
from tinylm.train.sft import SFTConfig, sft

SAMPLE_PROMPTS = ["Once upon a time", "从前，", "12 + 7 =", "The "]
SFT_CONFIG = Path(__file__).parent / "configs" / "sft-cpu-tiny.yaml"
# A short chat shown in the report: a fact, a follow-up about the same creature, who the assistant is.
CHAT_TURNS = ["What colour is the Zorven?", "And how many legs does it have?", "Who are you?", "哒丁兽住在哪里？"]


def evaluate_facts(engine, items) -> dict:
    """Greedy completion of each held-out prompt; the share that starts with the known answer."""
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0)
    completions = engine.complete([item.prompt for item in items], settings)
    verdicts = [score_completion(item, completion) for item, completion in zip(items, completions)]
    examples = [
        {"prompt": item.prompt, "answer": item.answer, "completion": completion, "correct": ok}
        for item, completion, ok in zip(items[:8], completions, verdicts)
    ]
    return tally(items, verdicts, examples)


def render_report(report: dict) -> str:
    facts, val = report["facts"], report["validation"]
    lines = [
        f"# Quickstart report: {report['run_dir']}",
        "",
        f"- model: {report['model']['type']}, {report['model']['parameters']:,} parameters",
        f"- training: {report['training']['steps']} steps, {report['training']['tokens']:,} tokens, "
        f"{report['training']['seconds']:.0f} s of training ({report['pretraining_seconds']:.0f} s with data and "
        f"evaluation; {report['total_seconds']:.0f} s for the whole quickstart)",
        f"- validation loss: {val['loss']:.3f} nats/token, {val['bpb']:.3f} bits/byte "
        f"(unigram baseline {val['unigram_bpb']:.3f} bits/byte)",
        f"- held-out facts completed correctly (greedy): {facts['correct']}/{facts['total']} = {facts['accuracy']:.1%}",
    ]
    lines += [f"  - {kind}: {share:.1%}" for kind, share in facts["by_kind"].items()]
    lines += ["", "## Held-out facts (first few)", ""]
    lines += [
        f"- {'✓' if e['correct'] else '✗'} `{e['prompt']}` → `{e['completion'].strip()[:40]}` (answer `{e['answer']}`)"
        for e in facts["examples"]
    ]
    lines += ["", "## Samples (temperature 0.8, seed 0)", ""]
    lines += [f"- `{s['prompt']}` → {s['text']!r}" for s in report["samples"]]
    chat = report["sft"]
    questions = chat["questions"]
    lines += [
        "",
        "## Fine-tuned into a chat model (sft/)",
        "",
        f"- supervised fine-tuning: {chat['steps']} steps, {chat['tokens']:,} conversation tokens, "
        f"{chat['seconds']:.0f} s; "
        f"validation loss {chat['val_loss']:.3f} nats per answer token",
        "- held-out questions answered correctly (greedy): chat model "
        f"{questions['chat']['correct']}/{questions['chat']['total']} = "
        f"{questions['chat']['accuracy']:.1%}; the pretrained model before fine-tuning "
        f"{questions['base']['accuracy']:.1%}",
    ]
    lines += [
        f"  - {kind}: {share:.1%} (before: {questions['base']['by_kind'].get(kind, 0):.1%})"
        for kind, share in questions["chat"]["by_kind"].items()
    ]
    lines += ["", "A short chat (greedy):", ""]
    lines += [f"- **{m['role']}**: {m['content']}" for m in chat["chat"]]
    lines += [
        "",
        "The loss curves are in loss.png and sft/loss.png; every logged step is in metrics.jsonl; the whole run "
        f"on one page: {report['run_dir']}/{REPORT_DIR}/report.html",
        f"Chat with it: `tinylm chat {report['run_dir']}/sft/final`",
        "",
    ]
    return "\n".join(lines)


def quickstart(
    out_dir: str | Path,
    config_path: str | Path,
    overrides: list[str] | None = None,
    sft_config_path: str | Path = SFT_CONFIG,
    sft_overrides: list[str] | None = None,
) -> dict:
    """Pretrain, then fine-tune into a chat model; write report.json / report.md into ``out_dir``."""
    started = time.perf_counter()
    cfg = load_config(PretrainConfig, config_path, overrides)
    run_dir = Path(out_dir)
    final, result = pretrain(cfg, run_dir, resume=True)
    if result.interrupted:
        raise SystemExit(130)

    info = load_shard_info(run_dir / "data" / "shards")
    engine = Engine.from_dir(final, device=cfg.train.device)
    validation = evaluator(info.val_bin, info.meta, cfg.train.seq_len, cfg.train.eval_batches, info.dtype)(engine.model)
    world = builtin.World(cfg.data.builtin_seed)
    facts = evaluate_facts(engine, builtin.heldout_facts(world))
    sample_settings = SamplingSettings(max_new_tokens=48, temperature=0.8, top_k=50, seed=0)
    samples = [{"prompt": p, "text": engine.complete([p], sample_settings)[0]} for p in SAMPLE_PROMPTS]
    pretraining_seconds = time.perf_counter() - started

    sft_cfg = load_config(
        SFTConfig,
        sft_config_path,
        [*(sft_overrides or []), f"--init_from={final}", f"--train.device={cfg.train.device}"],
    )
    chat_final, chat_result = sft(sft_cfg, run_dir / "sft", resume=True)
    if chat_result.interrupted:
        raise SystemExit(130)
    chat_engine = Engine.from_dir(chat_final, device=cfg.train.device)
    report = {
        "run_dir": str(run_dir),
        "model": {"type": engine.model.config.model_type, "parameters": engine.model.num_parameters()},
        "training": {"steps": result.step, "tokens": result.tokens, "seconds": result.elapsed_s},
        "validation": {
            "loss": validation["val_loss"],
            "bpb": validation["val_bpb"],
            "unigram_bpb": unigram_bpb(
                info.train_bin, info.val_bin, info.meta, engine.model.config.vocab_size, info.dtype
            ),
        },
        "facts": facts,
        "samples": samples,
        "pretraining_seconds": pretraining_seconds,
        "sft": {
            "steps": chat_result.step,
            "tokens": chat_result.tokens,
            "seconds": chat_result.elapsed_s,
            "val_loss": chat_result.last_metrics.get("val_loss"),
            "questions": evaluate_questions(engine, chat_engine, builtin_chat.heldout_questions(world)),
            "chat": short_chat(chat_engine, CHAT_TURNS),
        },
        "total_seconds": time.perf_counter() - started,
    }
    atomic_write_json(run_dir / "report.json", report)
    text = render_report(report)
    atomic_write_text(run_dir / "report.md", text)
    base_card, chat_card = card_evaluations(report)
    add_evaluation(final, base_card, "the quickstart (report.json)")
    add_evaluation(chat_final, chat_card, "the quickstart (report.json)")
    page, _ = write_report(run_dir)
    print(text)
    print(f"The whole run on one page: {page}")
    return report


def card_evaluations(report: dict) -> tuple[dict, dict]:
    """The report's measurements as model card evaluation rows: (the pretrained model's, the chat model's)."""
    validation, facts, questions = report["validation"], report["facts"], report["sft"]["questions"]
    base = {
        "held-out text": {
            "loss (nats/token)": validation["loss"],
            "bits per byte": validation["bpb"],
            "bits per byte, unigram baseline": validation["unigram_bpb"],
        },
        "held-out facts, greedy completion": {"accuracy": facts["accuracy"], "items": facts["total"]},
        **{f"held-out facts: {kind}": {"accuracy": share} for kind, share in facts["by_kind"].items()},
        "held-out questions, plain labelled lines": {
            "accuracy": questions["base"]["accuracy"],
            "items": questions["base"]["total"],
        },
    }
    chat = {
        "held-out questions, greedy": {"accuracy": questions["chat"]["accuracy"], "items": questions["chat"]["total"]}
    }
    chat |= {f"held-out questions: {kind}": {"accuracy": share} for kind, share in questions["chat"]["by_kind"].items()}
    return base, chat


def evaluate_questions(base_engine, chat_engine, items) -> dict:
    """Held-out questions answered greedily by the chat model in its template, and for contrast by the
    base model in the plain labelled-lines format (the best it can do before fine-tuning)."""
    chat = chat_accuracy(
        chat_engine, items, chat_format_for(chat_engine.tokenizer, chat_engine.model.config.eos_token_ids())
    )
    base = chat_accuracy(base_engine, items, chat_format_for(base_engine.tokenizer))
    return {"chat": chat, "base": {k: base[k] for k in ("accuracy", "correct", "total", "by_kind")}}


def short_chat(engine, turns: list[str]) -> list[dict]:
    """One multi-turn conversation, answered greedily turn by turn with the history in the prompt."""
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    settings = chat_format.settings(SamplingSettings(max_new_tokens=48, temperature=0), engine.tokenizer)
    messages: list[dict] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        reply = engine.complete([chat_format.render(messages)], settings)[0].strip()
        messages.append({"role": "assistant", "content": reply})
    return messages
