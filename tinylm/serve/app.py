"""The HTTP side: OpenAI's endpoints over the scheduler, the web chat page, and the limits.

    GET  /                      the web chat page (one static file, no external assets)
    GET  /health                liveness, and how busy the scheduler is
    GET  /v1/models             the one model served
    POST /v1/chat/completions   a conversation in, the assistant's reply out (streamed or whole)
    POST /v1/completions        a prompt in, its continuation out
    POST /v1/embeddings         texts in, their vectors out (with --embedder, or an index's encoder)

A request is read (at most ``max_body`` bytes), checked field by field (``protocol``), and submitted
to the scheduler, all before the response starts: so every mistake gets OpenAI's error shape with the
right status, and a streamed reply, once begun, only carries the model's output. The scheduler's
thread hands each ``Event`` to the event loop; a client that goes away cancels its request, and the
scheduler frees its slot at the next step. With ``--rag``, a chat answer's prompt carries the passages
retrieved for its question, and the response their sources (``retrieval``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinylm.hub.models import hub_reference, resolve_model
from tinylm.infer.chat import ChatFormat, chat_format_for
from tinylm.infer.engine import Engine
from tinylm.infer.sampling import SamplingSettings, generation_eos_ids
from tinylm.infer.scheduler import Event, QueueFull, Scheduler
from tinylm.rag.embed import Embedder
from tinylm.serve.protocol import (
    APIError,
    Embeddings,
    Generation,
    chat_request,
    completion_request,
    embedding_request,
    parse_json,
)
from tinylm.serve.retrieval import Retrieval

PAGE = Path(__file__).parent / "static" / "index.html"
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'"
)


class JSON(JSONResponse):
    """JSON in ASCII: a client's text repeated in an error, or a model's, can never break the encoding."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


@dataclass
class Server:
    """What every route shares. ``allowed_hosts``: the Host names requests may carry (None: any);
    a server on loopback answers only to loopback names, so a web page cannot reach it through a
    DNS name of its own that points at 127.0.0.1."""

    engine: Engine
    scheduler: Scheduler
    name: str
    defaults: SamplingSettings  # the model's generation_config.json: what a request leaves out
    eos_token_ids: list[int]  # ... and the tokens it says a completion may end on
    chat_format: ChatFormat
    api_key: str | None = None
    max_body: int = 16 * 2**20
    allowed_hosts: set[str] | None = None
    retrieval: Retrieval | None = None  # --rag's index and the text encoder, when given
    created: int = field(default_factory=lambda: int(time.time()))

    def model_card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "tinylm",
            "context_length": self.scheduler.max_len,
            "vision": self.engine.vlm is not None,
            "defaults": {
                "temperature": self.defaults.temperature,
                "top_p": self.defaults.top_p,
                "top_k": self.defaults.top_k,
                "repetition_penalty": self.defaults.repetition_penalty,
                "max_tokens": self.defaults.max_new_tokens,
            },
        }

    def cards(self) -> list[dict]:
        """The chat model, then the text encoder when there is one."""
        cards = [self.model_card()]
        encoder = self.retrieval.embedder if self.retrieval is not None else None
        if encoder is not None:
            cards.append(
                {
                    "id": self.retrieval.encoder_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "tinylm",
                    "context_length": encoder.max_length,
                    "dimensions": encoder.dim,
                }
            )
        return cards


def create_app(server: Server) -> Starlette:
    html = PAGE.read_text(encoding="utf-8")

    async def page(request: Request) -> Response:
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_POLICY})

    async def health(request: Request) -> Response:
        return JSON({"status": "ok", "model": server.name, **server.scheduler.stats()})

    async def models(request: Request) -> Response:
        authorize(server, request)
        return JSON({"object": "list", "data": server.cards()})

    async def model(request: Request) -> Response:
        authorize(server, request)
        for card in server.cards():
            if card["id"] == request.path_params["name"]:
                return JSON(card)
        raise APIError(
            f"the model '{request.path_params['name']}' does not exist", "model", 404, code="model_not_found"
        )

    async def chat(request: Request) -> Response:
        return await generate(server, request, chat_request)

    async def completions(request: Request) -> Response:
        return await generate(server, request, completion_request)

    async def embeddings(request: Request) -> Response:
        embedding = embedding_request(await read_request(server, request), server)
        vectors, tokens = await server.retrieval.embed(embedding)
        body = embedding_body(embedding, vectors, tokens, server.retrieval.encoder_name)
        return await run_in_threadpool(JSON, body)  # thousands of vectors take a while to write as JSON

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]
    handlers = {APIError: api_error, HTTPException: http_error, Exception: server_error}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.scheduler.close()
        if server.retrieval is not None:
            server.retrieval.close()

    return HostCheck(Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan), server)


class HostCheck:
    """ASGI middleware: refuse requests whose Host header is not one of the server's ``allowed_hosts``."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        allowed = self.server.allowed_hosts
        if scope["type"] == "http" and allowed is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
            if name.lower() not in allowed:
                error = APIError(
                    f"this server answers to {', '.join(sorted(allowed))}, not to the host {host!r}",
                    status=400,
                    code="invalid_host",
                )
                await JSON(error.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- errors --------------------------------------------------------------------------------------


async def api_error(request: Request, error: APIError) -> Response:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSON(error.body(), status_code=error.status, headers=headers)


async def http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own (unknown path, wrong method) in OpenAI's shape."""
    what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    body = APIError(what.get(error.status_code, str(error.detail)), status=error.status_code).body()
    return JSON(body, status_code=error.status_code, headers=getattr(error, "headers", None))


async def server_error(request: Request, error: Exception) -> Response:
    body = APIError(f"the server failed: {type(error).__name__}", status=500, type="server_error").body()
    return JSON(body, status_code=500)


def authorize(server: Server, request: Request) -> None:
    if server.api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), server.api_key.encode()):
        message = "missing API key: send 'Authorization: Bearer KEY'" if not key else "incorrect API key"
        raise APIError(message, status=401, code="invalid_api_key")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be longer than ``limit``."""
    too_big = APIError(
        f"the request body is larger than this server's limit of {limit} bytes (--max-body-mb)",
        status=413,
        code="request_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(server: Server, request: Request) -> dict:
    """An authorized POST's JSON object."""
    authorize(server, request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":  # also keeps other web pages' form posts out (they cannot send JSON unasked)
        raise APIError(
            f"the request body must be JSON, sent with 'Content-Type: application/json' (got {kind or 'none'!r})",
            status=415,
            code="unsupported_media_type",
        )
    return parse_json(await read_body(request, server.max_body))


# -- embeddings ------------------------------------------------------------------------------------


def embedding_body(embedding: Embeddings, vectors, tokens: int, model: str) -> dict:
    """OpenAI's response: each vector as JSON numbers, or as base64 of its little-endian float32 bytes."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if embedding.base64 else v.tolist(),
        }
        for i, v in enumerate(vectors)
    ]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# -- generation ------------------------------------------------------------------------------------


async def generate(server: Server, request: Request, parse) -> Response:
    data = await read_request(server, request)
    try:  # in a worker thread: tokenizing a long conversation or decoding pictures must not stall other streams
        generation = await run_in_threadpool(parse, data, server)
    except ValueError as e:  # the engine's own checks (image tags, prompt ids) are the client's input too
        raise APIError(str(e)) from None
    events = submit(server, generation)
    answer = Answer(server, generation)
    if generation.stream:
        return StreamingResponse(
            answer.stream(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await whole(answer, events, request)


def submit(server: Server, generation: Generation) -> AsyncIterator[tuple[int, Event]]:
    """Submit every request of ``generation`` now (so refusals become errors before any response);
    returns the iterator of (choice index, event) that cancels them all when closed."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tickets = []
    try:
        for i, request in enumerate(generation.requests):

            def on_event(event, i=i):
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))

            tickets.append(server.scheduler.submit(request, on_event))
    except (QueueFull, ValueError, RuntimeError) as e:
        for ticket in tickets:
            ticket.cancel()
        if isinstance(e, QueueFull):
            raise APIError(str(e), status=429, code="server_busy") from None
        if isinstance(e, ValueError):
            raise APIError(str(e)) from None
        raise APIError("the server is shutting down", status=503, type="server_error", code="shutting_down") from None

    async def events():
        remaining = generation.n * len(generation.requests)
        try:
            while remaining:
                i, event = await queue.get()
                if event.error is not None:
                    closing = server.scheduler.closed
                    raise APIError(
                        event.error,
                        status=503 if closing else 500,
                        type="server_error",
                        code="shutting_down" if closing else None,
                    )
                if event.finish_reason is not None:
                    remaining -= 1
                yield i * generation.n + event.index, event
        finally:
            for ticket in tickets:
                ticket.cancel()

    return events()


async def whole(answer: Answer, events, request: Request) -> Response:
    """Wait for the whole answer, or for the client to go away (which cancels the generation)."""

    async def collect():
        async for index, event in events:
            answer.add(index, event)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left (or the server is stopping): cancelling ends the tickets
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    work.result()  # re-raises a failed generation as its APIError
    return JSON(answer.body())


class Answer:
    """Builds the response of one request, event by event: the whole body, or its stream of chunks."""

    def __init__(self, server: Server, generation: Generation):
        self.server, self.generation = server, generation
        self.id = ("chatcmpl-" if generation.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        choices = generation.n * len(generation.requests)
        self.texts = [[] for _ in range(choices)]
        self.chars = [0] * choices  # each choice's text length so far (where its next token's text begins)
        self.started = [False] * choices  # a chat reply's leading whitespace is dropped
        self.tokens = [0] * choices
        self.logprobs = [[] for _ in range(choices)]
        self.pending = [[] for _ in range(choices)]  # logprobs not yet sent with a stream chunk
        self.finish = [None] * choices

    # -- bookkeeping ---------------------------------------------------------------------------

    def add(self, index: int, event: Event) -> str:
        """Record one event; return the text it adds to the choice."""
        text = event.text
        if self.generation.chat and not self.started[index]:
            text = text.lstrip()
            self.started[index] = bool(text)
        offset = self.chars[index]
        self.texts[index].append(text)
        self.chars[index] += len(text)
        if event.token_id is not None:
            self.tokens[index] += 1
        if event.logprob is not None:
            entry = self.logprob_entry(event, offset)
            self.logprobs[index].append(entry)
            self.pending[index].append(entry)
        self.finish[index] = event.finish_reason
        return text

    def token_text(self, token_id: int) -> tuple[str, bytes]:
        """A token as text (U+FFFD for part of a character) and as its exact bytes."""
        tokenizer = self.server.engine.tokenizer
        return tokenizer.decode([token_id]), tokenizer.token_bytes(token_id)

    def logprob_entry(self, event: Event, offset: int) -> dict:
        token, raw = self.token_text(event.logprob.token_id)
        top = [(self.token_text(t), lp) for t, lp in event.logprob.top]
        return {
            "token": token,
            "logprob": event.logprob.logprob,
            "bytes": list(raw),
            "offset": offset,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for (t, b), lp in top],
        }

    def usage(self) -> dict:
        prompt = sum(len(r.prompt_ids) for r in self.generation.requests)
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs_field(self, entries: list[dict]) -> dict | None:
        if self.generation.logprobs is None:
            return None
        if self.generation.chat:
            return {"content": [{k: v for k, v in e.items() if k != "offset"} for e in entries]}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [e["offset"] for e in entries],
        }

    # -- the whole answer ----------------------------------------------------------------------

    def body(self) -> dict:
        choices = []
        for i, parts in enumerate(self.texts):
            text = "".join(parts)
            choice = {"index": i, "logprobs": self.logprobs_field(self.logprobs[i]), "finish_reason": self.finish[i]}
            if self.generation.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        kind = "chat.completion" if self.generation.chat else "text_completion"
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.server.name,
            "choices": choices,
            "usage": self.usage(),
        }
        if self.generation.sources is not None:
            body["sources"] = self.generation.sources
        return body

    # -- the stream ----------------------------------------------------------------------------

    async def stream(self, events) -> AsyncIterator[str]:
        """Server-sent events: role first (chat; the first chunk also carries the sources with --rag),
        then text as it comes, the finish reason on each choice's last chunk, the usage chunk when
        asked for, then [DONE]."""
        try:
            if self.generation.chat:
                for i in range(len(self.texts)):
                    yield self.sse(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ],
                        first=i == 0,
                    )
            async for index, event in events:
                text = self.add(index, event)
                if text or event.finish_reason is not None:
                    yield self.sse([self.stream_choice(index, text, event.finish_reason)])
            if self.generation.include_usage:
                yield self.sse([], usage=self.usage())
        except APIError as error:  # the generation failed after the response began
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    def stream_choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        logprobs, self.pending[index] = self.logprobs_field(self.pending[index]), []
        if self.generation.chat:
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def sse(self, choices: list[dict], usage: dict | None = None, first: bool = False) -> str:
        kind = "chat.completion.chunk" if self.generation.chat else "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.server.name, "choices": choices}
        if self.generation.include_usage:
            chunk["usage"] = usage
        if first and self.generation.sources is not None:
            chunk["sources"] = self.generation.sources
        # ASCII only: U+2028 and friends, raw, are line breaks to some clients' line splitters
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"


# -- running it ------------------------------------------------------------------------------------


def build_server(
    model_dir: str | Path,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype=None,
    max_batch: int = 16,
    max_len: int | None = None,
    max_waiting: int = 256,
    api_key: str | None = None,
    max_body: int = 16 * 2**20,
    thread: bool = True,
    compile: bool = False,
    kv_cache: str = "auto",
    rag: str | Path | None = None,
    rag_k: int = 5,
    embedder: str | Path | None = None,
    query_prefix: str = "",
) -> Server:
    """Load a model directory (or Hub id) and make its scheduler (running in a thread of its own, unless
    ``thread=False``: then the caller runs ``server.scheduler.run()``, as ``serve`` does). ``rag``: an
    index whose passages answer chat requests; ``embedder``: an encoder directory for /v1/embeddings
    (and the index's questions, whose vectors it must have made)."""
    path = resolve_model(model_dir)
    retrieval = None
    if rag is not None or embedder is not None:  # first: a wrong index fails before the model loads
        encoder = Embedder(embedder, query_prefix=query_prefix) if embedder is not None else None
        retrieval = Retrieval(rag, rag_k, encoder)
    engine = Engine.from_dir(path, device=device, dtype=dtype, compile=compile, kv_cache=kv_cache)
    if engine.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.json): the server takes and returns text")
    scheduler = Scheduler(engine, max_batch=max_batch, max_len=max_len, max_waiting=max_waiting, thread=thread)
    chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
    served = name or served_name(model_dir, path)
    eos_ids = generation_eos_ids(path)
    return Server(
        engine, scheduler, served, engine.defaults, eos_ids, chat_format, api_key, max_body, retrieval=retrieval
    )


def served_name(model: str | Path, directory: Path) -> str:
    """The model's name in the API: its Hub id (as vLLM names a model), else its directory's name, or
    its run's for a run's ``final/``."""
    reference = hub_reference(model)
    if reference:
        return reference[0]
    directory = directory.resolve()
    return directory.parent.name if directory.name == "final" else directory.name


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Answer HTTP on ``host:port`` until Ctrl-C. The web side (uvicorn's event loop) runs in a
    thread; the model runs in this one (see ``Scheduler``), so ``server`` must come from
    ``build_server(..., thread=False)``."""
    if server.scheduler.thread is not None:
        raise ValueError("serve() runs the scheduler itself: build the server with thread=False")
    if host in LOOPBACK:
        server.allowed_hosts = LOOPBACK
    kv = server.scheduler.cache.bytes() / 2**20
    kv_kind = "int8 " if server.engine.kv_cache == "int8" else ""
    print(
        f"serving {server.name} ({'vision-language model' if server.engine.vlm is not None else 'language model'}, "
        f"{server.engine.device}, {server.engine.dtype}): up to {server.scheduler.max_batch} sequences of "
        f"{server.scheduler.max_len} tokens, {kv:.0f} MiB of {kv_kind}KV cache"
    )
    retrieval = server.retrieval
    if retrieval is not None and retrieval.searcher is not None:
        searcher = retrieval.searcher
        print(f"answering chat from {searcher.path} ({searcher.mode} search, up to {retrieval.k} passages)")
    if retrieval is not None and retrieval.embedder is not None:
        print(f"/v1/embeddings: {retrieval.encoder_name} ({retrieval.embedder.dim} dimensions)")
    web = uvicorn.Server(
        uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    )

    def answer_http():
        try:
            web.run()
        finally:
            server.scheduler.close()  # the web side stopped (or never started): so does the model's loop

    thread = threading.Thread(target=answer_http, name="tinylm-http", daemon=True)
    thread.start()
    while not web.started and thread.is_alive():
        time.sleep(0.05)
    if not web.started:
        raise OSError(f"the server could not listen on {host}:{port} (see the message above)")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # listening everywhere: this machine's own address works
    print(f"chat page: http://{shown}:{port}/   API: http://{shown}:{port}/v1   (Ctrl-C stops)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill` stops it as Ctrl-C does: waiting clients hear why
    try:
        server.scheduler.run()
    except KeyboardInterrupt:
        pass
    finally:
        web.should_exit = True
        thread.join(timeout=10)
