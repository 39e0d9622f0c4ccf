"""The optimizer and the learning-rate schedule every stage trains with.

``train.optimizer: adamw`` (the default) steps every parameter with AdamW. ``train.optimizer: muon``
steps the matrices inside the blocks (attention and MLP projections) with Muon and the rest (embeddings,
an untied lm_head, norms, biases) with AdamW, as Muon's authors do.

Muon in one paragraph: take the momentum of the gradient, as SGD with Nesterov momentum would, but
before applying it replace the update matrix G = U·S·Vᵀ by (approximately) U·Vᵀ: every direction the
update moves in gets the same step size, so the rare directions that AdamW's update barely moves are
not drowned out by the few dominant ones. U·Vᵀ is reached without an SVD, by a few steps of a quintic
Newton-Schulz iteration that pushes every singular value towards 1. The step is scaled by
0.2·√max(rows, columns), which gives it the root-mean-square size of a typical AdamW step, so the
learning rate and weight decay tuned for AdamW carry over (as reported by Moonshot AI in "Muon is
Scalable for LLM Training", 2025).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.adamw import adamw

from tinylm.config import TrainConfig

# The quintic's coefficients: they maximise its slope at zero, so small singular values grow fastest,
# at the price of landing in roughly [0.7, 1.2] rather than exactly on 1 (Keller Jordan, Muon, 2024).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A weight matrix inside the blocks: not an embedding table and not the output layer."""
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict]:
    """Weight decay on matrix weights only: not on norms, biases or embeddings (nor a lm_head tied to
    them). With ``muon``, the hidden matrices form a group of their own, flagged ``muon``."""
    hidden, decay, no_decay, seen = [], [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if muon and is_hidden_matrix(name, param):
            hidden.append(param)
        elif param.ndim >= 2 and "embed" not in name:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if muon:
        groups.append({"params": hidden, "weight_decay": weight_decay, "muon": True})
    return groups


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U·Vᵀ for ``update`` = U·S·Vᵀ: scale so every singular value is at most 1, then
    iterate X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X, which maps each singular value s to a·s + b·s³ + c·s⁵."""
    x = update.to(dtype)
    wide = x.size(0) <= x.size(1)  # iterate on the smaller Gram matrix
    if not wide:
        x = x.T
    x = x / (x.norm() + 1e-7)  # the Frobenius norm bounds the largest singular value
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the parameter groups flagged ``muon``, AdamW for the others; one optimizer, so the
    schedule, checkpoints and resume treat it as they treat AdamW."""

    def __init__(
        self,
        groups: list[dict],
        *,
        lr: float,
        betas: tuple[float, float],
        momentum: float = 0.95,
        eps: float = 1e-8,
        fused: bool = False,
        ns_dtype: torch.dtype = torch.float32,
    ):
        defaults = {"lr": lr, "betas": betas, "momentum": momentum, "eps": eps, "weight_decay": 0.0, "muon": False}
        defaults["fused"] = fused  # read back by load_state_dict, which then puts the step counts on the device
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buffer, momentum)  # Nesterov: the gradient, plus the momentum once more
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(orthogonalize(update, dtype=self.ns_dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else None)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=group["fused"] or None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def lr_lambda(cfg: TrainConfig, time_used: Callable[[], float] | None = None) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps`` to the peak, then a cosine down to ``min_lr_ratio`` of it:
    over the steps up to ``max_steps``, or, with a time budget (``max_minutes``), over the budget's
    wall-clock time, ``time_used()`` being the fraction spent: the run then ends on time with its
    schedule complete, whatever its speed."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.max_minutes and time_used is not None:
            progress = min(1.0, time_used())
        else:
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def fused_adamw(device: torch.device) -> bool:
    """Use the one-kernel AdamW where torch has it: it reads and writes each parameter once per step
    instead of once per elementwise operation (on a CPU that is 2-3x less optimizer time)."""
    return device.type in ("cuda", "cpu")


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, time_used=None):
    """``cfg.optimizer`` over ``param_groups`` (AdamW fused where torch has it) and the warmup + cosine
    schedule."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        # bf16 Newton-Schulz on CUDA (as Muon's authors run it); fp32 elsewhere, where a CPU's bf16
        # matmuls may be many times slower than its fp32 ones
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        groups = param_groups(model, cfg.weight_decay, muon=True)
        optimizer = MuonAdamW(groups, lr=cfg.lr, betas=betas, fused=fused_adamw(device), ns_dtype=ns_dtype)
    else:
        groups = param_groups(model, cfg.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused_adamw(device))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, time_used))
