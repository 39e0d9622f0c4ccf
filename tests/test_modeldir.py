"""Model directories: exact round trips, manifest checks, atomic replacement."""

import json
import os

import pytest
import torch

from tinylm.io import DataError, atomic_directory
from tinylm.model.llama import CausalLM, ModelConfig
from tinylm.modeldir import ModelDirError, load_model_dir, save_model_dir


def tiny_model(**kw):
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **kw))


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_exact(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    save_model_dir(model, tmp_path / "m")
    loaded, tokenizer = load_model_dir(tmp_path / "m")
    assert tokenizer is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == 0


def test_corrupted_file_is_named(tmp_path):
    save_model_dir(tiny_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"model\.safetensors: failed its SHA-256 check"):
        load_model_dir(tmp_path / "m")


def test_truncated_file_is_named(tmp_path):
    save_model_dir(tiny_model(), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text()[:20])
    with pytest.raises(DataError, match=r"config\.json: failed its SHA-256 check"):
        load_model_dir(tmp_path / "m")


def test_missing_directory_and_wrong_weights(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        load_model_dir(tmp_path / "nowhere")
    save_model_dir(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "SHA256SUMS").unlink()  # a hand-edited directory without manifest
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="missing"):
        load_model_dir(tmp_path / "m")


def test_failed_save_keeps_the_previous_directory(tmp_path):
    save_model_dir(tiny_model(), tmp_path / "m")
    before = (tmp_path / "m" / "SHA256SUMS").read_text()
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "m") as scratch:
            (scratch / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert (tmp_path / "m" / "SHA256SUMS").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    load_model_dir(tmp_path / "m")


def test_cli_reports_corruption_without_traceback(tmp_path, capsys):
    from tinylm.cli import main

    save_model_dir(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"broken")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: failed its SHA-256 check" in err and "Traceback" not in err


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    from tinylm.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as scratch:
            (scratch / "f").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
