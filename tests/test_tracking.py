"""Watching a run: metrics mirrored to TensorBoard and (offline) Weights & Biases, benchmarks run at
every evaluation of a training run."""

import json

import pytest
from conftest import TRAIN, read_metrics

from tinylm.config import ConfigError, TrainConfig


def sft_run(base, chats, out, *extra):
    from tinylm.cli import main

    args = ["sft", "--init", str(base), "--data", str(chats), "--out", str(out), *TRAIN, "--train.max_steps=4"]
    assert main([*args, "--train.eval_every=2", "--train.log_every=1", *extra]) == 0


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(base_and_chats, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, base, chats = base_and_chats
    out = tmp_path / "run"
    sft_run(base, chats, out, "--train.report_to=tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [r for r in read_metrics(out) if "loss" in r]
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in losses] == [r["step"] for r in logged]
    assert [value for _, value in losses] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_wandb_runs_offline_without_a_network(base_and_chats, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, base, chats = base_and_chats
    out = tmp_path / "run"
    sft_run(base, chats, out, "--train.report_to=wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's records, ready for `wandb sync`
    run_id = (out / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)


def test_benchmarks_run_at_each_evaluation(base_and_chats, tmp_path):
    _, base, chats = base_and_chats
    text = tmp_path / "held_out.txt"
    text.write_text("What colour does Tom like? Tom likes red.\n", encoding="utf-8")
    arc = tmp_path / "bench" / "arc" / "ARC-Easy-Test.jsonl"
    arc.parent.mkdir(parents=True)
    item = {
        "question": {
            "stem": "What does Tom like?",
            "choices": [{"text": "red", "label": "A"}, {"text": "blue", "label": "B"}],
        },
        "answerKey": "A",
    }
    arc.write_text(json.dumps(item) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    sft_run(base, chats, out, f"--eval.tasks=[arc_easy,ppl:{text}]", f"--eval.data_dir={tmp_path / 'bench'}")
    evaluations = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for record in evaluations:
        assert record["arc_easy/acc"] in (0.0, 1.0) and record[f"ppl:{text}/bits_per_byte"] > 0


def test_a_misspelt_task_fails_before_training(base_and_chats, tmp_path, capsys):
    from tinylm.cli import main

    _, base, chats = base_and_chats
    args = ["sft", "--init", str(base), "--data", str(chats), "--out", str(tmp_path / "run"), *TRAIN]
    assert main([*args, "--eval.tasks=[mmluu]"]) == 2
    assert "unknown task 'mmluu': expected one of mmlu" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match="report_to: expected none, tensorboard, wandb"):
        TrainConfig(report_to="mlflow")
    assert TrainConfig(report_to="tensorboard,wandb").report_to == "tensorboard,wandb"
