"""Every command the README and docs/ show runs, as written, in one sandbox folder, with settings
appended that make each one tiny (a 2-layer model, two optimizer steps). So a doc cannot drift from the
code: a renamed flag, a missing file kind or a changed default fails here.

The commands run in the order a reader meets them (the README, then docs/ in DOC_ORDER); what a command
needs that no earlier command made (corpus.txt, chats.jsonl, a SigLIP folder, a local Qwen2 model...) is
a small stand-in written before the first command runs. A few commands cannot run here; SKIPPED says
which and why, and the test fails if a doc gains a command that neither runs nor is listed there.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import tomllib
from conftest import NAMES, TINY_MODEL, logged, tiny_encoder_dir, tiny_qwen2_dir, wait_until, write_benchmarks

from tinylm.eval.harness import split_tasks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOC_ORDER = [
    "README.md",
    "docs/tokenizer.md",
    "docs/data.md",
    "docs/pretrain.md",
    "docs/model.md",
    "docs/hub.md",
    "docs/generate.md",
    "docs/sft.md",
    "docs/lora.md",
    "docs/dpo.md",
    "docs/distill.md",
    "docs/vlm.md",
    "docs/serve.md",
    "docs/export.md",
    "docs/quantize.md",
    "docs/rag.md",
    "docs/eval.md",
    "docs/rl.md",
    "docs/report.md",
    "docs/scale.md",
]

# -- what makes a command tiny ----------------------------------------------------------------------

MODEL = TINY_MODEL  # a 2-layer, 32-wide model with a 300-token vocabulary
TRAIN = [
    "--train.max_steps=2",
    "--train.seq_len=64",
    "--train.batch_size=2",
    "--train.warmup_steps=1",
    "--train.eval_every=2",
    "--train.eval_batches=1",
    "--train.save_every=0",
    "--train.progress=false",
]
VISION = [  # a new ViT: 16 px pictures in 8 px patches (4 image tokens)
    "--vision.image_size=16",
    "--vision.patch_size=8",
    "--vision.hidden_size=16",
    "--vision.intermediate_size=32",
    "--vision.num_hidden_layers=1",
    "--vision.num_attention_heads=2",
]
IMAGES = ["--data.builtin_images=8"]
VLM_TRAIN = [  # a built-in picture's conversation asks all its questions: longer rows than text needs
    *(t for t in TRAIN if not t.startswith("--train.seq_len")),
    "--train.seq_len=320",
]
BENCH = {  # the smallest run of each benchmark that still does every part of it
    "decode.py": "--sizes cpu-tiny --prompt-tokens 4 --new-tokens 4 --rounds 1".split(),
    "train_throughput.py": "--config cpu-tiny --steps 2 --rounds 1 --batch-size 2 --seq-len 32".split(),
    "sft_throughput.py": "--steps 2 --rounds 1 --batch-size 2 --seq-len 64".split(),
    "lora_memory.py": "--shapes cpu-tiny --steps 1 --batch 1 --seq-len 16".split(),
    "serve.py": "--size cpu-tiny --clients 1 2 --new-tokens 4 --prompt-tokens 4 --seconds 0.5".split(),
    "own_text.py": "--text corpus.txt --minutes 0.05 --work runs/own_text --results own_text.jsonl".split(),
    "quantize.py": "--calib-samples 4 --variants 2".split(),
    "rag.py": "--sizes 300 --queries 10 --warmup 2 --embedders none tiny".split(),
    "eval.py": "--items 4 --context 16 --rounds 1".split(),
    "rollouts.py": "--group 2 --prompt-tokens 8 --new-tokens 4 --rounds 1".split(),
    "memory.py": [],  # arithmetic: already instant
}


def prefixed(prefix: str, overrides: list[str]) -> list[str]:
    return [f"--{prefix}.{o[2:]}" for o in overrides]


def tiny_settings(argv: list[str]) -> list[str]:
    """The overrides that make this tinylm command small: a new model gets a tiny shape, every training
    run two steps of short rows; a model it starts from keeps its own shape."""
    command = argv[0]
    if command == "quickstart":
        return [*MODEL, *TRAIN, *prefixed("sft", TRAIN)]
    if command == "vlm":
        if argv[1] == "quickstart":
            return [*prefixed("llm", MODEL + TRAIN), *VLM_TRAIN, *VISION, *IMAGES]
        return [*VLM_TRAIN, *IMAGES, *(VISION if argv[1] == "pretrain" and "--vision" not in argv else [])]
    if command == "pretrain" and "--minutes" in argv:  # sized to the text and the time: a short time
        return TRAIN
    if command == "pretrain":
        return [*TRAIN, *([] if "--init" in argv else MODEL)]
    if command in ("sft", "dpo", "rm", "distill"):
        return TRAIN
    if command == "grpo":
        return [*TRAIN, "--grpo.group_size=2", "--grpo.max_new_tokens=4"]
    if command == "rag" and argv[1] == "quickstart":  # two steps of the reading fine-tune (its own row length)
        reading = [*(t for t in TRAIN if not t.startswith("--train.seq_len")), "--questions", "3"]
        first = [*prefixed("quickstart", MODEL + TRAIN), *prefixed("quickstart.sft", TRAIN)]
        return reading if "--init" in argv else [*reading, *first]
    return []


# -- what cannot run here, and why -----------------------------------------------------------------

HUB = "downloads a dataset from the Hugging Face Hub, which is not reachable here"

QWEN_RECIPE = "starts from Qwen/Qwen2.5-0.5B-Instruct on the Hub (test_scale.py runs the recipes on a local Qwen2)"
EIGHT = "eight processes, one per GPU (test_fsdp.py runs FSDP on two CPU processes, as the doc's 2-process command)"
MACHINES = "two machines with eight processes each"

SKIPPED = {
    "python3 -m venv .venv": "installation: .ci/run installs the README's way into a fresh venv on a clean clone",
    ". .venv/bin/activate": "installation (as above)",
    "pip install torch==2.13.0 -e .": "installation (as above)",
    'pip install torch==2.13.0 -e ".[test]"': "installation (as above)",
    "python -m pytest": "this is the suite running it",
    'pip install -e ".[bench]"': "installation; the test extra holds the bench extra (checked below)",
    "tensorboard --logdir runs/sft-tb": "a server that runs until stopped (the tests read its event files)",
    "ollama create tinylm-chat -f chat.Modelfile": "Ollama is not installed here",
    "ollama run tinylm-chat": "Ollama is not installed here",
    "llama-cli -m chat.gguf -cnv": "llama.cpp's programs are not installed here",
    "llama-server -m chat.gguf --port 8080": "llama.cpp's programs are not installed here",
    "tinylm chat Qwen/Qwen2.5-0.5B-Instruct": "the Hugging Face Hub is out of reach (test_hub_models.py: a cache)",
    "tinylm sft --init Qwen/Qwen2.5-0.5B-Instruct --data chats.jsonl --out runs/qwen-chat --lora": "the Hub (as above)",
    "tinylm merge Qwen/Qwen2.5-0.5B-Instruct runs/qwen-chat/final runs/qwen-merged": "the Hub (as above)",
    "tinylm serve Qwen/Qwen2.5-0.5B-Instruct --revision main": "the Hub (as above)",
    "torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 -m tinylm.cli pretrain ...": MACHINES,
    "tinylm sft --config qwen2.5-0.5b-lora --data chats.jsonl --out runs/qwen-lora": QWEN_RECIPE,
    "tinylm sft --config qwen2.5-0.5b-sft --data chats.jsonl --out runs/qwen-full": QWEN_RECIPE,
    "torchrun --standalone --nproc_per_node=8 -m tinylm.cli sft --config qwen2.5-0.5b-sft --data chats.jsonl "
    "--out runs/qwen-fsdp --train.strategy=fsdp": EIGHT,
    "torchrun --standalone --nproc_per_node=8 -m tinylm.cli pretrain --config minimind2 --data corpus.txt "
    "--out runs/minimind2-8 --train.max_steps=2500": EIGHT,
    **{
        f"torchrun --nnodes=2 --node_rank={rank} --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 "
        "--rdzv-id=qwen -m tinylm.cli sft --config qwen2.5-0.5b-sft --data chats.jsonl --out /shared/runs/qwen "
        "--train.strategy=fsdp": MACHINES
        for rank in (0, 1)
    },
    # Hub datasets need the network; tests/test_hub_data.py reads saved, cloned and cached ones the same way
    "tinylm pretrain --config cpu-tiny --out runs/wiki --data hf:Salesforce/wikitext:wikitext-103-raw-v1": HUB,
    "tinylm sft --init runs/tiny/final --data hf:HuggingFaceH4/ultrachat_200k@train_sft --out runs/ultrachat": HUB,
    "tinylm dpo --init runs/ultrachat/final --data hf:Anthropic/hh-rlhf --out runs/hh": HUB,
}


def doc_commands(path: Path) -> list[str]:
    """The commands of a markdown file's bash blocks: continuation lines joined, trailing comments
    dropped, optional parts ``[--flag a|b]`` kept with their first choice, ``&&`` chains split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#\s.*$", "", line)
            line = re.sub(r"(?<=\s)\[(-[^\]]*)\]", lambda m: re.sub(r"(\S+?)(\|\S+)+", r"\1", m[1]), line)
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    return commands


def test_the_doc_order_names_every_doc():
    assert sorted(DOC_ORDER) == sorted(["README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
    assert all(doc_commands(ROOT / name) for name in ("README.md", "docs/pretrain.md", "docs/serve.md"))


def test_doc_commands_are_read_as_a_reader_would():
    doc = ROOT / "docs" / "generate.md"
    assert (
        'tinylm generate runs/tiny/final --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8 '
        "--top-k 50 --top-p 0.95 --repetition-penalty 1.1 --seed 0 --device auto --dtype float32 --kv-cache int8 "
        "--compile"
    ) in doc_commands(doc)
    lora = doc_commands(ROOT / "docs" / "lora.md")
    assert any("--lora.target_modules=[q_proj,v_proj]" in c for c in lora)  # a value's brackets stay


def test_the_bench_extra_is_part_of_the_test_extra():
    """The suite's environment (the test extra) is what `pip install -e ".[bench]"` would add."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert set(extras["bench"]) <= set(extras["test"])


# -- stand-ins for the reader's own files ------------------------------------------------------------


def write_stand_ins(home: Path) -> None:
    """Small files with the names and formats the docs use, in ``home`` (the sandbox)."""
    import datasets
    from PIL import Image

    from tinylm.data import builtin

    documents = list(builtin.pretrain_documents(builtin.World(1)))[:300]
    text = "\n\n".join(documents) + "\n"
    records = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)
    for name in ("corpus.txt", "a.txt", "domain.txt", "corpus/a.txt", "held_out.txt"):
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(text, encoding="utf-8")
    for name in ("more.jsonl", "c.jsonl", "domain.jsonl", "corpus/b.jsonl"):
        (home / name).write_text(records, encoding="utf-8")
    for name in ("more.jsonl.gz", "b.jsonl.gz"):
        (home / name).write_bytes(gzip.compress(records.encode("utf-8")))

    questions = [(f"What colour does {name} like?", f"{name} likes {colour}.") for name, colour in NAMES.items()] * 8
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in questions]
    for name in ("chats.jsonl", "mine.jsonl"):
        (home / name).write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")
    alpaca = [{"instruction": q, "input": "", "output": a} for q, a in questions]
    (home / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False), encoding="utf-8")
    pairs = [
        {
            "conversations": [{"from": "human", "value": q}],
            "chosen": {"from": "gpt", "value": a},
            "rejected": {"from": "gpt", "value": "I do not know."},
        }
        for q, a in questions
    ]  # LLaMA-Factory's layout, as the docs' --format llamafactory says (and auto-detection finds)
    (home / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), "utf-8")
    prompts = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a in range(5) for b in range(5)]
    (home / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    (home / "my_rewards.py").write_text(
        "def score(messages, reply, answer):\n    return 1.0 if answer is not None and answer in reply else 0.0\n",
        encoding="utf-8",
    )
    (home / "questions.txt").write_text("Who is Tom?\n小明喜欢什么颜色？\n", encoding="utf-8")

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}
    (home / "pics").mkdir()
    for i, rgb in enumerate(colours.values()):
        Image.new("RGB", (32, 32), rgb).save(home / "pics" / f"{i}.png")
    shutil.copy(home / "pics" / "0.png", home / "picture.png")
    llava = [
        {
            "image": f"pics/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the picture?"},
                {"from": "gpt", "value": f"It is {colour}."},
            ],
        }
        for i, colour in enumerate(colours)
    ] * 4
    (home / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava), encoding="utf-8")
    mixed = [  # LLaMA-Factory's multimodal layout
        {
            "messages": [
                {"role": "user", "content": "<image>Which colour?"},
                {"role": "assistant", "content": colour},
            ],
            "images": [f"pics/{i}.png"],
        }
        for i, colour in enumerate(colours)
    ] * 4
    (home / "mixed.json").write_text(json.dumps(mixed), encoding="utf-8")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats)}).save_to_disk(home / "my-chats")  # hf:./my-chats

    tiny_encoder_dir(home / "my-encoder", documents)  # the reader's own text encoder, for dense retrieval
    write_benchmarks(home / "benchmarks")  # MMLU, C-Eval, CMMLU, ARC, HellaSwag, GSM8K in their own layouts

    (home / "annotations").mkdir()
    (home / "train2017").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(len(colours))]
    for i in range(len(colours)):
        Image.open(home / "pics" / f"{i}.png").save(home / "train2017" / f"{i:012d}.jpg")
    captions = [{"id": i, "image_id": i, "caption": f"A {colour} square."} for i, colour in enumerate(colours)]
    (home / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": captions * 4}), encoding="utf-8"
    )


def write_siglip(path: Path) -> None:
    """A tiny SigLIP vision tower saved by transformers, as a downloaded one is laid out."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        vision_use_head=False,
    )
    transformers.SiglipVisionModel(config).save_pretrained(path)


def write_qwen(path: Path, tokenizer_from: Path) -> None:
    """The stand-in for ~/models/Qwen2.5-0.5B-Instruct: a tiny Qwen2 whose tokenizer has ChatML's
    tokens, as Qwen2.5-Instruct's has."""
    from tinylm.chat_template import get_template
    from tinylm.tokenizer import Tokenizer

    tiny_qwen2_dir(path, get_template("chatml").attach(Tokenizer.load(tokenizer_from)))


# runs the docs name as "yours" (a bigger teacher, an adapter of your own): an earlier run stands in
ALIASES = {
    "runs/big": "runs/quickstart",
    "runs/big-chat": "runs/quickstart/sft",
    "runs/small": "runs/student",
    "runs/my-adapter": "runs/chat-lora/final",
}


# -- running them ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(argv: list[str]) -> dict[str, tuple[str, ...]]:
    """``--flag value...`` words as {flag: values}, the last of a repeated flag winning (as argparse does)."""
    found, flag = {}, None
    for word in argv:
        if word.startswith("--"):
            flag = word
            found[flag] = ()
        elif flag is not None:
            found[flag] += (word,)
    return found


def http_get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


class Sandbox:
    """The reader's folder: runs each command there and checks what it left behind."""

    def __init__(self, home: Path, capsys, monkeypatch):
        self.home, self.capsys, self.monkeypatch = home, capsys, monkeypatch
        self.server: subprocess.Popen | None = None
        self.port = 0
        self.ran: list[tuple[float, str]] = []  # (seconds, command)
        self.benched: set[tuple] = set()  # (script, its options) of the benchmarks run
        self.planned = [  # and of every benchmark command the docs show
            (words[1], frozenset(options([*words[2:], *BENCH[Path(words[1]).name]]).items()))
            for name in DOC_ORDER
            for words in map(shlex.split, doc_commands(ROOT / name))
            if words[0] == "python" and words[1].startswith("bench/")
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "PYTHONPATH": str(ROOT)}

    def run(self, command: str) -> None:
        for alias, target in ALIASES.items():
            if alias in command and not (self.home / alias).exists() and (self.home / target).exists():
                (self.home / alias).symlink_to(self.home / target, target_is_directory=True)
        began = time.monotonic()
        words = [os.path.expanduser(w) for w in shlex.split(command)]
        if "--minutes" in words:  # a time budget, three seconds long
            words[words.index("--minutes") + 1] = "0.05"
        words = [re.sub(r"^--train\.max_minutes=.*", "--train.max_minutes=0.05", w) for w in words]
        if words[0] == "tinylm":
            self.tinylm(words[1:])
        elif words[0] == "torchrun":
            argv = words[words.index("tinylm.cli") + 1 :]
            self.fresh_out(argv)
            self.subprocess([sys.executable, "-m", "torch.distributed.run", *words[1:], *tiny_settings(argv)])
            assert (self.home / argv[argv.index("--out") + 1] / "final" / "model.safetensors").is_file()
        elif words[0] == "python" and words[1].startswith("bench/"):
            if not self.bench(words[1], [*words[2:], *BENCH[Path(words[1]).name]]):
                return  # covered by another (it does not count as run)
        elif words[0] == "curl":
            if shutil.which("curl") is None:
                pytest.skip("curl is not installed")
            assert self.server is not None, f"{command}: no server is running"
            words = [w.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}") for w in words]
            answer = json.loads(self.subprocess(words))
            if "/v1/embeddings" in command:  # a vector per input
                assert len(answer["data"]) == len(json.loads(words[words.index("-d") + 1])["input"])
                assert all(d["embedding"] for d in answer["data"]) and answer["usage"]["prompt_tokens"] > 0
            else:
                assert answer["choices"][0]["text"] and answer["usage"]["completion_tokens"] > 0
        else:
            raise AssertionError(f"{command}: the doc test does not know how to run this")
        self.ran.append((time.monotonic() - began, command))

    def subprocess(self, argv: list[str], timeout: float = 180) -> str:
        done = subprocess.run(argv, cwd=self.home, env=self.env(), capture_output=True, text=True, timeout=timeout)
        errors = "\n".join(line for line in done.stderr.splitlines() if "error" in line.lower())
        assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stderr[-3000:]}\nerrors:\n{errors[-3000:]}"
        return done.stdout

    def bench(self, script: str, argv: list[str]) -> bool:
        """A benchmark, in this process (it spares a second start of torch and transformers): its
        table printed, and any picture it was asked for drawn. A command whose options (once the tiny
        settings replace what told them apart) are all in another's of the same script is covered
        by that one, which runs instead."""
        mine = frozenset(options(argv).items())
        if (script, mine) in self.benched or any(s == script and mine < theirs for s, theirs in self.planned):
            return False
        self.benched.add((script, mine))
        self.monkeypatch.setattr(sys, "argv", [script, *argv])
        self.capsys.readouterr()
        runpy.run_path(str(self.home / script), run_name="__main__")
        printed = self.capsys.readouterr().out
        figures = re.search(r"\d\.\d+ ?[x×]|\| \d+\.\d+ \|", printed)  # a ratio, or a table's figure
        assert figures, f"{script} {shlex.join(argv)} printed no results:\n{printed}"
        if "--plot" in argv:
            assert (self.home / argv[argv.index("--plot") + 1]).stat().st_size > 0
        return True

    def fresh_out(self, argv: list[str]) -> None:
        """The docs show alternatives that write into one --out: each starts afresh (unless it resumes).
        An --out that is a file (a rag index) is brought up to date by design, so it stays."""
        if "--out" in argv and "--resume" not in argv and (self.home / argv[argv.index("--out") + 1]).is_dir():
            shutil.rmtree(self.home / argv[argv.index("--out") + 1])

    def tinylm(self, argv: list[str]) -> None:
        from tinylm.cli import build_parser, main

        args, _ = build_parser().parse_known_args(argv)
        if args.command == "serve":
            return self.serve(argv)
        self.fresh_out(argv)
        stdin = ""
        if args.command == "chat":  # a conversation typed at the prompt, then end of input
            stdin = "Who is Tom?\n/reset\n小明喜欢什么颜色？\n" + (
                "/image pics/1.png\nAnd now?\n" if args.image else ""
            )
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        self.monkeypatch.setenv("HOME", str(self.home))
        self.capsys.readouterr()
        code = main([*argv, *tiny_settings(argv)])
        out_text, err_text = self.capsys.readouterr()
        assert code == 0, f"tinylm {shlex.join(argv)} exited {code}:\n{out_text[-2000:]}\n{err_text[-3000:]}"
        self.check_outputs(args, out_text)

    def check_outputs(self, args, printed: str) -> None:
        """What the command was for is there: a model, a tokenizer, answers, text."""
        home = self.home
        if args.command == "quickstart":  # the --sft.* overrides reached the fine-tuning
            assert json.loads((home / args.out / "report.json").read_text())["facts"]
            assert (home / args.out / "sft" / "final" / "model.safetensors").is_file()
            assert max(logged(home / args.out / "sft", "step")) == 2
        elif args.command == "vlm" and args.vlm_command == "quickstart":  # and --llm.* the language model
            assert (home / args.out / "sft" / "final" / "preprocessor_config.json").is_file()
            assert max(logged(home / args.out / "llm", "step")) == 2
        elif args.command == "export":  # the file, and Ollama's Modelfile beside it
            assert (home / args.out).stat().st_size > 0 and (home / args.out).with_suffix(".Modelfile").is_file()
        elif args.command == "rag" and args.rag_command == "quickstart":  # its report, with the reading test
            report = json.loads((home / args.out / "report.json").read_text())
            assert report["questions"] == 6 and set(report["retrieval"]) == {"en", "zh"}
        elif args.command == "rag" and args.rag_command == "index":
            assert (home / args.out).stat().st_size > 0
        elif args.command == "rag":  # passages, or an answer and its sources
            assert printed.strip()
        elif args.command == "quantize":  # a model directory with integer weights
            config = json.loads((home / args.out / "config.json").read_text())
            assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == args.bits
        elif args.command == "eval":  # the table; with --out the results (every task, with items), with --card the card
            assert "| task | shots | metric |" in printed
            if args.out:
                results = json.loads((home / args.out / "results.json").read_text(encoding="utf-8"))["tasks"]
                assert len(results) == len(split_tasks(args.tasks)) and all(t["items"] > 0 for t in results.values())
            if args.card:
                assert "## Evaluation" in (home / args.model_dir / "README.md").read_text(encoding="utf-8")
        elif args.command == "report":  # the page and its markdown, in --out or in the run's report/
            folder = home / (args.out or Path(args.run_dir) / "report")
            assert "<svg" in (folder / "report.html").read_text(encoding="utf-8") and (folder / "report.md").is_file()
        elif args.command == "tokenizer" and args.tokenizer_command == "train":
            assert (home / args.out / "tokenizer.json").is_file()
        elif args.command == "tokenizer":
            assert printed.strip()
        elif args.command == "rm":  # a reward model (or its adapter) and its before/after report
            from tinylm.modeldir import is_reward_dir

            assert is_reward_dir(home / args.out / "final") and (home / args.out / "rm.json").is_file()
        elif getattr(args, "out", None):  # a training stage: its model, or its adapter
            final = home / args.out / "final"
            assert (final / "model.safetensors").is_file() or (final / "adapter_model.safetensors").is_file()
        elif args.command == "merge":
            assert (home / args.out_dir / "model.safetensors").is_file()
        elif args.command == "chat" and args.output:
            answers = [json.loads(line) for line in (home / args.output).read_text(encoding="utf-8").splitlines()]
            assert [a["prompt"] for a in answers] == ["Who is Tom?", "小明喜欢什么颜色？"]
        elif args.command in ("chat", "generate"):
            assert printed.strip()
        elif args.command == "configs":
            assert "cpu-tiny" in printed

    def serve(self, argv: list[str]) -> None:
        """A server in its own process, on a free port instead of 8000, until stop(); the page and
        the API answer before the next command runs."""
        self.stop()
        self.port = free_port()
        if "--port" in argv:
            argv = argv[: argv.index("--port")] + argv[argv.index("--port") + 2 :]
        argv = [sys.executable, "-m", "tinylm.cli", *argv, "--port", str(self.port), "--log-level", "warning"]
        self.server = subprocess.Popen(argv, cwd=self.home, env=self.env(), stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{self.port}"

        def ready():
            if self.server.poll() is not None:
                pytest.fail(f"{shlex.join(argv)} exited {self.server.returncode}: {self.server.stderr.read()[-3000:]}")
            return http_get(base + "/v1/models")

        models = json.loads(wait_until(ready, "the server to answer", timeout=120, interval=0.2))
        assert models["data"] and b"<html" in http_get(base + "/").lower()

    def stop(self) -> None:
        if self.server is not None:
            self.server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.server.wait(timeout=30)
            self.server.kill()
            self.server.stderr.close()
            self.server = None


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("reader")
    write_stand_ins(home)
    (home / "bench").symlink_to(ROOT / "bench", target_is_directory=True)
    (home / "docs").mkdir()  # bench/lora_memory.py --plot docs/lora_memory.png writes here, not into the repo
    return home


def test_every_documented_command_runs(home, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(home)
    monkeypatch.setenv("TINYLM_DEBUG", "")
    sandbox = Sandbox(home, capsys, monkeypatch)
    write_siglip(home / "siglip-dir")
    seen_skips, started = set(), time.monotonic()
    try:
        for name in DOC_ORDER:
            for command in doc_commands(ROOT / name):
                if command in SKIPPED:
                    seen_skips.add(command)
                    continue
                if command in (ran for _, ran in sandbox.ran):
                    continue  # shown in two places (the README and a doc): once is enough
                if "Qwen2.5-0.5B-Instruct" in command and not (home / "models").exists():
                    write_qwen(home / "models" / "Qwen2.5-0.5B-Instruct", home / "runs" / "quickstart" / "final")
                sandbox.run(command)
            sandbox.stop()
    finally:
        sandbox.stop()
    assert seen_skips == set(SKIPPED), f"SKIPPED lists commands no doc shows: {set(SKIPPED) - seen_skips}"
    print(f"{len(sandbox.ran)} documented commands ran in {time.monotonic() - started:.0f} s; the slowest:")
    for seconds, command in sorted(sandbox.ran, reverse=True)[:20]:
        print(f"{seconds:6.1f} s  {command}")
