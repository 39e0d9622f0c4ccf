"""train.optimizer: muon: the orthogonalized update, which parameters get it, learning, exact resume."""

import math
import os
import signal

import pytest
import torch
from conftest import read_metrics
from train_worker import make_task, train_config

from tinylm.config import ConfigError, TrainConfig
from tinylm.train import distributed
from tinylm.train.optim import MuonAdamW, build_optimizer, orthogonalize, param_groups
from tinylm.train.trainer import fit


def test_orthogonalize_evens_out_the_singular_values_and_keeps_the_directions():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48))
    v, _ = torch.linalg.qr(torch.randn(96, 48))
    spread = torch.logspace(0, -2, 48)  # singular values from 1 down to 0.01
    g = u @ torch.diag(spread) @ v.T
    for matrix in (g, g.T):  # wide and tall
        out = orthogonalize(matrix)
        s = torch.linalg.svdvals(out)
        assert s.max() < 1.25 and s.min() > 0.5, s  # all near 1, not spread over two decades
        left, _, right = torch.linalg.svd(matrix, full_matrices=False)
        polar = left @ right  # U·Vᵀ, the exact answer
        cosine = (out * polar).sum() / (out.norm() * polar.norm())
        assert cosine > 0.97


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = make_task(1).model
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, hidden = param_groups(model, 0.1, muon=True)
    assert hidden["muon"] and hidden["weight_decay"] == 0.1
    assert hidden["params"] and all(names[id(p)].endswith("proj.weight") for p in hidden["params"])
    assert not decay["params"]  # the lm_head is tied to the embeddings here
    assert all(p.ndim == 1 or "embed" in names[id(p)] for p in no_decay["params"])
    assert len(hidden["params"]) + len(no_decay["params"]) == len(names)
    with pytest.raises(ConfigError, match="optimizer: expected adamw or muon"):
        TrainConfig(optimizer="sgd")


def test_its_adamw_groups_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(8, 4), torch.randn(4)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    ours_opt = MuonAdamW([{"params": ours, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), fused=True)
    theirs_opt = torch.optim.AdamW([{"params": theirs, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), fused=True)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_muon_step_has_the_root_mean_square_size_of_a_typical_adamw_step():
    weight = torch.zeros(32, 64, requires_grad=True)
    weight.grad = torch.randn(32, 64)
    MuonAdamW([{"params": [weight], "muon": True}], lr=1e-2, betas=(0.9, 0.95)).step()
    rms = weight.detach().pow(2).mean().sqrt().item()
    assert 0.1 * 1e-2 < rms < 0.3 * 1e-2  # about 0.2 · lr, whatever the matrix's shape


def test_muon_learns(tmp_path):
    task = make_task(batch_size=8)
    cfg = train_config(max_steps=60, save_every=0, optimizer="muon")
    assert isinstance(build_optimizer(task.model, cfg, torch.device("cpu"))[0], MuonAdamW)
    fit(task, cfg, tmp_path, distributed.setup("cpu"))
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert losses[0] > math.log(48) - 0.5 and losses[-1] < 1.0


def test_muon_resumes_bit_identically(tmp_path):
    def ctrl_c(step, _):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = train_config(optimizer="muon")
    fit(make_task(4), cfg, tmp_path / "stopped", distributed.setup("cpu"), callbacks=[ctrl_c])
    resumed = make_task(4)
    fit(resumed, cfg, tmp_path / "stopped", distributed.setup("cpu"), resume=True)
    straight = make_task(4)
    fit(straight, cfg, tmp_path / "straight", distributed.setup("cpu"))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
