"""Configs: YAML + dotted overrides, checked key by key."""

from pathlib import Path

import pytest

from tinylm.config import ConfigError, load_config, parse_overrides, save_config
from tinylm.train.pretrain import PretrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load_with_overrides():
    cfg = load_config(
        PretrainConfig,
        str(CONFIGS / "cpu-tiny.yaml"),
        ["--train.max_steps=200", "--train.save_every=50", "--model.qk_norm=true"],
    )
    assert cfg.train.max_steps == 200 and cfg.train.save_every == 50
    assert cfg.model.model_type == "qwen3"
    small = load_config(PretrainConfig, str(CONFIGS / "minimind2-small.yaml"))
    assert small.model.hidden_size == 512 and small.model.num_hidden_layers == 8
    assert small.model.num_attention_heads == 8 and small.model.num_key_value_heads == 2
    assert 25e6 < small.model.num_parameters() < 27e6


def test_overrides_parse_yaml_values():
    assert parse_overrides(["--data.files=[a.txt, b.jsonl]", "--train.compile=false"]) == {
        "train": {"compile": False},
        "data": {"files": ["a.txt", "b.jsonl"]},
    }
    cfg = load_config(PretrainConfig, None, ["--train.lr=3e-4", "--train.min_lr_ratio=1"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.min_lr_ratio, float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.max_stepz=5"], "unknown key 'max_stepz'"),
        (["--train.lr=fast"], r"train\.lr: expected float"),
        (["--train.max_steps=1.5"], r"train\.max_steps: expected int"),
        (["--train.compile=1"], r"train\.compile: expected true or false"),
        (["train.lr=1"], "expected --section.key=value"),
        (["--model.num_key_value_heads=3"], "multiple of"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, str(CONFIGS / "cpu-tiny.yaml"), overrides)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(PretrainConfig, path)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(PretrainConfig, str(CONFIGS / "cpu-tiny.yaml"), ["--train.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(PretrainConfig, tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.log_every=0", r"train: log_every: expected an integer >= 1, got 0"),
        ("--train.grad_accum=0", r"grad_accum: expected an integer >= 1"),
        ("--train.lr=0", r"lr: expected a number > 0"),
        ("--train.beta2=1.5", r"beta2: expected a number in \[0, 1\]"),
        ("--train.precision=fp16", r"precision: expected auto, fp32 or bf16"),
    ],
)
def test_out_of_range_training_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, CONFIGS / "cpu-tiny.yaml", [override])
