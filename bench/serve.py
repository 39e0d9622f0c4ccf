"""Continuous batching pays: aggregate generated tokens/s of `tinylm serve` with 1, 4, 8 and 16
concurrent streaming clients, each printed as a ratio to one client.

The server runs as its own process (`tinylm serve`), as it would in use; the clients are asyncio
streams in this process. Each client sends requests one after another for ``--seconds`` per level,
every request asking for exactly ``--new-tokens`` tokens (``ignore_eos``) at temperature 1. Tokens are
counted from the server's own usage chunk, and a level's rate is all clients' tokens over its wall
time. Levels run in order, then again in reverse, and each level's two rates are averaged, so a drift
in the machine's speed during the run does not favour one end.

    python bench/serve.py                            # a random MiniMind2-Small-shaped model (26M), CPU
    python bench/serve.py --device cuda --dtype bfloat16
    python bench/serve.py --model-dir runs/chat/final

Speed does not depend on what the weights learned, so random weights measure the same thing. Target
on the issue: at 8 clients, at least 4x one client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CONFIGS = Path(__file__).resolve().parents[1] / "tinylm" / "configs"


def random_model_dir(out: Path, size: str) -> Path:
    """A model of ``configs/<size>.yaml``'s shape with random weights and a byte-level tokenizer
    trained on the built-in corpus (the model's vocabulary is cut to the tokenizer's)."""
    import torch

    from tinylm.config import load_config
    from tinylm.data.builtin import World, pretrain_documents
    from tinylm.model.llama import CausalLM
    from tinylm.modeldir import save_model_dir
    from tinylm.tokenizer import train_tokenizer
    from tinylm.train.pretrain import PretrainConfig

    texts = pretrain_documents(World(0))[:3000]
    tokenizer = train_tokenizer(texts, vocab_size=6400)
    config = load_config(PretrainConfig, CONFIGS / f"{size}.yaml").model
    config.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    save_model_dir(CausalLM(config).eval(), out, tokenizer)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, args) -> subprocess.Popen:
    command = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "tinylm.cli",
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--max-batch",
        str(max(args.clients)),
        "--device",
        args.device,
        "--log-level",
        "warning",
        "--max-len",
        str(args.prompt_tokens * 8 + args.new_tokens + 64),
    ]
    if args.dtype:
        command += ["--dtype", args.dtype]
    if args.compile:
        command.append("--compile")
    server = subprocess.Popen(command)
    deadline = time.time() + 600 if args.compile else time.time() + 300  # compiling takes a while
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
    server.kill()
    raise SystemExit("the server did not start within 300 s")


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[int, float]:
    """Stream one completion; return its generated tokens (from the usage chunk) and its time to first token."""
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first or 0.0


async def level(url: str, clients: int, seconds: float, args, prompt: str) -> tuple[float, float]:
    """``clients`` streams, each sending requests back to back for ``seconds``: (tokens/s, median TTFT)."""
    body = {
        "prompt": prompt,
        "max_tokens": args.new_tokens,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, body | {"max_tokens": 4})  # warm the connection and the model
        results = []
        start = time.perf_counter()

        async def worker():
            while time.perf_counter() - start < seconds:
                results.append(await one_request(client, body))

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return sum(t for t, _ in results) / elapsed, statistics.median(f for _, f in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="serve this model directory instead of a random one")
    parser.add_argument("--size", default="minimind2-small", help="with no --model-dir: the shape of configs/SIZE.yaml")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="about this many tokens of prompt")
    parser.add_argument("--seconds", type=float, default=15, help="per level and pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="serve with --compile (torch.compile the decode step)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model_dir) if args.model_dir else random_model_dir(Path(scratch) / "model", args.size)
        port = free_port()
        server = start_server(model_dir, port, args)
        url = f"http://127.0.0.1:{port}"
        try:
            prompt = " ".join(["Once upon a time there was a little robot"] * (args.prompt_tokens // 8 + 1))
            print(
                f"tinylm serve {model_dir} on {args.device}{' ' + args.dtype if args.dtype else ''}: {args.new_tokens} "
                "new tokens per "
                f"request, {args.seconds:.0f} s per level and pass, {os.cpu_count()} CPUs"
            )
            passes = [args.clients, list(reversed(args.clients))]
            rates: dict[int, list[float]] = {c: [] for c in args.clients}
            ttft: dict[int, list[float]] = {c: [] for c in args.clients}
            for order in passes:
                for clients in order:
                    rate, first = asyncio.run(level(url, clients, args.seconds, args, prompt))
                    rates[clients].append(rate)
                    ttft[clients].append(first)
                    print(
                        f"  {clients:>3} clients: {rate:8.1f} tokens/s, median time to first token {first * 1000:6.0f} "
                        "ms",
                        flush=True,
                    )
            base = statistics.mean(rates[args.clients[0]])
            print(f"\naggregate tokens/s as a ratio to {args.clients[0]} client(s) (mean of both passes):")
            for clients in args.clients:
                mean = statistics.mean(rates[clients])
                print(
                    f"  {clients:>3} clients: {mean:8.1f} tokens/s  {mean / base:5.2f}x   "
                    f"(time to first token {statistics.mean(ttft[clients]) * 1000:.0f} ms)"
                )
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # show where it hangs (faulthandler prints every thread), then stop it
                print("the server did not stop within 30 s of SIGTERM; its threads:", file=sys.stderr, flush=True)
                server.send_signal(signal.SIGABRT)
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
