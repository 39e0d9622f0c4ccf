import json
import random
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and on a busy machine threads that wait for each
# other make every small operation many times slower.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: the project must pass without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"realdata: {SHARED_DATA} is absent")
    return SHARED_DATA


# -- a tiny base model and conversations about who likes which colour (SFT, LoRA and DPO tests) --

TINY_MODEL = ["--model.hidden_size=32", "--model.num_hidden_layers=2", "--model.num_attention_heads=2", "--model.num_key_value_heads=1",
              "--data.vocab_size=300"]
TRAIN = ["--train.seq_len=64", "--train.batch_size=8", "--train.eval_every=20", "--train.eval_batches=2", "--train.progress=false",
         "--train.warmup_steps=2", "--train.save_every=0"]
NAMES = {"Tom": "red", "Ann": "blue", "Bob": "green", "小明": "黄色", "小红": "白色"}


@pytest.fixture(scope="session")
def base_and_chats(tmp_path_factory):
    """A tiny pretrained base model and a conversations file about who likes which colour."""
    from tinylm.cli import main

    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    chats, texts = root / "chats.jsonl", root / "text.jsonl"
    with open(chats, "w", encoding="utf-8") as c, open(texts, "w", encoding="utf-8") as t:
        for _ in range(300):
            name = rng.choice(list(NAMES))
            question, answer = f"What colour does {name} like?", f"{name} likes {NAMES[name]}."
            c.write(json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}, ensure_ascii=False) + "\n")
            t.write(json.dumps({"text": f"{question} {answer}"}, ensure_ascii=False) + "\n")
    base = root / "base"
    assert main(["pretrain", "--out", str(base), *TINY_MODEL, *TRAIN, "--train.max_steps=20", "--data.source=files", f"--data.files=[{texts}]"]) == 0
    return root, base / "final", chats
