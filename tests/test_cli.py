"""The command line as people use it: no abbreviations, defaults in --help, the shipped configs, the
tokenizer both ways, one-line errors that say what to do, and a run directory one run at a time."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from tinylm import __version__
from tinylm.cli import build_parser, main, resolve_config_path
from tinylm.config import ConfigError, load_config
from tinylm.io import DirectoryInUse, directory_lock
from tinylm.train.pretrain import PretrainConfig
from tinylm.train.sft import SFTConfig

TINY = [
    *TINY_MODEL,
    "--train.seq_len=32",
    "--train.batch_size=4",
    "--train.eval_every=0",
    "--train.eval_batches=2",
    "--train.progress=false",
    "--train.warmup_steps=1",
    "--train.save_every=0",
    "--train.device=cpu",
]


def test_no_abbreviated_options(capsys):
    """`--prompt` on chat is not silently `--prompts` (a file): it is refused by name."""
    assert main(["chat", "some/dir", "--prompt", "hi"]) == 2
    assert "unrecognized arguments: --prompt hi" in capsys.readouterr().err


def test_version_and_help_show_defaults_the_override_syntax_and_debugging(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.startswith(f"tinylm {__version__} (torch ")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: cpu-tiny;" in text and "--section.key=value" in text and "TINYLM_DEBUG=1" in text


def test_a_quickstart_prefix_says_which_stage_an_override_is_for(tmp_path, capsys):
    from tinylm.cli.training_args import split_overrides

    ours, rest = split_overrides(["--train.lr=0.1", "--sft.train.max_steps=5", "--sft.data.template=raw"], "sft")
    assert ours == ["--train.max_steps=5", "--data.template=raw"] and rest == ["--train.lr=0.1"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quickstart", "--help"])
    assert "--sft.train.max_steps=100" in " ".join(capsys.readouterr().out.split())
    # a language model given with --llm is not trained here: overrides for its training are a mistake
    code = main(["vlm", "quickstart", "--out", str(tmp_path / "v"), "--llm", str(tmp_path), "--llm.train.max_steps=3"])
    assert code == 2 and "--llm.* overrides set the language model this run trains" in capsys.readouterr().err


def test_configs_list_show_and_copy(tmp_path, capsys, monkeypatch):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    assert "cpu-tiny " in listed and "sft-cpu-tiny " in listed and "vlm-sft-cpu-tiny " in listed
    assert main(["configs", "show", "sft-cpu-tiny"]) == 0
    shown = capsys.readouterr().out
    assert "every key of SFTConfig" in shown and "  packing: true" in shown and "  max_steps: 500" in shown
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", "cpu-tiny"]) == 0
    assert (tmp_path / "cpu-tiny.yaml").read_text() == resolve_config_path("cpu-tiny").read_text()
    assert main(["configs", "copy", "cpu-tiny"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_a_config_path_that_is_not_here_is_the_shipped_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert resolve_config_path("configs/cpu-tiny.yaml") == resolve_config_path("cpu-tiny")
    assert "using the shipped cpu-tiny config" in capsys.readouterr().err
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cpu-tiny.yaml").write_text("model:\n  hidden_size: 64\n")
    assert resolve_config_path("configs/cpu-tiny.yaml") == Path("configs/cpu-tiny.yaml")  # a file here wins
    with pytest.raises(FileNotFoundError, match="not a shipped config"):
        resolve_config_path("configs/nothing-like-it.yaml")


def test_a_mistyped_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'max_step' \(did you mean 'max_steps'\?"):
        load_config(PretrainConfig, None, ["--train.max_step=3"])


def test_data_files_mean_files_and_contradictions_are_errors():
    assert load_config(PretrainConfig, None, ["--data.files=[a.txt]"]).data.source == "files"
    assert load_config(PretrainConfig, None, []).data.source == "builtin"
    assert load_config(SFTConfig, None, ["--data.files=[c.jsonl]"]).data.source == "files"
    with pytest.raises(ConfigError, match=r"files are given .* but source is builtin"):
        load_config(PretrainConfig, None, ["--data.source=builtin", "--data.files=[a.txt]"])
    with pytest.raises(ConfigError, match="source is files but no files are given"):
        load_config(PretrainConfig, None, ["--data.source=files"])
    assert load_config(SFTConfig, None, ["--data.builtin_reasoning=0.33"]).data.builtin_reasoning == 0.33
    with pytest.raises(ConfigError, match=r"data\.builtin_reasoning: expected a share between 0 and 1, got 3"):
        load_config(SFTConfig, None, ["--data.builtin_reasoning=3"])
    with pytest.raises(ConfigError, match=r"data\.builtin_reasoning shapes the built-in conversations"):
        load_config(SFTConfig, None, ["--data.files=[c.jsonl]", "--data.builtin_reasoning=0.33"])


def test_pretrain_takes_data_files_like_every_training_command(tmp_path):
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"The fox number {i} jumps over {i % 7} dogs. 狐狸跳过了{i % 5}只狗。"}) + "\n")
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(corpus), "--out", str(run), *TINY, "--train.max_steps=2"]) == 0
    saved = (run / "config.yaml").read_text()
    assert "source: files" in saved and str(corpus) in saved
    tokenizer = run / "tokenizer"
    other = tmp_path / "other"
    assert main(["pretrain", "--data", str(corpus), "--tokenizer", str(tokenizer), "--out", str(other), *TINY,
                 "--train.max_steps=1"]) == 0  # fmt: skip
    assert f"tokenizer: {tokenizer}" in (other / "config.yaml").read_text()
    assert not (other / "tokenizer").exists()  # the given tokenizer is used, none is trained


def test_tokenizer_encode_and_decode(tmp_path, capsys):
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", str(tmp_path / "tok"), "The cat. 猫。", "--ids-only"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids and all(i.isdigit() for i in ids)
    assert main(["tokenizer", "decode", str(tmp_path / "tok"), f"[{', '.join(ids)}]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "The cat. 猫。"
    pieces = [json.loads(line.split(maxsplit=1)[1]) for line in lines[1:]]
    assert len(pieces) == len(ids) and "".join(pieces).startswith("The cat.")
    assert main(["tokenizer", "decode", str(tmp_path / "tok"), "5", "x"]) == 2
    assert "expected integers" in capsys.readouterr().err


def test_errors_name_what_to_do(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # a Hub id, offline, not cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["chat", "Qwen/Qwen2.5-0.5B-Instruct"]) == 2
    err = capsys.readouterr().err
    assert "no such local directory, and the Hugging Face Hub model" in err and "hf download" in err
    assert "Traceback" not in err

    from tinylm.infer.chat import read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"fine\n" + "你好".encode("gbk") + b"\n")
    with pytest.raises(ValueError, match=r"prompts\.txt:2: byte 0xc4 at column 1 is not valid UTF-8"):
        read_prompts(prompts)

    import tinylm.cli as cli

    def oom(args, overrides):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "run", oom)
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory: lower train.batch_size") and "Tried to allocate" in err

    def bug(args, overrides):
        raise RuntimeError("an internal error")

    monkeypatch.setattr(cli, "run", bug)
    with pytest.raises(RuntimeError, match="an internal error"):  # a bug keeps its traceback
        main(["plot", str(tmp_path)])


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from tinylm.io import directory_lock
with directory_lock({path!r}):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_run_directory_is_used_by_one_run_at_a_time(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(root=str(Path(__file__).parents[1]), path=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryInUse, match=f"in use by process {holder.pid}"):
            with directory_lock(tmp_path):
                pass
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays, its lock does not
        holder.wait(timeout=10)
        assert (tmp_path / ".lock").exists()
        deadline = time.monotonic() + 10
        with directory_lock(tmp_path):
            assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        assert time.monotonic() < deadline
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    with directory_lock(tmp_path / "run"):
        assert main(["pretrain", "--out", str(tmp_path / "run"), *TINY, "--train.max_steps=1"]) == 2
    assert f"in use by process {os.getpid()}" in capsys.readouterr().err


def test_bf16_on_a_cpu_without_it_in_hardware_warns(monkeypatch):
    import warnings

    import torch

    from tinylm import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 is emulated there"):
        assert device.autocast_dtype("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device.autocast_dtype("bf16", cpu) is torch.bfloat16
        assert device.autocast_dtype("auto", cpu) is None  # fp32: measured faster at these sizes
