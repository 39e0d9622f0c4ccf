"""A tiny, self-contained training job for the trainer tests, also runnable as a script (kill -9 and
torchrun tests need a separate process): ``python tests/train_worker.py RUN_DIR MODE [KEY=VALUE ...]``.
Modes starting with "pretrain" run the real pretraining recipe instead (token shards, packed windows):
``python tests/train_worker.py RUN_DIR pretrain|pretrain-kill-at-8|pretrain-resume CORPUS.jsonl``."""

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylm.config import TrainConfig
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.train import distributed
from tinylm.train.objectives import NextTokenLoss, shift_window
from tinylm.train.trainer import Task, fit

VOCAB, SEQ = 48, 16


class ArrayBatches:
    """Windows cut from a fixed token stream, in a seeded order; rank r takes windows r, r+W, ..."""

    def __init__(self, batch_size, rank=0, world_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        period = torch.randint(0, VOCAB, (37,), generator=g)  # a repeating pattern: learnable
        stream = period.repeat(200)
        self.windows = stream[: (len(stream) // (SEQ + 1)) * (SEQ + 1)].view(-1, SEQ + 1)
        self.order = torch.randperm(len(self.windows), generator=g)
        self.batch_size, self.rank, self.world_size, self.cursor = batch_size, rank, world_size, 0

    def next_batch(self):
        picks = []
        for _ in range(self.batch_size):
            index = (self.cursor * self.world_size + self.rank) % len(self.order)
            picks.append(self.windows[self.order[index]])
            self.cursor += 1
        return shift_window(torch.stack(picks))

    def state_dict(self):  # the windows every process has taken together, so any number of them can resume
        return {"taken": self.cursor * self.world_size}

    def load_state_dict(self, state):
        self.cursor = state["taken"] // self.world_size


def make_task(batch_size, rank=0, world_size=1):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return Task(model=CausalLM(config), batches=ArrayBatches(batch_size, rank, world_size), objective=NextTokenLoss())


def validation_loss(model) -> dict:
    """The mean loss on 8 windows of another seed's stream (the same on every process)."""
    batch = shift_window(ArrayBatches(8, seed=1).windows[:8])
    return {"val_loss": model(batch["input_ids"], labels=batch["labels"]).item() / batch["labels"].numel()}


def train_config(**overrides):
    base = dict(
        max_steps=20,
        batch_size=4,
        seq_len=SEQ,
        lr=1e-2,
        warmup_steps=3,
        save_every=5,
        eval_every=0,
        log_every=1,
        progress=False,
        device="cpu",
        keep_checkpoints=10,
    )
    return TrainConfig(**{**base, **overrides})


PRETRAIN = [
    "--model.hidden_size=32",
    "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2",
    "--model.num_key_value_heads=1",
    "--data.source=files",
    "--data.text_field=body",
    "--data.vocab_size=300",
    "--train.seq_len=32",
    "--train.batch_size=4",
    "--train.max_steps=12",
    "--train.save_every=5",
    "--train.warmup_steps=2",
    "--train.eval_every=0",
    "--train.eval_batches=2",
    "--train.progress=false",
    "--train.device=cpu",
]


def pretrain_main(run_dir, mode, corpus):
    from tinylm.config import load_config
    from tinylm.train.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, None, [*PRETRAIN, f"--data.files=[{corpus}]"])
    callbacks = (
        [lambda step, _: step == 8 and os.kill(os.getpid(), signal.SIGKILL)] if mode == "pretrain-kill-at-8" else []
    )
    pretrain(cfg, run_dir, resume=mode == "pretrain-resume", callbacks=callbacks)


def value(text: str):
    """A KEY=VALUE override's value: an integer, true/false, or a word (strategy=fsdp)."""
    if text.lstrip("-").isdigit():
        return int(text)
    return {"true": True, "false": False}.get(text, text)


def main():
    run_dir, mode, *pairs = sys.argv[1:]
    if mode.startswith("pretrain"):
        return pretrain_main(run_dir, mode, *pairs)
    overrides = {k: value(v) for k, v in (p.split("=") for p in pairs)}
    cfg = train_config(**overrides)
    dist = distributed.setup("cpu")
    task = make_task(cfg.batch_size, dist.rank, dist.world_size)
    if cfg.keep_best:
        task.evaluate = validation_loss
    callbacks = []
    if mode == "kill-at-13":  # die like kill -9: no handler, no cleanup, no final save
        callbacks.append(lambda step, _: step == 13 and os.kill(os.getpid(), signal.SIGKILL))
    result = fit(task, cfg, run_dir, dist, resume=(mode == "resume"), callbacks=callbacks)
    if cfg.strategy == "fsdp":  # what this process holds of the weights: its shards
        held = sum(p.to_local().numel() * p.element_size() for p in task.model.parameters())
        Path(run_dir, f"held-by-rank-{dist.rank}.txt").write_text(str(held))
    if dist.is_main:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in result.model.state_dict().items() if k != "lm_head.weight"},
            Path(run_dir) / "weights.safetensors",
        )
    distributed.teardown()


if __name__ == "__main__":
    main()
