"""One sampler everywhere: the same seed and settings give the same tokens from the Python API,
``tinylm generate``, ``tinylm chat``, ``/v1/completions`` and ``/v1/chat/completions`` (sampled, not
only greedy); defaults come from the model's generation_config.json; --compile reaches the server."""

import json
import threading

import httpx
import pytest
import torch
from conftest import LiveServer, tiny_chat_dir

from tinylm.cli import main
from tinylm.infer.chat import chat_format_for
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import BatchSampler, SamplingSettings, generation_defaults
from tinylm.infer.scheduler import Request, Scheduler
from tinylm.serve.app import build_server

PROMPT = "the cat sat on 小明"
SAMPLED = {"temperature": 1.3, "top_p": 0.95, "top_k": 40, "seed": 1234, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_dir(tmp_path_factory.mktemp("sampling") / "tiny-chat")


@pytest.fixture(scope="module")
def live(model_dir):
    with LiveServer(build_server(model_dir, max_batch=4)) as server:
        yield server


def cli_flags(settings: dict) -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]


def test_seeded_sampling_is_the_same_from_the_api_the_cli_and_the_server(model_dir, live, capsys):
    engine = Engine.from_dir(model_dir)
    settings = engine.defaults.updated(**SAMPLED)
    api = engine.complete([PROMPT], settings)[0]
    assert api != engine.complete([PROMPT], engine.defaults.updated(**{**SAMPLED, "seed": 99}))[0]  # it does sample
    assert api != engine.complete([PROMPT], engine.defaults.updated(max_new_tokens=24))[0]  # not greedy

    assert main(["generate", str(model_dir), "--prompt", PROMPT, *cli_flags(SAMPLED)]) == 0
    assert capsys.readouterr().out == api + "\n"

    body = {"model": "tiny-chat", "prompt": PROMPT, **{k: v for k, v in SAMPLED.items() if k != "max_new_tokens"}}
    body["max_tokens"] = SAMPLED["max_new_tokens"]
    completion = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
    assert completion["choices"][0]["text"] == api

    # a chat: the terminal's --prompts and the API's chat endpoint render the same conversation
    prompts = model_dir.parent / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n", encoding="utf-8")
    answers = model_dir.parent / "answers.jsonl"
    assert main(["chat", str(model_dir), "--prompts", str(prompts), "--output", str(answers), *cli_flags(SAMPLED)]) == 0
    terminal = json.loads(answers.read_text(encoding="utf-8"))["answer"]
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": PROMPT}], **body}
    del body["prompt"]
    chat = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert chat["choices"][0]["message"]["content"] == terminal
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    text = chat_format.render([{"role": "user", "content": PROMPT}])
    assert engine.complete([text], chat_format.settings(settings, engine.tokenizer))[0] == terminal


def test_defaults_come_from_generation_config(model_dir, tmp_path):
    assert generation_defaults(model_dir).temperature == 0  # tinylm saves do_sample: false
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 64})
    )
    got = generation_defaults(tmp_path)
    assert (got.temperature, got.top_p, got.top_k, got.max_new_tokens) == (0.7, 0.8, 20, 64)
    assert generation_defaults(tmp_path / "nothing-here") == SamplingSettings()
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match=r"generation_config\.json: temperature must be >= 0"):
        generation_defaults(tmp_path)
    # the command line wins over the model's defaults; what it leaves out stays
    assert SamplingSettings(temperature=0.5, top_k=3).updated(temperature=None, top_k=7) == SamplingSettings(
        temperature=0.5, top_k=7
    )


def test_a_rows_draws_do_not_depend_on_its_neighbours():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    alone = BatchSampler(50, "cpu")
    alone.add(SamplingSettings(temperature=1.0, seed=5), [1, 2])
    crowd = BatchSampler(50, "cpu")
    crowd.add(SamplingSettings(temperature=0), [3])
    crowd.add(SamplingSettings(temperature=1.0, seed=5), [1, 2])
    crowd.add(SamplingSettings(temperature=0.7, top_k=3, seed=8), [4])
    for _ in range(20):
        mine = alone.sample(logits[1:2])[0]
        tokens = crowd.sample(logits)
        assert tokens[1] == mine and tokens[0] == int(logits[0].argmax())
        alone.observe([mine])
        crowd.observe(tokens)


@pytest.mark.slow
def test_the_server_runs_the_compiled_decode_step(model_dir):
    """``tinylm serve --compile``: the scheduler steps through the engine's compiled decode step."""
    eager, compiled = Engine.from_dir(model_dir), Engine.from_dir(model_dir, compile=True)
    assert compiled.decode_step is not compiled.last_logits
    results = {}
    for name, engine in (("eager", eager), ("compiled", compiled)):
        scheduler = Scheduler(engine, max_batch=2)
        finished, tokens, ended = threading.Event(), {0: [], 1: []}, set()

        def on_event(event, tokens=tokens, finished=finished, ended=ended):
            assert event.error is None, event.error
            tokens[event.index].append(event.token_id)
            if event.finish_reason:
                ended.add(event.index)
                if len(ended) == 2:
                    finished.set()

        settings = SamplingSettings(max_new_tokens=12, temperature=0.9, seed=3, stop_token_ids=[])
        scheduler.submit(Request(engine.encode(PROMPT), settings, n=2), on_event)
        assert finished.wait(300), "the request never finished"
        scheduler.close()
        results[name] = tokens
    assert results["compiled"] == results["eager"] and results["eager"][0] != results["eager"][1]
