"""The quickstart: the whole foundation in one command, then an honest account of what was learned.

    built-in corpus → BPE tokenizer → token shards → pretraining → final model directory
    → validation loss and bits per byte against a unigram baseline
    → held-out facts completed greedily, a few samples
    → report.json and report.md in the run directory
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tinylm.config import PretrainConfig, load_config
from tinylm.modeldir import atomic_write_text

SAMPLE_PROMPTS = ["Once upon a time", "从前，", "12 + 7 =", "The "]


def evaluate_facts(engine, items) -> dict:
    """Greedy completion of each held-out prompt; the share that starts with the known answer."""
    from tinylm.data.builtin import score_completion
    from tinylm.infer.engine import SamplingSettings

    settings = SamplingSettings(max_new_tokens=12, temperature=0.0)
    completions = engine.complete([item.prompt for item in items], settings)
    by_kind: dict[str, list[bool]] = {}
    examples = []
    for item, completion in zip(items, completions):
        ok = score_completion(item, completion)
        by_kind.setdefault(f"{item.kind}/{item.lang}", []).append(ok)
        if len(examples) < 8:
            examples.append({"prompt": item.prompt, "answer": item.answer, "completion": completion, "correct": ok})
    correct = sum(sum(v) for v in by_kind.values())
    return {
        "accuracy": correct / max(len(items), 1),
        "correct": correct,
        "total": len(items),
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "examples": examples,
    }


def render_report(report: dict) -> str:
    facts, val = report["facts"], report["validation"]
    lines = [
        f"# Quickstart report: {report['run_dir']}",
        "",
        f"- model: {report['model']['type']}, {report['model']['parameters']:,} parameters",
        f"- training: {report['training']['steps']} steps, {report['training']['tokens']:,} tokens, "
        f"{report['training']['seconds']:.0f} s of training ({report['total_seconds']:.0f} s in all)",
        f"- validation loss: {val['loss']:.3f} nats/token, {val['bpb']:.3f} bits/byte "
        f"(unigram baseline {val['unigram_bpb']:.3f} bits/byte)",
        f"- held-out facts completed correctly (greedy): {facts['correct']}/{facts['total']} = {facts['accuracy']:.1%}",
    ]
    lines += [f"  - {kind}: {share:.1%}" for kind, share in facts["by_kind"].items()]
    lines += ["", "## Held-out facts (first few)", ""]
    lines += [f"- {'✓' if e['correct'] else '✗'} `{e['prompt']}` → `{e['completion'].strip()[:40]}` (answer `{e['answer']}`)" for e in facts["examples"]]
    lines += ["", "## Samples (temperature 0.8, seed 0)", ""]
    lines += [f"- `{s['prompt']}` → {s['text']!r}" for s in report["samples"]]
    lines += ["", "The loss curve is in loss.png; every logged step is in metrics.jsonl.", ""]
    return "\n".join(lines)


def quickstart(out_dir: str | Path, config_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Run the whole foundation and write report.json / report.md into ``out_dir``."""
    from tinylm.data import builtin
    from tinylm.infer.engine import Engine, SamplingSettings
    from tinylm.train.recipes import evaluator, pretrain, unigram_bpb

    started = time.perf_counter()
    cfg = load_config(PretrainConfig, config_path, overrides)
    run_dir = Path(out_dir)
    final, result = pretrain(cfg, run_dir, resume=True)
    if result.interrupted:
        raise SystemExit(130)

    from tinylm.data.text import load_shard_info

    info = load_shard_info(run_dir / "data" / "shards")
    engine = Engine.from_dir(final, device=cfg.train.device)
    validation = evaluator(info.val_bin, info.meta, cfg.train.seq_len, cfg.train.eval_batches, info.dtype)(engine.model)
    world = builtin.World(cfg.data.builtin_seed)
    facts = evaluate_facts(engine, builtin.heldout_facts(world))
    sample_settings = SamplingSettings(max_new_tokens=48, temperature=0.8, top_k=50, seed=0)
    samples = [{"prompt": p, "text": engine.complete([p], sample_settings)[0]} for p in SAMPLE_PROMPTS]
    report = {
        "run_dir": str(run_dir),
        "model": {"type": engine.model.config.model_type, "parameters": engine.model.num_parameters()},
        "training": {"steps": result.step, "tokens": result.tokens, "seconds": result.elapsed_s},
        "validation": {
            "loss": validation["val_loss"],
            "bpb": validation["val_bpb"],
            "unigram_bpb": unigram_bpb(info.train_bin, info.val_bin, info.meta, engine.model.config.vocab_size, info.dtype),
        },
        "facts": facts,
        "samples": samples,
        "total_seconds": time.perf_counter() - started,
    }
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    text = render_report(report)
    atomic_write_text(run_dir / "report.md", text)
    print(text)
    return report
