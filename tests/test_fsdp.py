"""train.strategy fsdp (tinylm.train.sharding) on CPU processes talking over gloo: the same training as
one process, exact resume after kill -9, checkpoints that resume with another number of processes,
and activation checkpointing (the same gradients for less memory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import run_worker
from test_vlm_training import TINY_VISION
from train_worker import make_task

from tinylm.model.llama import ModelConfig
from tinylm.train import checkpoint as ckpt
from tinylm.train.memory import Plan, estimate

pytestmark = pytest.mark.slow


def weights_gap(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "weights.safetensors"), load_file(b_dir / "weights.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def succeeded(process) -> None:
    assert process.returncode == 0, process.stderr[-3000:]


@pytest.mark.parametrize(
    "per_process",
    [("batch_size=4", "grad_accum=1"), ("batch_size=2", "grad_accum=2")],
    ids=["fsdp", "fsdp+accumulation"],
)
def test_fsdp_on_two_processes_trains_as_one_process_does(tmp_path, per_process):
    """8 windows per step either way; with accumulation the first micro-batch keeps its gradients local."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    succeeded(run_worker(single, "plain", "batch_size=4", "grad_accum=2", "max_steps=8"))
    succeeded(run_worker(sharded, "plain", *per_process, "max_steps=8", "strategy=fsdp", torchrun=True))
    assert len(losses(sharded)) == 8
    assert max(abs(a - b) for a, b in zip(losses(single), losses(sharded))) < 1e-5
    assert weights_gap(single, sharded) < 2e-5
    untrained = make_task(1).model.state_dict()
    trained = load_file(sharded / "weights.safetensors")
    assert max((trained[k] - untrained[k]).abs().max().item() for k in trained) > 1e-3  # it did train
    whole = sum(t.numel() * t.element_size() for t in make_task(1).model.parameters())
    held = [int((sharded / f"held-by-rank-{rank}.txt").read_text()) for rank in (0, 1)]
    assert all(abs(h - whole / 2) <= 0.02 * whole for h in held), (held, whole)  # each process half the weights
    checkpoint = ckpt.list_checkpoints(sharded)[-1]
    assert ckpt.is_sharded_checkpoint(checkpoint) and (checkpoint / ".metadata").is_file()
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_fsdp_resume_after_kill_9_is_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    two = ("batch_size=2", "strategy=fsdp")
    succeeded(run_worker(straight, "plain", *two, torchrun=True))
    died = run_worker(killed, "kill-at-13", *two, torchrun=True)
    assert died.returncode != 0
    assert [p.name for p in ckpt.list_checkpoints(killed)] == ["step-000005", "step-000010"]
    resumed = run_worker(killed, "resume", *two, torchrun=True)
    succeeded(resumed)
    assert "resumed from" in resumed.stderr and "step-000010" in resumed.stderr
    assert weights_gap(straight, killed) == 0.0
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 21)
    )


def test_a_sharded_checkpoint_resumes_with_another_number_of_processes(tmp_path):
    """Two processes of 4 windows, killed at step 13, go on as one process of 8 (sharded over one, and
    unsharded): they end where one process of 8 windows ends when never stopped."""
    single = tmp_path / "single"
    succeeded(run_worker(single, "plain", "batch_size=8"))
    for strategy in ("fsdp", "ddp"):
        run = tmp_path / f"then-{strategy}"
        assert run_worker(run, "kill-at-13", "batch_size=4", "strategy=fsdp", torchrun=True).returncode != 0
        resumed = run_worker(run, "resume", "batch_size=8", f"strategy={strategy}")
        succeeded(resumed)
        assert "step-000010" in resumed.stderr
        assert weights_gap(single, run) < 2e-5, strategy


def test_an_unsharded_checkpoint_does_not_resume_sharded(tmp_path):
    run = tmp_path / "run"
    assert run_worker(run, "kill-at-13").returncode == -9
    refused = run_worker(run, "resume", "strategy=fsdp")
    assert refused.returncode != 0
    assert "written by an unsharded run" in refused.stderr and "strategy ddp" in refused.stderr


def test_fsdp_keeps_the_best_evaluation_and_gathers_it(tmp_path):
    """keep_best under fsdp: the weights of the best evaluation are gathered from the shards, and the
    model fit returns (on the main process) holds them."""
    run = tmp_path / "run"
    best_of = ("batch_size=2", "strategy=fsdp", "keep_best=true", "eval_every=5")
    succeeded(run_worker(run, "plain", *best_of, torchrun=True))
    best = json.loads((run / "best" / "best.json").read_text())
    kept = load_file(run / "best" / "weights.safetensors")
    final = load_file(run / "weights.safetensors")
    assert best["step"] in (5, 10, 15, 20)
    assert all(torch.equal(kept[k], final[k]) for k in final)


def activation_run(checkpointing: bool) -> dict:
    """Forward and backward of a model whose activations dwarf its weights, in a fresh process:
    its gradients and its peak resident memory above what it held before the forward pass (VmHWM, the
    process's own high-water mark: getrusage's would start from the parent's, inherited across exec)."""
    script = f"""
import json, re, torch
from tinylm.model.llama import CausalLM, ModelConfig
def peak_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1])
torch.manual_seed(0)
config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, hidden_dropout=0.1)
model = CausalLM(config).train()
model.activation_checkpointing = {checkpointing}
ids = torch.randint(0, 256, (16, 512), generator=torch.Generator().manual_seed(1))
before = peak_kb()
model(ids, labels=ids).backward()
peak = peak_kb()
grads = {{n: p.grad.norm().item() for n, p in model.named_parameters()}}
print(json.dumps({{"extra_mb": (peak - before) / 1024, "grads": grads}}))
"""
    # glibc keeps big freed blocks in its heap, so the resident size would remember them; served by mmap
    # (a fixed threshold), they go back to the system when freed and the peak is what was really held
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from Linux's /proc")
def test_activation_checkpointing_gives_the_same_gradients_for_less_memory():
    plain, recomputed = activation_run(False), activation_run(True)
    assert plain["grads"].keys() == recomputed["grads"].keys()
    for name, norm in plain["grads"].items():  # dropout draws the same masks when a layer runs again
        assert recomputed["grads"][name] == pytest.approx(norm, rel=1e-4), name
    print(f"peak memory above the model: {plain['extra_mb']:.0f} MB, {recomputed['extra_mb']:.0f} MB recomputing")
    assert recomputed["extra_mb"] < 0.4 * plain["extra_mb"]  # measured: 946 MiB and 261 MiB
    # tinylm.train.memory's arithmetic (docs/scale.md's table) agrees with what was measured
    config = ModelConfig(
        vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4
    )
    for measured, checkpointing in ((plain, False), (recomputed, True)):
        plan = Plan("single", batch_size=16, seq_len=512, precision="fp32", activation_checkpointing=checkpointing)
        assert estimate(config, plan)["activations"] / 2**20 == pytest.approx(measured["extra_mb"], rel=0.2)


def test_fsdp_refuses_what_it_cannot_shard(tmp_path):
    refused = run_worker(tmp_path / "muon", "plain", "strategy=fsdp", "optimizer=muon")
    assert refused.returncode != 0 and "train.optimizer muon" in refused.stderr


# -- the training commands under fsdp --------------------------------------------------------------


def run_stage(stage: list[str], out, *settings, processes: int = 2) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    quick = ["--train.device=cpu", "--train.progress=false", "--train.eval_every=0", "--train.save_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *launcher, "-m", "tinylm.cli", *stage, "--out", str(out), *quick, *settings]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from conftest import tiny_chat_dir, write_jsonl

    root = tmp_path_factory.mktemp("fsdp-stages")
    chats = [
        {"messages": [{"role": "user", "content": f"{a} + {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
        for a in range(8)
        for b in range(8)
    ]
    write_jsonl(root / "chats.jsonl", chats)
    return tiny_chat_dir(root / "chat", max_len=128), root / "chats.jsonl"


def test_lora_sft_under_fsdp_trains_the_adapter_one_process_trains(tmp_path, chat_model):
    """The same 8 conversations per step: 2 processes × 4 sharded, or 1 process × 8."""
    model, chats = chat_model
    sft = ["sft", "--init", str(model), "--data", str(chats), "--lora"]
    common = ("--train.max_steps=4", "--train.seq_len=64", "--train.lr=0.01", "--train.precision=fp32")
    succeeded(run_stage(sft, tmp_path / "one", *common, "--train.batch_size=8", processes=1))
    sharded = run_stage(sft, tmp_path / "two", *common, "--train.batch_size=4", "--train.strategy=fsdp")
    succeeded(sharded)
    a = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3  # B moved from zero: it trained


def test_grpo_under_fsdp_samples_on_gathered_weights(tmp_path, chat_model):
    """Each process samples replies of its own lengths on the gathered policy (no collective may run
    there), then the update runs sharded; with LoRA the reference is the sharded model, adapter off."""
    model, _ = chat_model
    grpo = ["grpo", "--init", str(model), "--lora", "--grpo.group_size=2", "--grpo.max_new_tokens=12"]
    done = run_stage(grpo, tmp_path / "grpo", "--train.max_steps=2", "--train.batch_size=2", "--train.strategy=fsdp")
    succeeded(done)
    assert (tmp_path / "grpo" / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "grpo" / "grpo.json").read_text())["steps"] == 2


def test_fsdp_refuses_quantized_weights_and_cpu_offload_without_a_gpu(tmp_path, chat_model):
    model, chats = chat_model
    sft = ["sft", "--init", str(model), "--data", str(chats), "--train.max_steps=1", "--train.seq_len=64"]
    sft.append("--train.strategy=fsdp")
    qlora = run_stage([*sft, "--qlora"], tmp_path / "q", processes=1)
    assert qlora.returncode == 2 and "FSDP cannot split" in qlora.stderr and "Traceback" not in qlora.stderr
    offload = run_stage([*sft, "--train.cpu_offload=true"], tmp_path / "o", processes=1)
    assert offload.returncode == 2 and "leave cpu_offload off" in offload.stderr


MORE_STAGES = {  # (the command, its settings)
    "dpo": (["dpo"], ["--train.seq_len=64"]),  # a full fine-tune: each process holds a frozen copy as reference
    "rm": (["rm"], ["--train.seq_len=64"]),  # the score head sits in the root unit
    "vlm-pretrain": (  # AdamW: the quickstart config's Muon orthogonalises whole matrices, which fsdp splits
        ["vlm", "pretrain"],
        ["--train.seq_len=128", "--data.builtin_images=8", "--train.optimizer=adamw", *TINY_VISION],
    ),
}


@pytest.mark.parametrize("name", MORE_STAGES)
def test_more_commands_train_sharded(tmp_path, chat_model, name):
    model, _ = chat_model
    command, settings = MORE_STAGES[name]
    sharded = ("--train.max_steps=2", "--train.strategy=fsdp")
    succeeded(run_stage([*command, "--init", str(model)], tmp_path / "run", *settings, *sharded))
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    records = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in records if "loss" in r][-1] == 2
