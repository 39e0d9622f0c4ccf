"""Training on little text: a time budget that ends on time with the schedule complete, the best
evaluation kept as the model, early stopping, dropout, a validation set of one's own, and sizing."""

import json
import time

import pytest
import torch
from conftest import read_metrics
from train_worker import make_task, train_config

from tinylm.cli import main
from tinylm.data.text import build_token_shards, load_shard_info
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.tokenizer import train_tokenizer
from tinylm.train import checkpoint as ckpt
from tinylm.train import distributed
from tinylm.train.sizing import shape, vocabulary
from tinylm.train.trainer import fit


def scripted_evaluation(losses):
    """An evaluation that reports the given validation losses in turn."""
    calls = iter(losses)
    return lambda model: {"val_loss": next(calls)}


def test_keep_best_ends_with_the_weights_of_the_best_evaluation(tmp_path):
    task = make_task(4)
    task.evaluate = scripted_evaluation([3.0, 1.0, 2.0, 4.0])
    snapshots = {}

    def keep(step, _):
        snapshots[step] = {k: v.clone() for k, v in task.model.state_dict().items()}

    cfg = train_config(max_steps=20, eval_every=5, keep_best=True)
    result = fit(task, cfg, tmp_path, distributed.setup("cpu"), callbacks=[keep])
    assert result.best["step"] == 10 and result.best["val_loss"] == 1.0 and result.step == 20
    final = task.model.state_dict()
    assert all(torch.equal(final[k], snapshots[10][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[20][k]) for k in final)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 10
    latest = ckpt.latest_checkpoint(tmp_path)  # the checkpoint stays the last step's, for --resume
    assert json.loads((latest / "trainer.json").read_text())["best"]["step"] == 10


def test_patience_stops_early_and_keeps_the_best(tmp_path):
    task = make_task(4)
    task.evaluate = scripted_evaluation([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    cfg = train_config(max_steps=30, eval_every=5, patience=2)
    result = fit(task, cfg, tmp_path, distributed.setup("cpu"))
    assert result.stopped_early and result.step == 20 and result.best["step"] == 10
    evaluations = [r for r in read_metrics(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [5, 10, 15, 20] and evaluations[-1]["stopped_early"]
    # a resumed run that had stopped early stays stopped
    again = make_task(4)
    again.evaluate = scripted_evaluation([9.0])
    assert fit(again, cfg, tmp_path, distributed.setup("cpu"), resume=True).step == 20


def test_keep_best_needs_a_validation(tmp_path):
    with pytest.raises(ValueError, match="no validation"):
        fit(make_task(4), train_config(keep_best=True), tmp_path, distributed.setup("cpu"))


def test_a_time_budget_ends_on_time_with_the_schedule_complete(tmp_path):
    budget_s = 4.0
    task = make_task(4)
    task.evaluate = lambda model: {"val_loss": 1.0}
    ended = []
    cfg = train_config(max_minutes=budget_s / 60, max_steps=1, eval_every=50, save_every=100, lr=1e-2)
    began = time.perf_counter()
    result = fit(
        task, cfg, tmp_path, distributed.setup("cpu"), callbacks=[lambda step, _: ended.append(time.perf_counter())]
    )
    took = ended[-1] - began
    assert result.step > 20 and not result.interrupted  # max_steps does not apply under a budget
    assert abs(took - budget_s) <= 0.1 * budget_s, f"a {budget_s} s budget took {took:.2f} s"
    lrs = [r["lr"] for r in read_metrics(tmp_path) if "lr" in r]
    floor = cfg.lr * cfg.min_lr_ratio
    assert lrs[-1] - floor <= 0.05 * (cfg.lr - floor)  # decayed to (within 5% of) the floor
    assert max(lrs) == pytest.approx(cfg.lr, rel=0.05)
    assert [r["step"] for r in read_metrics(tmp_path) if "val_loss" in r][-1] == result.step  # evaluated at the end


def test_dropout_trains_noisy_and_evaluates_exactly():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    plain = CausalLM(config)
    dropped = CausalLM(ModelConfig(**{**config.__dict__, "hidden_dropout": 0.3, "attention_dropout": 0.3}))
    dropped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (2, 12))
    dropped.train()
    assert not torch.equal(dropped(ids), dropped(ids))
    dropped.eval()
    plain.eval()
    assert torch.equal(dropped(ids), plain(ids))
    hf = dropped.config.to_hf_dict()
    assert hf["attention_dropout"] == 0.3 and ModelConfig.from_hf_dict(hf).hidden_dropout == 0.3
    with pytest.raises(ValueError, match="hidden_dropout"):
        ModelConfig(hidden_dropout=1.0)


def test_validation_files_are_the_validation_set(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n\n".join(f"the cat sat {i} times." for i in range(50)), encoding="utf-8")
    val.write_text("a dog ran.\n\nthe bird sang.", encoding="utf-8")
    tokenizer = train_tokenizer(["the cat sat on the mat, a dog ran, the bird sang."] * 20, 300)
    build_token_shards([train], tokenizer, tmp_path / "shards", val_paths=[val])
    info = load_shard_info(tmp_path / "shards")
    assert info.meta["train_docs"] == 50 and info.meta["val_docs"] == 2
    assert info.meta["val_bytes"] == len("a dog ran.") + len("the bird sang.")


def test_sizing_vocabulary_and_depth_knob():
    assert vocabulary(944_426) == 2048 and vocabulary(100) == 512 and vocabulary(10**10) == 16384
    assert shape(4, 2048).hidden_size == 128 and shape(4, 2048).num_hidden_layers == 4


def test_pretrain_sized_to_the_text_and_the_minutes(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("\n\n".join(f"Once upon a time, fox number {i} met {i % 7} dogs." for i in range(400)), "utf-8")
    run = tmp_path / "run"
    code = main(["pretrain", "--data", str(text), "--minutes", "0.05", "--out", str(run), "--train.progress=false"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "sized to the data and the budget" in err and "a 512-token vocabulary" in err
    saved = json.loads((run / "final" / "config.json").read_text())
    chosen = (run / "config.yaml").read_text()
    assert "keep_best: true" in chosen and "max_minutes: 0.05" in chosen and "optimizer: muon" in chosen
    assert saved["num_hidden_layers"] >= 2 and (run / "best" / "best.json").is_file()


def test_the_quickstart_takes_a_time_budget_for_each_stage(monkeypatch, tmp_path):
    import tinylm.quickstart as qs
    from tinylm.config import load_config
    from tinylm.train.pretrain import PretrainConfig
    from tinylm.train.sft import SFTConfig

    seen = {}
    monkeypatch.setattr(qs, "quickstart", lambda out, config, overrides, sft_overrides: seen.update(locals()))
    argv = ["quickstart", "--out", str(tmp_path), "--train.max_minutes=3", "--sft.train.max_minutes=2"]
    assert main(argv) == 0
    assert load_config(PretrainConfig, seen["config"], seen["overrides"]).train.max_minutes == 3
    assert load_config(SFTConfig, qs.SFT_CONFIG, seen["sft_overrides"]).train.max_minutes == 2
