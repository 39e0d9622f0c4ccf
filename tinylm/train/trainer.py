"""THE training loop. Every stage (pretraining, SFT, LoRA, DPO, distillation, VLM) runs through ``fit``;
stages differ only in the model, the batches and the objective they hand it.

One optimizer step:
    1. take ``grad_accum`` micro-batches and count their loss targets (summed over processes);
    2. forward + backward each, scaling its summed loss by 1 / (targets of the whole step);
    3. clip the gradient norm, step the optimizer (AdamW, or Muon: tinylm.train.optim), step the schedule;
    4. now and then: log, evaluate, checkpoint.

Under ``torchrun`` the processes share the work as ``train.strategy`` says: DDP (each holds the whole
model and averages gradients) or FSDP (the model is sharded in place: tinylm.train.sharding). Either
way ``fit`` ends with the trained model whole, on the main process, as ``FitResult.model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from tinylm.config import TrainConfig
from tinylm.device import autocast_dtype
from tinylm.train import checkpoint as ckpt
from tinylm.train.distributed import Distributed
from tinylm.train.metrics import MetricsLog, plot_losses
from tinylm.train.optim import build_optimizer
from tinylm.train.sharding import full_weights, gather_weights, gradient_sync, materialize, meta_copy, shard
from tinylm.train.tracking import Trackers


class Batches(Protocol):
    """An endless, resumable source of micro-batches (dicts of tensors)."""

    def next_batch(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Objective(Protocol):
    def count(self, batch: dict) -> int: ...
    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor: ...


@dataclass
class Task:
    """What one stage trains."""

    model: nn.Module
    batches: Batches
    objective: Objective
    evaluate: Callable[[nn.Module], dict] | None = None  # → {"val_loss": ..., ...}, run under no_grad
    tokens_per_batch: Callable[[dict], int] = lambda batch: batch["input_ids"].numel()


@dataclass
class FitResult:
    step: int
    tokens: int
    elapsed_s: float
    last_metrics: dict = field(default_factory=dict)
    interrupted: bool = False
    best: dict | None = None  # with keep_best or patience: the evaluation whose weights the model ends with
    stopped_early: bool = False
    # the trained model, whole: the one handed in, or (train.strategy fsdp) an unsharded copy on the
    # main process (the others keep their shards); the stage saves this one
    model: nn.Module | None = None


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Clock:
    """Wall-clock seconds a run has trained, carried across resumes, and the share of its time budget
    (``max_minutes``) they make."""

    def __init__(self, budget_s: float):
        self.budget_s, self.before, self.started = budget_s, 0.0, time.perf_counter()  # before: earlier sessions

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def fraction(self) -> float:
        return self.seconds() / self.budget_s if self.budget_s else 0.0


def fit(
    task: Task,
    cfg: TrainConfig,
    run_dir: str | Path,
    dist: Distributed,
    *,
    resume: bool = False,
    callbacks: list[Callable[[int, dict], None]] = (),
) -> FitResult:
    """Train ``task`` for ``cfg.max_steps`` optimizer steps (or ``cfg.max_minutes``), logging and
    checkpointing into ``run_dir``; with ``keep_best`` or ``patience``, the model ends with the weights
    of its best evaluation."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and (existing := ckpt.list_checkpoints(run_dir)):
        raise ValueError(
            f"{run_dir} already holds a training run (checkpoint {existing[-1].name}): "
            "pass --resume to continue it, or choose another output directory"
        )
    track_best = cfg.keep_best or cfg.patience > 0
    if track_best and task.evaluate is None:
        raise ValueError("train.keep_best and train.patience choose by validation loss, and this run has no validation")
    device, main = dist.device, dist.is_main
    model = task.model.to(device)
    model.train()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    sharded = cfg.strategy == "fsdp"
    if sharded:
        skeleton = meta_copy(model) if main else None  # the unsharded model's shape, to gather into at the end
        shard(model, cfg, device)
    budget = cfg.max_minutes * 60
    clock = Clock(budget)
    optimizer, scheduler = build_optimizer(model, cfg, device, time_used=clock.fraction)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)

    step, tokens, elapsed = 0, 0, 0.0
    best, evals_since_best, stopped_early = None, 0, False  # the best evaluation so far: {"step", "val_loss", ...}
    if resume and (path := ckpt.latest_checkpoint(run_dir)) is not None:
        if sharded and not ckpt.is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} was written by an unsharded run (train.strategy ddp): resume it with strategy ddp; "
                "a sharded run's checkpoints resume either way"
            )
        state = ckpt.load_checkpoint(path, model, optimizer, scheduler)
        task.batches.load_state_dict(state["data"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        clock.before = state.get("wall_s", elapsed)
        best, evals_since_best = state.get("best"), state.get("evals_since_best", 0)
        stopped_early = state.get("stopped_early", False)
        if main:
            print(f"resumed from {path} (step {step})", file=sys.stderr)
    elif resume and main:
        print(f"no checkpoint in {run_dir / 'checkpoints'}; starting from step 0", file=sys.stderr)
    clock.started = time.perf_counter()

    log.truncate_after(step)  # records after the checkpoint (or, starting afresh, all) are from an abandoned run
    log.trackers = Trackers(cfg.report_to, run_dir, dataclasses.asdict(cfg), start_step=step, enabled=main)
    data_state = task.batches.state_dict()  # the data position as of the last completed step
    train_model = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if dist.enabled and not sharded:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp = autocast_dtype(cfg.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext

    def save(at_step: int) -> float:
        """Write a checkpoint (the main process, or under FSDP every process its shards); return the
        seconds it took."""
        began = time.perf_counter()
        trainer_state = {
            "tokens": tokens,
            "elapsed_s": elapsed,
            "wall_s": clock.seconds(),
            "data": data_state,
            "best": best,
            "evals_since_best": evals_since_best,
            "stopped_early": stopped_early,
        }
        if sharded:  # every process writes its shards
            keep = cfg.keep_checkpoints
            ckpt.save_sharded_checkpoint(run_dir, at_step, model, optimizer, scheduler, trainer_state, dist, keep)
        elif main:
            ckpt.save_checkpoint(
                run_dir, at_step, model, optimizer, scheduler, trainer_state, keep=cfg.keep_checkpoints
            )
        dist.barrier()
        return time.perf_counter() - began

    def evaluate() -> dict:
        if task.evaluate is None:
            return {}
        model.eval()
        # sharded: every process holds the whole model while it evaluates, so an evaluation may generate
        # text, or run on the main process alone, without the others joining in
        with torch.no_grad(), autocast(), full_weights(model):
            metrics = task.evaluate(model)
        model.train()
        return metrics

    def running() -> bool:
        if stopped_early:
            return False
        return clock.seconds() < budget if budget else step < cfg.max_steps

    shown = {"disable": not (main and cfg.progress), "file": sys.stderr, "dynamic_ncols": True}
    if budget:  # the bar counts the budget's seconds
        bar = tqdm(total=round(budget), initial=min(round(clock.before), round(budget)), unit="s", **shown)
    else:
        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", **shown)
    last: dict = {}
    saved_step = step  # the step of the newest checkpoint (on resume: the one just loaded)
    interrupted = aborted = False
    window_tokens, window_start = 0, time.perf_counter()
    step_s, eval_s, save_s = 0.0, 0.0, 0.0  # wall times: a step (smoothed), the last evaluation and save
    with StopRequest(announce=main) as stop:
        try:
            while running():
                started = time.perf_counter()
                micro = [move(task.batches.next_batch(), device) for _ in range(cfg.grad_accum)]
                targets = dist.all_reduce_sum(sum(task.objective.count(b) for b in micro))
                loss_sum = torch.zeros((), device=device)
                for i, batch in enumerate(micro):
                    sync = i == len(micro) - 1 or not dist.enabled
                    gradient_sync(model, sync)  # FSDP: reduce-scatter on the last micro-batch only
                    ddp_local = not sync and not sharded
                    with train_model.no_sync() if ddp_local else contextlib.nullcontext(), autocast():
                        loss = task.objective(train_model, batch)
                    (loss * dist.world_size / max(targets, 1)).backward()
                    loss_sum += loss.detach()
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
                if isinstance(grad_norm, DTensor):  # sharded: the norm over every process's shards
                    grad_norm = grad_norm.full_tensor()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_tokens = int(dist.all_reduce_sum(sum(task.tokens_per_batch(b) for b in micro)))
                tokens += step_tokens
                data_state = task.batches.state_dict()
                window_tokens += step_tokens
                took = time.perf_counter() - started
                elapsed += took
                step_s = took if step_s == 0 else 0.9 * step_s + 0.1 * took
                if budget:  # the last step is the one after which another would overrun the budget
                    over = clock.seconds() + step_s + eval_s + save_s >= budget
                    final_step = bool(dist.all_reduce_sum(int(over))) if dist.enabled else over
                else:
                    final_step = step >= cfg.max_steps

                if step % cfg.log_every == 0 or final_step:
                    loss_value = dist.all_reduce_sum(loss_sum.item()) / max(targets, 1)
                    now = time.perf_counter()
                    last = {
                        "step": step,
                        "loss": loss_value,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens": tokens,
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "elapsed_s": round(elapsed, 3),
                    }
                    window_tokens, window_start = 0, now
                    last.update(objective_metrics(task.objective, dist))
                    log.write(last)
                    bar.set_postfix(
                        step=step, loss=f"{loss_value:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}", refresh=False
                    )
                if task.evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or final_step):
                    began = time.perf_counter()
                    metrics = {"step": step, **evaluate()}
                    eval_s = time.perf_counter() - began
                    if track_best:
                        best, evals_since_best = keep_if_best(
                            metrics, best, evals_since_best, run_dir, model, dist, sharded
                        )
                        out_of_patience = bool(cfg.patience) and evals_since_best >= cfg.patience and not final_step
                        if dist.enabled:  # every process stops after the same step
                            out_of_patience = bool(dist.all_reduce_sum(int(out_of_patience)))
                        if out_of_patience:
                            stopped_early = final_step = True
                            metrics["stopped_early"] = True
                    log.write(metrics)
                    last.update(metrics)
                    if main:
                        bar.write(
                            " ".join(
                                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                            ),
                            file=sys.stderr,
                        )
                if (cfg.save_every and step % cfg.save_every == 0) or final_step:
                    save_s = save(step)
                    saved_step = step
                bar.update(max(0, round(min(clock.seconds(), budget)) - bar.n) if budget else 1)
                for callback in callbacks:
                    callback(step, last)
                if final_step:
                    break
                # every process stops after the same step, so the checkpoint below is one consistent state
                if dist.all_reduce_sum(int(stop.requested)) if dist.enabled else stop.requested:
                    interrupted = True
                    break
            if interrupted and step > saved_step:
                bar.close()
                if main:
                    print(f"saving a checkpoint at step {step} (resume with --resume)", file=sys.stderr)
                save(step)
        except KeyboardInterrupt:  # a second Ctrl-C: quit now; the newest complete checkpoint stays as it was
            interrupted = aborted = True
            bar.close()
            if main:
                print(f"\naborted at step {step}; the newest complete checkpoint is step {saved_step}", file=sys.stderr)
        finally:
            bar.close()
            log.trackers.close()
            if main:
                plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png", title=run_dir.name)
    trained = model
    if sharded and not aborted:  # the main process gathers the shards into an unsharded copy
        weights = gather_weights(model)
        if main:
            trained = materialize(skeleton, weights)
    if track_best and not interrupted and best is not None:
        if not sharded:
            dist.barrier()  # the main process wrote the best weights; every process takes them
        if main or not sharded:
            ckpt.load_best(run_dir, trained)
        if main:
            ended = "stopped early" if stopped_early else "ended"
            print(
                f"the run {ended} at step {step}; the model keeps step {best['step']}, the lowest validation loss "
                f"({best['val_loss']:.4f}) of its evaluations",
                file=sys.stderr,
            )
    return FitResult(
        step=step,
        tokens=tokens,
        elapsed_s=elapsed,
        last_metrics=last,
        interrupted=interrupted,
        best=best,
        stopped_early=stopped_early,
        model=trained,
    )


def keep_if_best(metrics: dict, best: dict | None, evals_since_best: int, run_dir: Path, model, dist, sharded: bool):
    """(the best evaluation so far, evaluations since it) after ``metrics``; a new best's weights are
    saved beside the checkpoints (``checkpoint.save_best``)."""
    if "val_loss" not in metrics:
        raise ValueError("train.keep_best and train.patience choose by val_loss, and this stage's evaluation has none")
    if best is not None and metrics["val_loss"] >= best["val_loss"]:
        return best, evals_since_best + 1
    weights = trained_weights(model, sharded)  # (sharded: every process takes part; the main one gets them)
    if dist.is_main:
        ckpt.save_best(run_dir, weights, metrics)
    return dict(metrics), 0


def trained_weights(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The tensors training changes, on the CPU: gathered from every process's shards under FSDP (the
    main process gets them, the others {})."""
    if not sharded:
        return ckpt.checkpoint_state(model, trainable_only=True)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in gather_weights(model).items() if name in trained}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute the decoder layers' activations in the backward pass, in every language model inside
    ``model`` (a vision-language model's, a reward model's)."""
    from tinylm.model.llama import DecoderModel

    found = [m for m in model.modules() if isinstance(m, DecoderModel)]
    if not found:
        raise ValueError("train.activation_checkpointing: this model has no decoder layers to recompute")
    for decoder in found:
        decoder.activation_checkpointing = True


def objective_metrics(objective, dist: Distributed) -> dict:
    """What the objective adds up for the log (DPO: rewards, margin, accuracy), averaged over its
    "count" across every process since the last log; {} for objectives that keep nothing."""
    pop = getattr(objective, "pop_metrics", None)
    if pop is None:
        return {}
    sums = pop()
    count = dist.all_reduce_sum(sums.pop("count", 0))
    return {key: dist.all_reduce_sum(value) / max(count, 1) for key, value in sums.items()}


class StopRequest:
    """Ctrl-C or SIGTERM during training asks the loop to stop after the step in progress and save a
    checkpoint there, so weights, optimizer, data position and step always agree. A second Ctrl-C
    quits at once (the newest complete checkpoint is untouched: checkpoints are written aside and
    renamed). Outside the main thread signals cannot be caught, and nothing is installed."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested and self.announce:
            sys.stderr.write("\nstopping after this step to save a checkpoint (Ctrl-C again quits at once)\n")
        self.requested = True
