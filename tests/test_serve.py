"""The server against the official ``openai`` client and raw HTTP: answers equal the engine's, streams
follow the spec, and 32 concurrent streams with disconnects leave the server healthy. Bad input is
tests/test_serve_errors.py; pictures tests/test_serve_vision.py."""

import json
import random
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import QUESTION, reference, reply_text, wait_until

from tinylm.infer.sampling import SamplingSettings

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
        text = reply_text(tokenizer, ids)  # a reasoning marker a random model writes is shown too
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


def test_the_page_is_served(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "<title>tinylm chat</title>" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
