"""Hub ids wherever a model directory goes (tinylm.hub.models), offline, against a Hugging Face cache laid
out exactly as huggingface_hub writes one (conftest.add_hub_commit: blobs named by their content
address, snapshots of links to them, refs, tree listings)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import add_hub_commit, files_of, offline_hub, tiny_chat_dir, tiny_clip_tower
from huggingface_hub import constants

from tinylm.cli import build_parser, main
from tinylm.cli.parsing import pin_revision
from tinylm.cli.training_args import flag_overrides, is_model
from tinylm.hub import models
from tinylm.hub.models import MODEL_FILES, NEVER_FILES, HubError, resolve_model, with_revision
from tinylm.modeldir import load, load_model_dir, merge_adapter_dir
from tinylm.serve.app import served_name

ROOT = Path(__file__).resolve().parents[1]
REPO = "tinylm-test/tiny-chat"
LICENSE = "---\nlicense: llama3.2\n---\n\n# the v2 model\n"  # the v2 commit's card: a license its fine-tunes keep


def same_weights(a, b) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items()
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two tiny chat models: the repo's main branch (seed 0) and its branch v2 (seed 1)."""
    root = tmp_path_factory.mktemp("models")
    return tiny_chat_dir(root / "main", seed=0), tiny_chat_dir(root / "v2", seed=1)


@pytest.fixture
def hub(tmp_path, monkeypatch, made):
    """A Hub cache holding REPO at main and at v2, huggingface_hub offline and pointed at it."""
    cache = offline_hub(monkeypatch, tmp_path / "hf-cache")
    main_dir, v2_dir = made
    main = add_hub_commit(cache, REPO, files_of(main_dir), refs=("main",))
    v2 = add_hub_commit(cache, REPO, {**files_of(v2_dir), "README.md": LICENSE.encode()}, refs=("v2",))
    return SimpleNamespace(cache=cache, main=main, v2=v2, v2_commit=v2.name, dirs=made)


def test_huggingface_hub_itself_resolves_the_cache_offline(hub):
    """The proof that the layout is huggingface_hub's: its own snapshot_download, in a fresh process
    that reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment, finds each revision's snapshot; and
    its tree listing names the pickle that MODEL_FILES leaves out, so without the patterns the snapshot
    is incomplete."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    script = (
        "import sys\nfrom huggingface_hub import snapshot_download\nfrom tinylm.hub.models import MODEL_FILES, "
        "NEVER_FILES\nfor rev in sys.argv[1:]:\n    print(snapshot_download("
        f"{REPO!r}, revision=rev, allow_patterns=MODEL_FILES, ignore_patterns=NEVER_FILES))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "main", "v2", hub.v2_commit],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert done.stdout.split() == [str(hub.main), str(hub.v2), str(hub.v2)]
    with pytest.raises(IncompleteSnapshotError, match=r"pytorch_model\.bin"):
        snapshot_download(REPO)


def test_a_hub_id_loads_as_its_directory_does_and_is_verified_once(hub, monkeypatch):
    assert resolve_model(REPO) == hub.main
    from_hub, local = load(REPO), load(hub.dirs[0])
    assert same_weights(from_hub.model, local.model)
    assert from_hub.tokenizer.fingerprint() == local.tokenizer.fingerprint()
    monkeypatch.setattr(models, "file_digest", None)  # a second resolution hashes nothing again
    assert resolve_model(REPO) == hub.main


def test_a_revision_is_a_branch_or_a_commit(hub):
    v2 = load_model_dir(f"{REPO}@v2")[0]
    assert same_weights(v2, load_model_dir(hub.dirs[1])[0])
    assert resolve_model(REPO, revision=hub.v2_commit) == hub.v2 == resolve_model(f"{REPO}@v2")
    assert not same_weights(v2, load_model_dir(REPO)[0])
    with pytest.raises(HubError, match="names revision 'v2' already, and --revision says 'main'"):
        with_revision(f"{REPO}@v2", "main")
    with pytest.raises(HubError, match="a local path, not a Hugging Face Hub id"):
        resolve_model(hub.dirs[0], revision="v2")


def generated(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main([*argv, "--prompt", "the cat", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    return capsys.readouterr().out


def test_the_command_line_takes_hub_ids_and_revisions(hub, capsys):
    main_dir, v2_dir = hub.dirs
    assert generated(["generate", REPO], capsys) == generated(["generate", str(main_dir)], capsys)
    assert generated(["generate", REPO, "--revision", "v2"], capsys) == generated(["generate", str(v2_dir)], capsys)
    assert main(["tokenizer", "encode", REPO, "the cat", "--ids-only"]) == 0
    assert capsys.readouterr().out.split()
    assert served_name(REPO, hub.main) == REPO and served_name(main_dir, main_dir) == "main"

    # a training command's --init is pinned before it becomes the config's init_from
    args, _ = build_parser().parse_known_args(["sft", "--init", REPO, "--revision", "v2", "--out", "x"])
    pin_revision(args)
    assert f"--init_from={REPO}@v2" in flag_overrides(args)
    assert is_model(REPO) and not is_model("cpu-tiny") and not is_model("my-config")  # distill's --student


def test_a_corrupted_cache_is_named(hub, capsys):
    readme = (hub.main / "README.md").resolve()  # a Git file: its blob is named by its Git SHA-1
    readme.write_bytes(readme.read_bytes() + b"\nedited in the cache\n")
    with pytest.raises(HubError, match=r"README\.md: its Git blob SHA-1 is [0-9a-f]{40}, .* the cache is corrupted"):
        resolve_model(REPO)
    weights = (hub.v2 / "model.safetensors").resolve()  # an LFS file: named by its SHA-256
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["chat", REPO, "--revision", "v2"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: its SHA-256 is" in err and f"delete {weights}" in err and "Traceback" not in err


def test_offline_and_not_cached_is_one_clear_line(hub, capsys):
    assert main(["chat", "someone/not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: someone/not-cached: no such local directory, and the Hugging Face Hub model")
    assert "HF_HUB_OFFLINE is set" in err and "`hf download someone/not-cached`" in err and "Traceback" not in err
    assert main(["generate", REPO, "--revision", "v9", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "(revision v9) is not (completely) in the cache" in err and f"hf download {REPO} --revision v9" in err
    for path in ("./not-here", "runs/not/here"):  # shapes no Hub id has: paths, as before
        assert main(["chat", path]) == 2
        assert "no such model directory" in capsys.readouterr().err


def hub_error(monkeypatch, error_class, revision=None) -> str:
    """The message for huggingface_hub raising ``error_class`` (made without a server's response)."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise error_class.__new__(error_class)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(HubError) as caught:
        resolve_model("someone/model", revision)
    return str(caught.value)


def test_hub_errors_say_what_to_do(monkeypatch):
    from huggingface_hub import errors

    monkeypatch.setattr(models, "SNAPSHOTS", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    gated = hub_error(monkeypatch, errors.GatedRepoError)
    assert "gated" in gated and "https://huggingface.co/someone/model" in gated and "hf auth login" in gated
    assert "HF_TOKEN" in hub_error(monkeypatch, errors.RepositoryNotFoundError)
    assert "no revision 'v9'" in hub_error(monkeypatch, errors.RevisionNotFoundError, "v9")
    assert "the Hub cannot be reached" in hub_error(monkeypatch, errors.LocalEntryNotFoundError)


def test_only_model_files_are_fetched(monkeypatch):
    """What snapshot_download is asked for, and what those patterns keep of a repository's files: the
    same filter huggingface_hub applies."""
    from huggingface_hub.utils import filter_repo_objects

    repository = [
        *("config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors"),
        *("model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
        *("adapter_config.json", "adapter_model.safetensors", "1_Pooling/config.json", "vocab.txt", "SHA256SUMS"),
        "README.md",
    ]
    others = [
        *(".gitattributes", "pytorch_model.bin", "adapter_model.bin", "training_args.bin", "optimizer.pt"),
        *("rng_state.pth", "model.ckpt", "data.pkl", "model.gguf", "onnx/model.onnx", "onnx/model.safetensors"),
        *("tf_model.h5", "flax_model.msgpack", "consolidated.safetensors", "modeling_custom.py"),
    ]
    kept = list(filter_repo_objects(repository + others, allow_patterns=MODEL_FILES, ignore_patterns=NEVER_FILES))
    assert kept == repository

    import huggingface_hub

    asked = {}
    monkeypatch.setattr(models, "SNAPSHOTS", {})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.update(kw) or "/nowhere")
    resolve_model("someone/model@v1")
    assert asked == {"revision": "v1", "allow_patterns": MODEL_FILES, "ignore_patterns": NEVER_FILES}


def test_a_local_directory_wins_over_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hub.dirs[1], tmp_path / REPO)  # v2's weights, in a folder named as the id
    assert resolve_model(REPO) == Path(REPO)
    assert same_weights(load_model_dir(REPO)[0], load_model_dir(hub.dirs[1])[0])
    with pytest.raises(HubError, match="a local path"):
        with_revision(REPO, "v2")


def test_an_adapter_over_a_hub_base_names_it_as_peft_does(hub, tmp_path, capsys):
    """A LoRA run from a Hub id writes the id (not the cache's path) as the adapter's base, with the
    revision where PEFT keeps it, and the card names it; loading and merging the adapter find the base
    through the cache, and the merged model keeps the base's license."""
    from tinylm.model.lora import LoRAConfig, add_lora, merge_lora
    from tinylm.modelcard import read_card_metadata
    from tinylm.train.stage import save_final

    base = f"{REPO}@v2"
    model, tokenizer = load_model_dir(base)
    lora = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    add_lora(model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_final(model, tokenizer, tmp_path / "adapter", lora, base)
    peft = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (peft["base_model_name_or_path"], peft["revision"]) == (REPO, "v2")
    meta = read_card_metadata(tmp_path / "adapter")
    assert meta["base_model"] == REPO and meta["license"] == "llama3.2"

    merged = load_model_dir(tmp_path / "adapter")[0]
    assert same_weights(merged, merge_lora(model).eval())
    merge_adapter_dir(tmp_path / "adapter", tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert read_card_metadata(tmp_path / "merged")["base_model"] == REPO and f"`{base}`" in card


def test_a_vision_tower_by_hub_id_keeps_its_image_processor(hub, made):
    """``--vision ORG/NAME``: the tower and its preprocessor_config.json (CLIP's normalisation, not the
    default's) both come from the cached snapshot."""
    transformers = pytest.importorskip("transformers")
    from tinylm.train.vlm import VLMStageConfig, build_model

    tower = tiny_clip_tower(hub.cache.parent / "clip")
    add_hub_commit(hub.cache, "tinylm-test/clip-tower", files_of(tower), refs=("main",))
    cfg = VLMStageConfig(init_from=str(made[0]))
    cfg.vision.tower = "tinylm-test/clip-tower"
    model, _, processor = build_model(cfg, "pretrain")
    assert processor.mean == pytest.approx(transformers.CLIPImageProcessor().image_mean)
    assert model.vision_tower.config.image_size == 32
