"""The server with documents: /v1/embeddings in OpenAI's shape (the encoder's own vectors, as floats or
base64), chat answers whose prompt carries the passages ``rag ask`` would give and whose response
carries their sources, bad input refused by name, and LangChain's OpenAI classes working against it."""

import base64
import json
import random

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import LiveServer, error_of, reference, tiny_chat_dir, tiny_encoder_dir
from test_rag import DOCS, write_docs

from tinylm.cli import main
from tinylm.rag.ask import Asker, with_passages
from tinylm.rag.embed import Embedder
from tinylm.rag.index import build_index
from tinylm.rag.search import Hit, Searcher
from tinylm.serve.app import build_server

pytest.importorskip("transformers")

QUESTION = "How many legs does the Grimum have?"
TEXTS = ["The Grimum has 8 legs.", "小明喜欢黄色。", "Where is Kyoto?"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Documents, an encoder, a hybrid index built with it, a lexical one, and a chat model with a
    1024-token context (its 300-token vocabulary spends about a token a byte: five passages take 500)."""
    root = tmp_path_factory.mktemp("serve-rag")
    docs = write_docs(root / "docs")
    torch.manual_seed(0)  # the encoder's random weights decide the dense half of the ranking
    encoder = tiny_encoder_dir(root / "encoder", list(DOCS.values()))
    build_index([docs], root / "hybrid.db", embedder=Embedder(encoder), progress=False)
    build_index([docs], root / "lexical.db", progress=False)
    return {"root": root, "encoder": encoder, "chat": tiny_chat_dir(root / "chat", max_len=1024)}


@pytest.fixture(scope="module")
def rag_live(made):
    """``tinylm serve CHAT --rag hybrid.db``: retrieval and /v1/embeddings with the index's encoder."""
    with LiveServer(build_server(made["chat"], rag=made["root"] / "hybrid.db", max_batch=4)) as server:
        yield server


@pytest.fixture(scope="module")
def rag_client(rag_live):
    return openai.OpenAI(base_url=rag_live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def prompts(rag_live, monkeypatch):
    """The prompt text of every request the server hands its scheduler, as the model sees it."""
    scheduler, seen = rag_live.server.scheduler, []
    submit = scheduler.submit

    def spy(request, on_event):
        seen.append(rag_live.server.engine.tokenizer.decode(request.prompt_ids))
        return submit(request, on_event)

    monkeypatch.setattr(scheduler, "submit", spy)
    return seen


def embed(live, **body):
    return httpx.post(live.url + "/v1/embeddings", json={"model": "encoder", **body}, timeout=60)


# -- /v1/embeddings ----------------------------------------------------------------------------------


def test_embeddings_are_the_encoders_unit_vectors_in_order(rag_live, made):
    answer = embed(rag_live, input=TEXTS)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list" and body["model"] == "encoder"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1), ("embedding", 2)]
    vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    encoder = Embedder(made["encoder"])
    assert vectors.shape == (3, encoder.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.array_equal(vectors, encoder.embed(TEXTS))  # exactly the encoder's, float32 for float32
    tokens = sum(len(ids) for ids in encoder.tokenizer(TEXTS)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    one = embed(rag_live, input=TEXTS[1]).json()  # a single string: the same vector (but for padding's rounding)
    assert np.allclose(one["data"][0]["embedding"], body["data"][1]["embedding"], atol=1e-6)


def test_base64_embeddings_decode_to_the_same_floats(rag_live, rag_client):
    floats = embed(rag_live, input=TEXTS).json()["data"]
    packed = embed(rag_live, input=TEXTS, encoding_format="base64", dimensions=32, user="ignored").json()["data"]
    for f, b in zip(floats, packed):
        assert np.array_equal(np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4"), np.float32(f["embedding"]))
    via_client = rag_client.embeddings.create(model="encoder", input=TEXTS)  # the client asks for base64
    assert [d.embedding for d in via_client.data] == [np.float32(f["embedding"]).tolist() for f in floats]
    models = [m.id for m in rag_client.models.list().data]
    assert models == ["chat", "encoder"] and rag_client.models.retrieve("encoder").dimensions == 32


@pytest.mark.parametrize(
    "body, param, says",
    [
        ({"input": []}, "input", "non-empty"),
        ({"input": ["a"] * 2049}, "input", "at most 2048"),
        ({"input": None}, "input", "non-empty"),
        ({"input": ["Grimum", 3]}, "input[1]", "token ids"),
        ({"input": [[1, 2, 3]]}, "input[0]", "token ids"),
        ({"input": [1, 2, 3]}, "input[0]", "token ids"),
        ({"input": ["Grimum", None]}, "input[1]", "must be a string"),
        ({"input": ""}, "input", "empty"),
        ({"input": "x" * 100_001}, "input", "100001 characters"),
        ({"input": ["Grimum", "legs " * 600]}, "input[1]", "longer than this encoder's 512 tokens"),
        ({"input": "Grimum", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "Grimum", "dimensions": 16}, "dimensions", "this encoder's 32"),
        ({"input": "Grimum", "truncate": True}, "truncate", "unrecognized"),
    ],
)
def test_bad_embedding_requests_name_the_field(rag_live, body, param, says):
    error = error_of(embed(rag_live, **body), 400)
    assert error["param"] == param and says in error["message"]


def test_embeddings_of_another_model_or_without_an_encoder_say_what_to_do(rag_live, live):
    error = error_of(httpx.post(rag_live.url + "/v1/embeddings", json={"model": "chat", "input": "x"}), 404)
    assert error["code"] == "model_not_found" and "serves 'encoder'" in error["message"]
    error = error_of(httpx.post(live.url + "/v1/embeddings", json={"model": "x", "input": "x"}), 400)
    assert error["code"] == "no_encoder" and "tinylm serve MODEL --embedder DIR" in error["message"]
    error = error_of(
        httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "rag": 1}),
        400,
    )
    assert error["param"] == "rag" and "boolean" in error["message"]
    body = {"messages": [{"role": "user", "content": "hi"}], "rag": True, "max_tokens": 2}
    error = error_of(httpx.post(live.url + "/v1/chat/completions", json=body), 400)
    assert error["param"] == "rag" and "--rag INDEX" in error["message"]


def test_random_bad_input_never_gets_a_500(rag_live):
    """Valid embeddings and --rag chat requests with fields replaced by values of every JSON type, or
    dropped: every answer is a 200 or a 4xx in OpenAI's shape, and the server answers afterwards."""
    rng = random.Random(0)
    values = [None, True, 0, -1, 2**70, 0.5, "", "x", "😀", "\ud800", "s" * 5000, [], [1], ["a"], [[]], [""], {}]
    values += ["float", "base64", 32, ["Grimum", "小明"], [{"role": "user", "content": "Kyoto"}]]
    requests = {  # a valid body, and the fields to spoil
        "/v1/embeddings": ({"input": ["Grimum legs"]}, ["model", "input", "encoding_format", "dimensions", "user"]),
        "/v1/chat/completions": (
            {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2},
            ["messages", "rag", "max_tokens", "user", "unknown"],
        ),
    }
    statuses = []
    for _ in range(100):
        path = rng.choice(list(requests))
        body, fields = dict(requests[path][0]), requests[path][1]
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.8:
                body[rng.choice(fields)] = rng.choice(values)
            elif body:
                body.pop(rng.choice(list(body)))
        response = httpx.post(
            rag_live.url + path, content=json.dumps(body), timeout=60, headers={"content-type": "application/json"}
        )
        statuses.append(response.status_code)
        assert response.status_code in (200, 400, 404), (body, response.text)
        if response.status_code != 200:
            error_of(response, response.status_code)
    assert statuses.count(200) > 15 and statuses.count(400) > 50  # both kinds were exercised
    assert embed(rag_live, input="Grimum").status_code == 200


# -- chat with retrieved passages ------------------------------------------------------------------------


def passages_of(sources: list[dict]) -> list[Hit]:
    return [Hit(s["source"], s["part"], s["start"], s["text"], s["score"]) for s in sources]


def test_a_chat_answer_reads_the_passages_rag_ask_would_give_and_cites_them(rag_live, rag_client, prompts, made):
    out = rag_client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": QUESTION}], temperature=0
    )
    sources = out.sources
    assert [s["index"] for s in sources] == list(range(1, len(sources) + 1)) and len(sources) >= 2
    assert sources[0]["source"].endswith("grimum.md") and "8 legs" in sources[0]["text"]
    assert set(sources[0]) == {"index", "source", "part", "start", "score", "text"}
    server = rag_live.server
    asker = Asker(server.engine, Searcher(made["root"] / "hybrid.db"))  # tinylm rag ask's prompt, same k
    turn, used = asker.turn(QUESTION)
    assert passages_of(sources) == used
    assert prompts == [server.chat_format.render([{"role": "user", "content": turn}])]
    assert out.usage.prompt_tokens == len(server.engine.encode(prompts[0]))
    want = reference(rag_live, [{"role": "user", "content": turn}], max_new_tokens=out.usage.completion_tokens)
    assert out.choices[0].message.content == want.text.lstrip()


def test_a_streamed_answer_brings_the_sources_in_its_first_chunk(rag_live, rag_client):
    kwargs = dict(
        model="chat", messages=[{"role": "user", "content": "小红喜欢什么颜色？"}], temperature=0, max_tokens=12
    )
    whole = rag_client.chat.completions.create(**kwargs)
    chunks = list(rag_client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].sources == whole.sources and "小明.txt" in whole.sources[0]["source"]
    assert all(not hasattr(c, "sources") or c.sources is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_only_the_last_question_gets_passages_and_a_request_may_opt_out(rag_live, prompts):
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Where is Kyoto?"},
        {"role": "assistant", "content": "In Japan."},
        {"role": "user", "content": QUESTION},
    ]
    url = rag_live.url + "/v1/chat/completions"
    body = httpx.post(url, json={"messages": conversation, "max_tokens": 4}, timeout=60).json()
    render = rag_live.server.chat_format.render
    turn = with_passages(QUESTION, passages_of(body["sources"]))
    assert prompts[-1] == render([*conversation[:-1], {"role": "user", "content": turn}])
    plain = httpx.post(url, json={"messages": conversation, "max_tokens": 4, "rag": False}, timeout=60).json()
    assert "sources" not in plain and prompts[-1] == render(conversation)
    prefill = [*conversation, {"role": "assistant", "content": "It has"}]  # nothing new was asked
    assert httpx.post(url, json={"messages": prefill, "max_tokens": 4}, timeout=60).json()["sources"] == []


def test_passages_give_way_to_the_reply_asked_for(rag_live, prompts):
    url, messages = rag_live.url + "/v1/chat/completions", [{"role": "user", "content": QUESTION}]
    full = httpx.post(url, json={"messages": messages, "max_tokens": 4}, timeout=60).json()
    longer = httpx.post(url, json={"messages": messages, "max_tokens": 600}, timeout=60).json()
    assert 0 < len(longer["sources"]) < len(full["sources"]) == 5  # the weakest passages were dropped
    assert longer["sources"] == full["sources"][: len(longer["sources"])]
    assert longer["usage"]["prompt_tokens"] + 600 <= 1024
    error = error_of(httpx.post(url, json={"messages": messages, "max_tokens": 900}, timeout=60), 400)
    assert error["code"] == "context_length_exceeded" and "'rag': false" in error["message"]


def test_the_chat_page_shows_the_sources_under_an_answer(rag_live, tmp_path):
    page = pytest.importorskip("test_serve_browser")  # skips, as those tests do, without selenium and Chromium
    options = page.webdriver.ChromeOptions()
    options.binary_location = page.CHROMIUM
    for flag in [*page.FLAGS, f"--user-data-dir={tmp_path}"]:
        options.add_argument(flag)
    driver = page.webdriver.Chrome(service=page.Service(executable_path=page.CHROMEDRIVER), options=options)
    try:
        page.open_page(driver, rag_live.url)
        page.settings(driver, temperature=0, max_tokens=4)
        bubble = page.send(driver, QUESTION)
        shown = driver.execute_script(
            "const box = arguments[0].querySelector('.sources');"
            "return [box.querySelector('summary').textContent, Array.from(box.querySelectorAll('li'), (li) => "
            "[li.value, li.firstChild.textContent, li.querySelector('.passage').textContent])]",
            bubble,
        )
    finally:
        driver.quit()
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    sources = httpx.post(rag_live.url + "/v1/chat/completions", json=body, timeout=60).json()["sources"]
    assert shown[0] == f"Sources ({len(sources)})"
    hits = passages_of(sources)
    assert shown[1] == [[s["index"], f"{h.where()} (score {h.score:.3f})", h.text] for s, h in zip(sources, hits)]


# -- how a server is started ---------------------------------------------------------------------------


def test_serve_flags_reach_the_server(made, monkeypatch, capsys):
    import tinylm.serve.app as app

    started = []
    monkeypatch.setattr(app, "serve", lambda server, *args: started.append(server))
    root = made["root"]
    argv = ["serve", str(made["chat"]), "--rag", str(root / "hybrid.db"), "--rag-k", "2"]
    assert main([*argv, "--embedder", str(made["encoder"]), "--query-prefix", ""]) == 0
    retrieval = started[0].retrieval
    assert (retrieval.k, retrieval.searcher.mode, retrieval.encoder_name) == (2, "hybrid", "encoder")
    retrieval.close()
    assert main(["serve", str(made["chat"]), "--embedder", str(made["encoder"])]) == 0
    assert started[1].retrieval.searcher is None and started[1].retrieval.embedder.dim == 32
    started[1].retrieval.close()
    assert main([*argv[:2], "--rag", str(root / "lexical.db"), "--embedder", str(made["encoder"])]) == 2
    assert "built without an encoder" in capsys.readouterr().err
    assert main([*argv[:2], "--rag", str(root / "missing.db")]) == 2
    assert "no such index" in capsys.readouterr().err


# -- a framework against the server ----------------------------------------------------------------------


def test_langchain_embeds_and_chats_through_its_openai_classes(rag_live, rag_client, made):
    langchain_openai = pytest.importorskip("langchain_openai")

    base = rag_live.url + "/v1"
    embeddings = langchain_openai.OpenAIEmbeddings(
        base_url=base, api_key="unused", model="encoder", check_embedding_ctx_length=False, max_retries=0
    )
    want = Embedder(made["encoder"]).embed(TEXTS)
    assert np.array_equal(np.float32(embeddings.embed_documents(TEXTS)), want)
    assert np.array_equal(np.float32(embeddings.embed_query(TEXTS[0])), want[0])

    chat = langchain_openai.ChatOpenAI(
        base_url=base, api_key="unused", model="chat", temperature=0, max_tokens=8, max_retries=0
    )
    direct = rag_client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=8
    )
    assert chat.invoke(QUESTION).content == direct.choices[0].message.content
    assert "".join(chunk.content for chunk in chat.stream(QUESTION)) == direct.choices[0].message.content
