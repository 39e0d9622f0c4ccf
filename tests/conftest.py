import csv
import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinylm.model.llama import CausalLM, ModelConfig

# Tiny models gain nothing from a second thread, and on a busy machine threads that wait for each
# other make every small operation many times slower.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


class ScriptedLM(CausalLM):
    """A stand-in model that emits ``script`` whatever the prompt, so tests can choose the exact
    tokens (say, the bytes of a split emoji): at position p it predicts script[p - prompt_len + 1]."""

    def __init__(self, vocab_size: int, script: list[int], prompt_len: int):
        config = ModelConfig(
            vocab_size=vocab_size,
            hidden_size=vocab_size,
            num_hidden_layers=0,
            num_attention_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=256,
        )
        super().__init__(config)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(vocab_size))
        self.script, self.prompt_len = torch.tensor(script), prompt_len

    def hidden_states(self, input_ids, *, position_ids, mask=None, cache=None, inputs_embeds=None):
        if cache is not None:
            cache.advance(input_ids.shape[1])
        step = (position_ids - self.prompt_len + 1).clamp(0, len(self.script) - 1)
        return 10.0 * F.one_hot(self.script[step], self.config.vocab_size).float()


def reply_text(tokenizer, ids) -> str:
    """What the engine's text of ``ids`` should read: no special tokens but the reasoning markers,
    which are part of a reply (decoded here independently of the engine's incremental decoder)."""
    markers = {tokenizer.token_to_id("<|think|>"), tokenizer.token_to_id("<|think_end|>")}
    hidden = set(tokenizer.special_ids.values()) - markers
    return tokenizer.decode([i for i in ids if i not in hidden])


def read_metrics(run_dir) -> list[dict]:
    """Every record a training run wrote to its metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def logged(run_dir, key="loss") -> list:
    """The values of ``key`` in a run's metrics.jsonl, from the records that have it, in order."""
    return [record[key] for record in read_metrics(run_dir) if key in record]


def wait_until(condition, what: str, timeout: float = 10.0, interval: float = 0.002):
    """Poll ``condition()`` until it returns something true, and return that; fail the test, saying
    what was awaited, if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value


def fingerprint(directory: Path) -> dict[str, str]:
    """Each file under ``directory`` by its relative path: its SHA-256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def unchanged(directory: Path, before: dict[str, str]) -> None:
    """A session-wide model is shared by many tests: none of them may write into it."""
    assert fingerprint(directory) == before, f"a test changed the shared model directory {directory}"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: the project must pass without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"realdata: {SHARED_DATA} is absent")
    return SHARED_DATA


# -- a tiny base model and conversations about who likes which colour (SFT, LoRA and DPO tests) --

TINY_MODEL = [
    "--model.hidden_size=32",
    "--model.num_hidden_layers=2",
    "--model.num_attention_heads=2",
    "--model.num_key_value_heads=1",
    "--data.vocab_size=300",
]
TRAIN = [
    "--train.seq_len=64",
    "--train.batch_size=8",
    "--train.eval_every=20",
    "--train.eval_batches=2",
    "--train.progress=false",
    "--train.warmup_steps=2",
    "--train.save_every=0",
]
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
            c.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
                    ensure_ascii=False,
                )
                + "\n"
            )
            t.write(json.dumps({"text": f"{question} {answer}"}, ensure_ascii=False) + "\n")
    base = root / "base"
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(base),
                *TINY_MODEL,
                *TRAIN,
                "--train.max_steps=20",
                "--data.source=files",
                f"--data.files=[{texts}]",
            ]
        )
        == 0
    )
    before = fingerprint(root)
    yield root, base / "final", chats
    unchanged(root, before)


@pytest.fixture(scope="session")
def trained_base(base_and_chats, tmp_path_factory):
    """The same tiny base trained for longer (150 steps at a high learning rate), trained once and shared
    by the LoRA, DPO and distillation tests. An adapter needs it: the frozen embeddings and final norm of
    a barely trained 32-wide model cap its logits near zero, and then nothing can learn. Read-only: a test
    that writes into a model directory copies it first."""
    from tinylm.cli import main

    root, _, _ = base_and_chats
    run = tmp_path_factory.mktemp("trained-base") / "run"
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(run),
                *TINY_MODEL,
                *TRAIN,
                "--train.max_steps=150",
                "--train.lr=0.01",
                "--data.source=files",
                f"--data.files=[{root / 'text.jsonl'}]",
            ]
        )
        == 0
    )
    before = fingerprint(run)
    yield run / "final"
    unchanged(run, before)


def tiny_qwen_dir(path, tokenizer, family: str = "qwen2"):
    """A tiny random Qwen2 (q/k/v biases) or Qwen3 (q/k norms, heads of 128 dimensions as every
    Qwen3's) saved by transformers, with ``tokenizer``: a local "existing model" laid out as a
    downloaded Qwen2.5 / Qwen3 directory is."""
    import torch
    import transformers

    shape = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32 if family == "qwen2" else 64,
        intermediate_size=64 if family == "qwen2" else 128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_id,
    )
    torch.manual_seed(0)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=128))
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


def tiny_encoder_dir(path, texts: list[str]):
    """A tiny random BERT in sentence-transformers' layout (CLS pooling, as BGE), with a word-level
    tokenizer over the terms of ``texts``: a local text encoder for dense retrieval."""
    import json

    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tinylm.rag.chunks import terms

    torch.manual_seed(0)  # the same weights whichever tests ran before
    words = sorted({t for text in texts for t in terms(text)} | {"how", "many", "what", "who"})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(path)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(path)
    pooling = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    (path / "modules.json").write_text(json.dumps([pooling]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    return path


def tiny_clip_tower(path, layers: int = 2):
    """A tiny random CLIP vision tower (32 px pictures in 8 px patches) with its image processor, saved by
    transformers: a local stand-in for a downloaded CLIP, whose normalisation differs from the default."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    transformers.CLIPVisionModel(config).save_pretrained(path)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(path)
    return path


def tiny_qwen2_dir(path, tokenizer):
    return tiny_qwen_dir(path, tokenizer, "qwen2")


# -- a Hugging Face Hub cache, offline ------------------------------------------------------------

NEVER_FETCHED = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", "pytorch_model.bin": b"\x80"}


def offline_hub(monkeypatch, cache: Path) -> Path:
    """Point huggingface_hub at the cache folder ``cache``, offline, in this process (whose settings it read
    on import) and in the ones it starts; tinylm's resolutions start afresh. Returns ``cache``."""
    from huggingface_hub import constants

    from tinylm.hub import models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "SNAPSHOTS", {})
    return cache


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_hub_commit(cache: Path, repo: str, files: dict[str, bytes], refs: tuple[str, ...]) -> Path:
    """One commit of ``repo`` in the Hugging Face cache ``cache``, as snapshot_download leaves it: each of
    ``files`` in blobs/ under its etag (the SHA-256 of a Git LFS file, the Git blob SHA-1 of any other),
    linked from snapshots/<commit>/; the commit's files listed in trees/<commit>.json, NEVER_FETCHED's
    (which tinylm never asks for) too; ``refs`` (branches, tags) holding the commit hash. Returns the
    snapshot folder."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    listed = {**files, **NEVER_FETCHED}
    commit = hashlib.sha1(json.dumps({n: git_blob_sha1(d) for n, d in sorted(listed.items())}).encode()).hexdigest()
    tree = {}
    for name, data in sorted(listed.items()):
        sha256 = hashlib.sha256(data).hexdigest()
        lfs = name.endswith((".safetensors", ".bin"))  # the Hub's default .gitattributes
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        tree[name] = {"size": len(data), "blob_id": git_blob_sha1(pointer if lfs else data)}
        tree[name] |= {"lfs_sha256": sha256, "lfs_size": len(data)} if lfs else {}
        if name in files:
            blob = storage / "blobs" / (sha256 if lfs else git_blob_sha1(data))
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = storage / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    (storage / "trees").mkdir(exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}, indent=1))
    return storage / "snapshots" / commit


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- a live tinylm server on loopback (the serving tests, and the browser test) -----------------


def tiny_chat_dir(path, max_len=128, seed=0):
    """A random ~100k-parameter model with a bilingual 300-token tokenizer and the chatml template,
    saved as a model directory. Its weights are spread wide, so greedy answers vary (and often end
    in the middle of a Chinese character's bytes, which the streaming tests need)."""
    import torch

    from tinylm.chat_template import get_template
    from tinylm.model.llama import CausalLM, ModelConfig
    from tinylm.modeldir import save_model_dir
    from tinylm.tokenizer import train_tokenizer

    texts = [
        "the cat sat on the mat. the dog ran.",
        "User: hi\nAssistant: hello there",
        "你好 世界，小明喜欢黄色。",
    ] * 20
    template = get_template("chatml")
    tokenizer = template.attach(train_tokenizer(texts, vocab_size=300))
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        eos_token_id=template.stop_token_ids(tokenizer),
    )
    model = CausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_model_dir(model, path, tokenizer)
    return path


class LiveServer:
    """A tinylm server (``tinylm.serve.app.Server``) answering on a free loopback port, in a thread."""

    def __init__(self, server):
        import socket

        import uvicorn

        from tinylm.serve.app import create_app

        self.server = server
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.uvicorn.started, "the server to start", timeout=30)
        return self

    def __exit__(self, *exc):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.scheduler.close()
        self.socket.close()


# -- a live server (tests/test_serve*.py) -------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A tiny chat model served on loopback (one per test module)."""
    from tinylm.serve.app import build_server

    model_dir = tiny_chat_dir(tmp_path_factory.mktemp("serve") / "tiny-chat")
    with LiveServer(build_server(model_dir, max_batch=8, max_body=2**20)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    """The official openai client, talking to ``live``."""
    import openai

    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(live, messages=None, prompt=None, **settings):
    """What the engine alone generates for the same request (greedy): the Completion."""
    from tinylm.infer.sampling import SamplingSettings

    server = live.server
    if messages is not None:
        text = server.chat_format.render(messages)
        settings = server.chat_format.settings(SamplingSettings(temperature=0, **settings), server.engine.tokenizer)
    else:
        stop_ids = sorted({server.engine.tokenizer.eos_id, *server.eos_token_ids})  # as generation_config.json says
        text, settings = prompt, SamplingSettings(temperature=0, stop_token_ids=stop_ids, **settings)
    return server.engine.run([text], settings)[0]


QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "小明喜欢什么颜色？ the cat"}]


def error_of(response, status):
    """The body of an error response in OpenAI's shape, after checking its status and fields."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# -- benchmark files in their published layouts (tinylm eval) ---------------------------------------

MMLU_ROWS = [
    ["What is 2 + 2?", "3", "4", "5", "6", "B"],
    ["Which is a colour?", "red", "seven", "dog", "run", "A"],
    ["Pick the last letter.", "a", "b", "c", "z", "D"],
]


def write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def write_benchmarks(root):
    """Every benchmark of tinylm eval in its published layout under ``root``, a few items each."""
    for split in ("test", "dev"):  # MMLU as its authors ship it: headerless, answer letters
        write_csv(root / "mmlu" / split / f"high_school_math_{split}.csv", MMLU_ROWS)
        write_csv(root / "mmlu" / split / f"world_religions_{split}.csv", MMLU_ROWS[::-1])
    zh = [["2 加 2 等于几？", "3", "4", "5", "6", "B"], ["哪个是颜色？", "红色", "七", "狗", "跑", "A"]]
    write_csv(
        root / "cmmlu" / "test" / "agronomy.csv",
        [[i, *r] for i, r in enumerate(zh)],
        ["", "Question", "A", "B", "C", "D", "Answer"],
    )
    write_csv(
        root / "cmmlu" / "dev" / "agronomy.csv",
        [[i, *r] for i, r in enumerate(zh * 3)],
        ["", "Question", "A", "B", "C", "D", "Answer"],
    )
    write_csv(
        root / "ceval" / "val" / "accountant_val.csv",
        [[i, *r] for i, r in enumerate(zh)],
        ["id", "question", "A", "B", "C", "D", "answer"],
    )
    write_csv(
        root / "ceval" / "dev" / "accountant_dev.csv",
        [[i, *r, "因为"] for i, r in enumerate(zh * 3)],
        ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
    )
    arc = [
        {
            "id": "q1",
            "question": {
                "stem": "Which is hot?",
                "choices": [
                    {"text": "ice", "label": "A"},
                    {"text": "the sun", "label": "B"},
                    {"text": "snow", "label": "C"},
                ],
            },
            "answerKey": "B",
        },
        {
            "id": "q2",
            "question": {
                "stem": "What do plants need?",
                "choices": [{"text": "light", "label": "1"}, {"text": "plastic", "label": "2"}],
            },
            "answerKey": "1",
        },
    ]
    write_jsonl(root / "arc" / "ARC-Challenge" / "ARC-Challenge-Test.jsonl", arc)
    write_jsonl(root / "arc" / "ARC-Challenge" / "ARC-Challenge-Train.jsonl", arc)
    swag = [
        {
            "activity_label": "Cooking",
            "ctx_a": "A man cuts bread.",
            "ctx_b": "he",
            "endings": ["eats it [title] slowly.", "flies away.", "sings.", "sleeps."],
            "label": 0,
        },
        {
            "activity_label": "Running",
            "ctx_a": "A woman runs.",
            "ctx_b": "she",
            "endings": ["stops.", "melts.", "writes.", "reads."],
            "label": "0",
        },
    ]
    write_jsonl(root / "hellaswag" / "hellaswag_val.jsonl", swag)
    write_jsonl(root / "hellaswag" / "hellaswag_train.jsonl", swag)
    gsm = [
        {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "A box holds 1,200 pens; 200 go. How many stay?", "answer": "1200 - 200 = 1000\n#### 1,000"},
    ]
    write_jsonl(root / "gsm8k" / "test.jsonl", gsm)
    write_jsonl(root / "gsm8k" / "train.jsonl", gsm * 3)
    return root
