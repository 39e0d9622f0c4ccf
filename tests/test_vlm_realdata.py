"""Both VLM stages on the real samples in ../shared/data/vlm (skipped without it): COCO captions for
stage 1, LLaMA-Factory's and XTuner's image chats for stage 2."""

import json

import pytest
import torch
from conftest import TRAIN, logged
from test_vlm_training import TINY_VISION

from tinylm.cli import main
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings

pytestmark = pytest.mark.realdata


# the language model: the quickstart's shape (128 wide, 4 layers), trained on the captions' text
LLM = [
    "--model.hidden_size=128",
    "--model.num_hidden_layers=4",
    "--model.num_attention_heads=4",
    "--model.num_key_value_heads=2",
    "--data.vocab_size=1000",
    "--train.max_steps=100",
    "--train.lr=0.004",
]


@pytest.fixture(scope="module")
def coco_stage1(tmp_path_factory):
    """Stage 1 on coco-mini's 400 training captions (80 pictures, resized to the tiny tower's 32 px)."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"realdata: {SHARED_DATA} is absent")
    root = tmp_path_factory.mktemp("coco")
    annotations = SHARED_DATA / "vlm" / "coco-mini" / "annotations" / "captions_train2017.json"
    # a language model that has read the captions' words (as LLaVA's has read the web), frozen in stage 1
    texts = root / "captions.jsonl"
    captions = [a["caption"].strip() for a in json.loads(annotations.read_text(encoding="utf-8"))["annotations"]]
    texts.write_text("".join(json.dumps({"text": c}) + "\n" for c in captions), encoding="utf-8")
    assert (
        main(["pretrain", "--out", str(root / "llm"), *TRAIN, *LLM, "--data.source=files", f"--data.files=[{texts}]"])
        == 0
    )
    out = root / "stage1"
    assert (
        main(
            [
                "vlm",
                "pretrain",
                "--init",
                str(root / "llm" / "final"),
                "--out",
                str(out),
                "--coco",
                str(annotations),
                "--train-vision",
                *TINY_VISION,
                *TRAIN,
                "--train.seq_len=192",
                "--train.batch_size=16",
                "--train.max_steps=60",
                "--train.lr=0.003",
                "--train.log_every=10",
                "--train.eval_every=10",
            ]
        )
        == 0
    )
    return out


def test_stage1_on_coco_captions_loss_falls(coco_stage1):
    # the validation captions (a fixed 2% of the 400) after every 10 steps: the loss falls. A frozen 1M-parameter
    # language model can use little of a 32 px picture, so it falls by little (about 0.02 nats per token)
    val = logged(coco_stage1, "val_loss")
    assert len(val) == 6 and val[-1] < val[0], val
    assert len(logged(coco_stage1)) == 6
    config = json.loads((coco_stage1 / "final" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_seq_length"] == 16


@pytest.mark.parametrize(
    "data",
    [
        "llamafactory_mllm_demo/mllm_demo.json",
        "xtuner/mllm_sft_single_image_example_data.jsonl",
        "xtuner/mllm_pretrain_image_example_data.jsonl",
    ],
)
def test_stage2_on_real_image_chats(coco_stage1, shared_data, tmp_path, data):
    out = tmp_path / "stage2"
    # LLaMA-Factory's demo has several pictures in one conversation and long answers: a wider context
    assert (
        main(
            [
                "vlm",
                "sft",
                "--init",
                str(coco_stage1 / "final"),
                "--out",
                str(out),
                "--data",
                str(shared_data / "vlm" / data),
                *TRAIN,
                "--train.seq_len=512",
                "--train.batch_size=2",
                "--train.max_steps=6",
                "--train.log_every=1",
            ]
        )
        == 0
    )
    assert len(logged(out)) == 6
    # the saved model tells the two cat and dog photos apart, and generates about one
    engine = Engine.from_dir(out / "final", device="cpu")
    dog, cats = sorted((shared_data / "vlm" / "xtuner").glob("*.jpg"))
    ids = torch.tensor([engine.encode("<image>\nWhat is in the picture?", images=1)])
    with torch.no_grad():
        assert not torch.allclose(
            engine.vlm(ids, engine.processor([dog])), engine.vlm(ids, engine.processor([cats])), atol=1e-4
        )
    settings = SamplingSettings(max_new_tokens=4, temperature=0, stop_token_ids=[])
    reply = engine.run(["<image>\nWhat is in the picture?"], settings, images=[[dog]])[0]
    assert reply.prompt_ids == ids[0].tolist() and reply.finish_reason == "length"
    # greedy: each of the 4 tokens is the most likely one given the picture and the tokens before it
    chain, pixels = ids[0].tolist(), engine.processor([dog])
    with torch.no_grad():
        for _ in range(4):
            chain.append(int(engine.vlm(torch.tensor([chain]), pixels)[0, -1].argmax()))
    assert reply.token_ids == chain[ids.shape[1] :], (reply.token_ids, chain)
