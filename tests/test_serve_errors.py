"""The server's answer to bad input: every bad field gets OpenAI's error shape naming it (never a 500),
oversized bodies and inputs are refused before any work, shutdown tells clients why, and only the
right Host names and API keys get in."""

import json
import random
import socket
import threading

import httpx
import openai
import pytest
from conftest import QUESTION, LiveServer, error_of, tiny_chat_dir, wait_until

from tinylm.serve.app import build_server

KEY = "sk-test-key"


# -- errors --------------------------------------------------------------------------------------


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
