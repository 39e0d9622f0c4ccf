"""The server against the official ``openai`` client and raw HTTP: answers equal the engine's, streams
follow the spec, every bad input gets OpenAI's error shape (never a 500), and 32 concurrent streams
with disconnects leave the server healthy."""

import base64
import io
import json
import random
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from tests.conftest import LiveServer, tiny_chat_dir, wait_until
from tinylm.infer.sampling import SamplingSettings
from tinylm.serve.app import build_server

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    model_dir = tiny_chat_dir(tmp_path_factory.mktemp("serve") / "tiny-chat")
    with LiveServer(build_server(model_dir, max_batch=8, max_body=2**20)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(live, messages=None, prompt=None, **settings):
    """What the engine alone generates for the same request (greedy): the Completion."""
    server = live.server
    if messages is not None:
        text = server.chat_format.render(messages)
        settings = server.chat_format.settings(SamplingSettings(temperature=0, **settings), server.engine.tokenizer)
    else:
        stop_ids = sorted({server.engine.tokenizer.eos_id, *server.eos_token_ids})  # as generation_config.json says
        text, settings = prompt, SamplingSettings(temperature=0, stop_token_ids=stop_ids, **settings)
    return server.engine.run([text], settings)[0]


QUESTION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "小明喜欢什么颜色？ the cat"}]


# -- answers -------------------------------------------------------------------------------------


def test_models(client, live):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat"]
    card = httpx.get(live.url + "/v1/models/tiny-chat").json()
    assert card["context_length"] == 128 and card["vision"] is False


def test_chat_equals_the_engine_and_counts_usage(client, live):
    out = client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0, max_tokens=24)
    want = reference(live, QUESTION, max_new_tokens=24)
    assert out.choices[0].message.content == want.text.lstrip()
    assert out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(want.prompt_ids)
    assert out.usage.completion_tokens == len(want.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_stream_follows_the_spec(client, live):
    whole = client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=0, max_tokens=40)
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat",
            messages=QUESTION,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in content]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_n_choices_stream_apart(client):
    kwargs = dict(model="tiny-chat", messages=QUESTION, temperature=1.0, seed=5, max_tokens=12, n=2)
    whole = client.chat.completions.create(**kwargs)
    streamed, roles = {}, []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            roles += [choice.index] if choice.delta.role else []
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(roles) == [0, 1]
    assert [streamed[i] for i in (0, 1)] == [c.message.content for c in whole.choices]
    assert whole.choices[0].message.content != whole.choices[1].message.content


def test_raw_stream_ends_with_done(live):
    body = {"messages": QUESTION, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_multibyte_characters_are_never_split(live):
    """Greedy continuations that hold Chinese characters spread over several tokens: the streamed
    pieces join to exactly the decoded ids, with no replacement character from a split."""
    tokenizer = live.server.engine.tokenizer
    checked = 0
    for prompt in ["小明", "你好 世界", "黄色", "喜欢", "小红喜欢"]:
        ids = live.server.engine.generate(
            [tokenizer.encode(prompt)], SamplingSettings(max_new_tokens=30, temperature=0)
        )[0]
        text = tokenizer.decode([i for i in ids if i != tokenizer.eos_id], skip_special_tokens=True)
        body = {"prompt": prompt, "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body) as response:
            pieces = [
                json.loads(line[6:])["choices"][0]["text"]
                for line in response.iter_lines()
                if line.startswith("data: {")
            ]
        assert "".join(pieces) == text
        wide = [ch for ch in text if len(ch.encode()) > 1 and ch != "\ufffd"]
        checked += sum(len(tokenizer.encode(ch)) > 1 for ch in wide)
    assert checked > 0  # some character really was spread over several tokens


def test_completions_n_seed_and_sampling(client):
    kwargs = dict(model="tiny-chat", prompt="the cat", max_tokens=12, temperature=1.0, top_p=0.95, seed=11, n=3)
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    streamed = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == [c.text for c in first.choices]
    batch = client.completions.create(model="tiny-chat", prompt=["the cat", "你好"], max_tokens=6, temperature=0, n=2)
    assert len(batch.choices) == 4 and batch.choices[0].text == batch.choices[1].text


def test_stop_strings_never_leak(client, live):
    full = reference(live, QUESTION, max_new_tokens=40).text.lstrip()
    stop = full[6:9]  # a piece of the greedy answer, so the stop really fires
    assert stop and stop in full
    want = full[: full.index(stop)]
    out = client.chat.completions.create(
        model="tiny-chat", messages=QUESTION, temperature=0, max_tokens=40, stop=[stop, "zzzz"]
    )
    assert out.choices[0].message.content == want and out.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny-chat", messages=QUESTION, temperature=0, max_tokens=40, stop=stop, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == want


def test_logprobs(client, live):
    out = client.chat.completions.create(
        model="tiny-chat", messages=QUESTION, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3
    )
    entries = out.choices[0].logprobs.content
    want = reference(live, QUESTION, max_new_tokens=10)
    stop_ids = live.server.chat_format.settings(SamplingSettings(), live.server.engine.tokenizer).stop_token_ids
    ended_by_token = want.token_ids[-1] in stop_ids
    assert len(entries) == out.usage.completion_tokens - ended_by_token  # the stop token has no entry
    # each entry holds the model's own log-probabilities at its position: the top 3, and the chosen token's
    ids = want.prompt_ids + want.token_ids
    with torch.no_grad():
        model_logprobs = live.server.engine.model(torch.tensor([ids]))[0].log_softmax(-1)
    for position, entry in enumerate(entries, start=len(want.prompt_ids) - 1):
        top = model_logprobs[position].topk(3).values.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=1e-4)
        assert entry.logprob == pytest.approx(top[0], abs=1e-4)  # greedy picks the most likely token
    raw = b"".join(bytes(e.bytes) for e in entries)
    assert raw.decode("utf-8", errors="replace").lstrip().startswith(out.choices[0].message.content[:3])
    legacy = client.completions.create(
        model="tiny-chat", prompt="the cat", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    assert len(legacy.choices[0].logprobs.token_logprobs) == 5 and len(legacy.choices[0].logprobs.top_logprobs[0]) <= 2
    offsets, text = legacy.choices[0].logprobs.text_offset, legacy.choices[0].text
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(text)


def test_penalties_and_extras_are_accepted(client):
    out = client.chat.completions.create(
        model="tiny-chat",
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=1.0,
        extra_body={"top_k": 5, "repetition_penalty": 1.3},
    )
    plain = client.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=12, temperature=0)
    assert out.choices[0].message.content != plain.choices[0].message.content


def test_defaults_come_from_generation_config(live):
    # tinylm saves do_sample: false, so a request without temperature is greedy (and repeatable)
    body = {"messages": QUESTION, "max_tokens": 16}
    answers = {
        httpx.post(live.url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        for _ in range(3)
    }
    assert answers == {reference(live, QUESTION, max_new_tokens=16).text.lstrip()}
    no_room = httpx.post(live.url + "/v1/chat/completions", json={"messages": QUESTION}).json()
    assert (
        no_room["usage"]["prompt_tokens"] + no_room["usage"]["completion_tokens"] <= 128
    )  # the default is cut to the room left


# -- errors --------------------------------------------------------------------------------------


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"messages": QUESTION, "temperature": 2.5}, "temperature"),
        ({"messages": QUESTION, "top_p": -0.1}, "top_p"),
        ({"messages": QUESTION, "n": 0}, "n"),
        ({"messages": QUESTION, "n": 99}, "n"),
        ({"messages": QUESTION, "n": True}, "n"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": QUESTION, "stop": [3]}, "stop"),
        ({"messages": QUESTION, "presence_penalty": 3}, "presence_penalty"),
        ({"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": QUESTION, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": QUESTION, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": QUESTION, "logit_bias": {"5": 10}}, "logit_bias"),
        ({"messages": QUESTION, "seed": "x"}, "seed"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": QUESTION, "max_tokens": 500}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "the cat sat " * 80}]}, "messages"),
    ],
)
def test_bad_chat_requests_name_the_field(live, body, param):
    error = error_of(httpx.post(live.url + "/v1/chat/completions", json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_context_errors_say_why(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "the cat sat " * 80}])
    assert info.value.code == "context_length_exceeded" and "128" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-chat", prompt="the cat", max_tokens=200)
    assert info.value.param == "max_tokens" and "at most" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [5, 999999]}, "prompt"),
        ({"prompt": [[1, 2], 3]}, "prompt[1]"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": ["a"] * 5, "n": 2}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_completion_requests_name_the_field(live, body, param):
    assert error_of(httpx.post(live.url + "/v1/completions", json=body), 400)["param"] == param


def test_malformed_and_oversized_bodies(live):
    url = live.url + "/v1/chat/completions"
    as_json = {"content-type": "application/json"}
    for raw in [
        b"{bad",
        b"",
        b"[1, 2]",
        b'"text"',
        b'{"messages": NaN}',
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"prompt": "\\ud800", "max_tokens": 3}',
        b'{"model": "\\udfff"}',
        b'{"\\ud800": 1}',
    ]:
        error_of(httpx.post(url, content=raw, headers=as_json), 400)
    error_of(httpx.post(url, content=b" " * (2**20 + 1), headers=as_json), 413)
    status, body = raw_http(
        live,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 99999999999\r\n\r\n{}",
    )
    assert status == 413 and body["error"]["code"] == "request_too_large"  # refused before reading a byte of it

    def chunked():
        for _ in range(40):
            yield b" " * 65536

    error_of(httpx.post(url, content=chunked(), headers=as_json), 413)  # no content-length: counted as it arrives
    # a form or plain-text post (what another web page can send unasked) is refused
    for kind in ["text/plain", "application/x-www-form-urlencoded", None]:
        headers = {"content-type": kind} if kind else {}
        assert (
            error_of(httpx.post(url, content=json.dumps({"messages": QUESTION}), headers=headers), 415)["code"]
            == "unsupported_media_type"
        )
    error_of(httpx.get(live.url + "/v1/nowhere"), 404)
    error_of(httpx.get(url), 405)


def raw_http(live, request: bytes) -> tuple[int, dict]:
    """Send bytes no HTTP client would (a false Content-Length); the status and JSON body of the reply."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
            reply.lower().split(b"content-length: ")[1].split(b"\r\n")[0]
        ):
            reply += sock.recv(65536)
    head, body = reply.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def test_huge_inputs_are_refused_at_once(live, monkeypatch):
    """Sizes that would cost time or memory are refused before the work: a prompt far longer than the
    context is not tokenized, a list of prompts longer than the batch is not encoded, and a long stop
    string is not matched."""
    url = live.url + "/v1/completions"
    engine, encoded = live.server.engine, []
    encode = engine.encode

    def counting_encode(text, *args, **kwargs):
        encoded.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(engine, "encode", counting_encode)
    assert httpx.post(url, json={"prompt": "the cat", "max_tokens": 1}).status_code == 200
    assert encoded == [len("the cat")]  # the count sees what the server tokenizes
    encoded.clear()
    big = error_of(httpx.post(url, json={"prompt": "the cat sat. " * 75_000, "max_tokens": 3}, timeout=60), 400)
    many = error_of(httpx.post(url, json={"prompt": ["a"] * 200_000}, timeout=60), 400)
    assert big["code"] == "context_length_exceeded" and many["param"] == "prompt"
    assert encoded == []  # refused before any of it was tokenized
    assert error_of(httpx.post(url, json={"prompt": "a", "stop": "x" * 201}), 400)["param"] == "stop"


def test_shutdown_tells_clients_why(tmp_path, monkeypatch):
    model_dir = tiny_chat_dir(tmp_path / "closing")
    with LiveServer(build_server(model_dir, max_batch=1)) as live:
        scheduler, model = live.server.scheduler, live.server.engine.model
        step, decoded, held, release = model.hidden_states, [], threading.Event(), threading.Event()

        def held_step(*args, **kwargs):  # from the 8th token on, decoding waits for the test: the reply is running
            if kwargs.get("cache") is scheduler.cache:
                decoded.append(None)
                if len(decoded) >= 8:
                    held.set()
                    release.wait(timeout=30)
            return step(*args, **kwargs)

        monkeypatch.setattr(model, "hidden_states", held_step)
        body = {"prompt": "the cat", "max_tokens": 100, "ignore_eos": True, "stream": True}
        results = []
        queued = threading.Thread(
            target=lambda: results.append(httpx.post(live.url + "/v1/completions", json={"prompt": "a"}, timeout=30))
        )
        closing = threading.Thread(target=scheduler.close)
        try:
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as response:
                wait_until(held.is_set, "the streamed reply to reach its 8th token")
                queued.start()
                wait_until(lambda: scheduler.stats()["waiting"] == 1, "the second request to wait for the slot")
                closing.start()
                wait_until(lambda: scheduler.closed, "the scheduler to begin closing")
                release.set()
                lines = [line for line in response.iter_lines() if line]
        finally:
            release.set()
        closing.join(timeout=30)
        queued.join(timeout=30)
        assert '"shutting_down"' in lines[-2] and lines[-1] == "data: [DONE]", lines
        begun = [json.loads(line.removeprefix("data: "))["choices"][0] for line in lines[:-2]]
        assert "".join(c["text"] for c in begun) and not any(c["finish_reason"] for c in begun), lines
        assert results and results[0].status_code == 503 and results[0].json()["error"]["code"] == "shutting_down"
        assert error_of(httpx.post(live.url + "/v1/completions", json={"prompt": "a"}), 503)["code"] == "shutting_down"


def test_loopback_server_answers_only_to_loopback_names(live):
    live.server.allowed_hosts = {"127.0.0.1", "localhost", "[::1]"}
    try:
        assert httpx.get(live.url + "/health").status_code == 200
        port = live.url.rsplit(":", 1)[1]
        assert httpx.get(f"http://localhost:{port}/health").status_code == 200
        rebound = httpx.get(live.url + "/v1/models", headers={"host": f"attacker.example:{port}"})
        assert error_of(rebound, 400)["code"] == "invalid_host"
    finally:
        live.server.allowed_hosts = None


def test_api_key(tmp_path):
    model_dir = tiny_chat_dir(tmp_path / "keyed")
    with LiveServer(build_server(model_dir, max_batch=2, api_key=KEY)) as live:
        good = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="keyed", messages=QUESTION, max_tokens=3).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
        assert (
            error_of(httpx.post(live.url + "/v1/completions", json={"prompt": "hi"}), 401)["code"] == "invalid_api_key"
        )
        assert httpx.get(live.url + "/health").status_code == 200  # health and the page stay open
        assert httpx.get(live.url + "/").status_code == 200


def test_random_bad_input_never_gets_a_500(live):
    """A fuzzer: valid requests with fields replaced by values of every JSON type and edge values,
    fields dropped and added, and random bytes. Every answer is a 200 or a 4xx in OpenAI's shape."""
    rng = random.Random(0)
    values = [
        None,
        True,
        False,
        0,
        -1,
        1,
        2**70,
        -(2**70),
        0.5,
        -0.0,
        1e308,
        -1e308,
        "",
        "x",
        "😀" * 3,
        "<image>",
        "\ud800",
        "s" * 5000,
        ["t" * 300],
        [],
        [1],
        ["a"],
        [[]],
        {},
        {"a": 1},
        {"type": "text"},
        {"include_usage": "yes"},
        [{"role": "user"}],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    ]
    fields = [
        "model",
        "messages",
        "prompt",
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "n",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logprobs",
        "top_logprobs",
        "stream",
        "stream_options",
        "logit_bias",
        "response_format",
        "echo",
        "best_of",
        "suffix",
        "user",
        "unknown_field",
    ]
    base = {
        "/v1/chat/completions": {"messages": QUESTION, "max_tokens": 4},
        "/v1/completions": {"prompt": "the cat", "max_tokens": 4},
    }
    statuses = {}
    for trial in range(400):
        path = rng.choice(list(base))
        body = dict(base[path])
        for _ in range(rng.randint(1, 3)):
            action = rng.random()
            if not isinstance(body, dict):
                break
            if action < 0.7:
                body[rng.choice(fields)] = rng.choice(values)
            elif action < 0.85 and body:
                body.pop(rng.choice(list(body)))
            else:
                body = rng.choice(values)  # not an object at all
        if trial % 20 == 0:
            content = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        else:
            content = json.dumps(body).encode()  # ASCII, with "\ud800" as a lone surrogate escape
        response = httpx.post(
            live.url + path, content=content, timeout=60, headers={"content-type": "application/json"}
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400, 404), (body, response.text)
        if response.status_code != 200:
            error_of(response, response.status_code)
        elif "text/event-stream" in response.headers["content-type"]:
            assert response.text.rstrip().endswith("data: [DONE]")
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) > 100  # both kinds were exercised
    assert httpx.post(live.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 3}).status_code == 200


# -- concurrency ---------------------------------------------------------------------------------


def test_32_concurrent_streams_with_disconnects(live):
    """32 streaming clients at once on an 8-slot server, every fourth hanging up after a few chunks:
    the others get exactly their greedy answers, the leavers' slots are freed, the server stays well."""
    prompts = [f"{random.Random(i).choice(['the cat', 'the dog', '你好', 'hello there'])} {i}" for i in range(32)]
    expected = {i: reference(live, prompt=p, max_new_tokens=40) for i, p in enumerate(prompts)}
    results, errors = {}, []

    def client_thread(i):
        try:
            body = {"prompt": prompts[i], "max_tokens": 40, "temperature": 0, "stream": True}
            pieces, finish = [], None
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=120) as response:
                for n, line in enumerate(response.iter_lines()):
                    if i % 4 == 3 and n >= 6:
                        return  # hang up mid-stream
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        pieces.append(choice["text"])
                        finish = choice["finish_reason"] or finish
            results[i] = ("".join(pieces), finish)
        except Exception as e:  # collected, so the assertion below shows it
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 180
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not [i for i, t in enumerate(threads) if t.is_alive()], "clients still streaming after 180 s"
    assert not errors, errors
    for i in range(32):
        if i % 4 != 3:
            assert results[i] == (expected[i].text, expected[i].finish_reason), i

    def idle():
        stats = httpx.get(live.url + "/health").json()
        return stats["running"] == 0 and stats["waiting"] == 0

    wait_until(idle, "the leavers' slots to be freed")
    assert httpx.post(live.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 3}).status_code == 200


def test_a_non_streaming_client_that_leaves_cancels_its_generation(live):
    scheduler = live.server.scheduler
    body = {"prompt": "the cat", "max_tokens": 120, "temperature": 1.0, "stop": "zzzz", "ignore_eos": True}
    body = json.dumps(body).encode()  # nothing but the client's leaving can end it before 120 tokens
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: scheduler.stats()["running"], "the request to start generating")
        steps = scheduler.steps
    wait_until(lambda: scheduler.stats()["running"] == 0, "the generation to end after its client left")
    assert scheduler.steps - steps < 110  # it stopped early, not after all 120 tokens


# -- pictures --------------------------------------------------------------------------------------


def png_url(color):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_vision_language_model_sees_data_url_pictures(tmp_path):
    from tests.test_vlm_training import tiny_vlm_dir
    from tinylm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(
        ["What colour is the shape? It is red.", "这个图形是什么颜色的？它是红色的。"] * 20, vocab_size=300
    )
    model_dir = tiny_vlm_dir(tmp_path / "vlm", tokenizer)
    with LiveServer(build_server(model_dir, max_batch=4)) as live:
        assert httpx.get(live.url + "/v1/models").json()["data"][0]["vision"] is True
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        answers = {}
        for color in ["red", "blue"]:
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_url(color)}},
                        {"type": "text", "text": "What colour is the shape?"},
                    ],
                }
            ]
            out = client.chat.completions.create(
                model="vlm", messages=messages, temperature=0, max_tokens=12, logprobs=True
            )
            answers[color] = out.choices[0].logprobs.content[0].logprob
            # the engine alone, with the same picture, says the same
            server = live.server
            from tinylm.image_processor import load_image

            picture = load_image(base64.b64decode(png_url(color).split(",")[1]))
            prompt = server.chat_format.render([{"role": "user", "content": "<image>\nWhat colour is the shape?"}])
            settings = server.chat_format.settings(
                SamplingSettings(max_new_tokens=12, temperature=0), server.engine.tokenizer
            )
            assert (
                out.choices[0].message.content
                == server.engine.run([prompt], settings, images=[[picture]])[0].text.lstrip()
            )
        assert answers["red"] != answers["blue"]  # the picture reached the model
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
        assert error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": bad}), 400)["param"].endswith(
            "image_url.url"
        )
        broken = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}
        ]
        assert (
            "not a readable image"
            in error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": broken}), 400)["message"]
        )
        tag = [{"role": "user", "content": "<image> what?"}]
        error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": tag}), 400)
        image_token = live.server.engine.vlm.config.image_token_id
        assert (
            "image token"
            in error_of(httpx.post(live.url + "/v1/completions", json={"prompt": [5, image_token, 6]}), 400)["message"]
        )
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (5000, 5000), "red").save(buffer, format="PNG")  # small on the wire, 75 MB decoded
        huge = [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()},
                    }
                ],
            }
        ]
        assert (
            "5000x5000"
            in error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": huge}), 400)["message"]
        )


def test_a_text_model_refuses_pictures(live):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url("red")}}]}]
    assert (
        "no vision tower"
        in error_of(httpx.post(live.url + "/v1/chat/completions", json={"messages": messages}), 400)["message"]
    )


def test_the_page_is_served(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "<title>tinylm chat</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
