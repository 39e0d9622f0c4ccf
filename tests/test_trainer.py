"""The one training loop: learning, schedules, checkpoints, resume after kill -9, DDP, Ctrl-C."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file
from train_worker import make_task, train_config

from tinylm.train import checkpoint as ckpt
from tinylm.train import distributed
from tinylm.train.optim import lr_lambda, param_groups
from tinylm.train.trainer import fit

WORKER = Path(__file__).with_name("train_worker.py")


def run_worker(run_dir, mode, *pairs, torchrun=False):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        if torchrun
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, str(WORKER), str(run_dir), mode, *pairs], capture_output=True, text=True, env=env, timeout=300
    )


def test_loss_falls_and_metrics_are_logged(tmp_path):
    task = make_task(batch_size=8)
    result = fit(task, train_config(max_steps=60, save_every=0), tmp_path, distributed.setup("cpu"))
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] > math.log(48) - 0.5  # starts near uniform over the vocabulary
    assert losses[-1] < 1.0  # the repeating pattern is learned
    assert {"lr", "grad_norm", "tokens_per_s", "tokens"} <= set(records[-1])
    assert result.step == 60 and result.tokens == 60 * 8 * 16
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000060"]


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = train_config(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factor = lr_lambda(cfg)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(100) == pytest.approx(0.1)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))


def test_no_weight_decay_on_norms_embeddings_and_biases():
    model = make_task(1).model
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(n.endswith("proj.weight") for n in (names[id(p)] for p in decay["params"]))
    assert any("embed" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_worker(straight, "plain").returncode == 0
    died = run_worker(killed, "kill-at-13")
    assert died.returncode == -9, died.stderr
    assert [p.name for p in ckpt.list_checkpoints(killed)] == ["step-000005", "step-000010"]
    resumed = run_worker(killed, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-000010" in resumed.stderr
    a, b = load_file(straight / "weights.safetensors"), load_file(killed / "weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(killed)]
    assert steps == list(range(1, 21))  # records after the checkpoint were replaced, not duplicated


def test_pretraining_resume_after_kill_9_is_bit_identical(tmp_path):
    """The same through the real recipe: token shards, packed windows and their data position."""
    corpus = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"body": f"Story {i}: the fox met {i % 7} dogs. 狐狸遇到了{i % 5}只狗。"}, ensure_ascii=False)
        for i in range(200)
    ]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_worker(straight, "pretrain", str(corpus)).returncode == 0
    died = run_worker(killed, "pretrain-kill-at-8", str(corpus))
    assert died.returncode == -9 and [p.name for p in ckpt.list_checkpoints(killed)] == ["step-000005"]
    resumed = run_worker(killed, "pretrain-resume", str(corpus))
    assert resumed.returncode == 0 and "step-000005" in resumed.stderr, resumed.stderr
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_stops_after_the_step_and_resumes_bit_identically(tmp_path):
    def ctrl_c(step, _):
        if step == 7:  # the signal arrives while step 7 is being wrapped up; the loop stops there
            os.kill(os.getpid(), signal.SIGINT)

    result = fit(make_task(4), train_config(), tmp_path / "stopped", distributed.setup("cpu"), callbacks=[ctrl_c])
    assert result.interrupted and result.step == 7
    assert ckpt.latest_checkpoint(tmp_path / "stopped").name == "step-000007"
    resumed = make_task(4)
    fit(resumed, train_config(), tmp_path / "stopped", distributed.setup("cpu"), resume=True)
    straight = make_task(4)
    fit(straight, train_config(), tmp_path / "straight", distributed.setup("cpu"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_ctrl_c_quits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    def ctrl_c_twice(step, _):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a process started in the background
    result = fit(make_task(4), train_config(), tmp_path, distributed.setup("cpu"), callbacks=[ctrl_c_twice])
    assert result.interrupted and result.step == 7
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000005"]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers were put back


def test_a_new_run_refuses_a_directory_holding_another(tmp_path):
    fit(make_task(4), train_config(max_steps=5), tmp_path, distributed.setup("cpu"))
    with pytest.raises(ValueError, match=r"already holds a training run.*--resume"):
        fit(make_task(4), train_config(max_steps=5), tmp_path, distributed.setup("cpu"))


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    fit(make_task(4), train_config(max_steps=5), tmp_path, distributed.setup("cpu"))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fit(make_task(4), train_config(max_steps=10), tmp_path, distributed.setup("cpu"), resume=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000005"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_corrupted_newest_checkpoint_falls_back(tmp_path, capsys):
    fit(make_task(4), train_config(max_steps=10), tmp_path, distributed.setup("cpu"))
    (tmp_path / "checkpoints" / "step-000010" / "optimizer.safetensors").write_bytes(b"torn")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000005"
    assert "skipping checkpoint step-000010" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "per_process", [("batch_size=4", "grad_accum=1"), ("batch_size=2", "grad_accum=2")], ids=["ddp", "ddp+accumulation"]
)
def test_ddp_on_two_cpu_processes_matches_gradient_accumulation(tmp_path, per_process):
    """8 windows per step either way: one process with 2 micro-batches of 4, or 2 processes with
    per_process (with accumulation, the first micro-batch's backward runs under no_sync)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = run_worker(single, "plain", "batch_size=4", "grad_accum=2", "max_steps=8")
    assert one.returncode == 0, one.stderr
    two = run_worker(ddp, "plain", *per_process, "max_steps=8", torchrun=True)
    assert two.returncode == 0, two.stderr
    a, b = load_file(single / "weights.safetensors"), load_file(ddp / "weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    moved = max((a[k] - make_task(1).model.state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the comparison is not between two untrained models


def test_loss_plot_of_a_chinese_run_name_draws_without_glyph_warnings(tmp_path):
    import warnings

    from tinylm.train.metrics import MetricsLog, plot_losses

    run = tmp_path / "西游记-10min"
    run.mkdir()
    log = MetricsLog(run / "metrics.jsonl")
    for step in range(1, 4):
        log.write({"step": step, "loss": 3.0 / step})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph would warn
        assert plot_losses(run / "metrics.jsonl", run / "loss.png") == run / "loss.png"
    assert (run / "loss.png").stat().st_size > 1000
