"""The server's documents and text encoder: ``--rag INDEX`` grounds chat answers, ``--embedder DIR``
(or the index's own encoder) answers ``/v1/embeddings``.

Searches and embeddings run on one worker thread of their own, one at a time: off the event loop, so
streams keep flowing while an encoder works, and never two at once, because an encoder's fast tokenizer
fails when two threads call it together ("Already borrowed") and an SQLite connection belongs to the
thread that opened it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tinylm.rag.ask import fit_passages
from tinylm.rag.embed import Embedder
from tinylm.rag.search import Hit, Searcher
from tinylm.serve.protocol import APIError, Embeddings


class Retrieval:
    """An index to search (or None) and an encoder (or None: the index's own, when it has one)."""

    def __init__(self, index: str | Path | None = None, k: int = 5, embedder: Embedder | None = None):
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tinylm-retrieval")
        self.k = k
        self.searcher = self.worker.submit(Searcher, index, embedder).result() if index is not None else None
        self.embedder = embedder if embedder is not None else getattr(self.searcher, "embedder", None)
        self.encoder_name = self.embedder.name if self.embedder is not None else None

    def ground(self, messages: list[dict], fits: Callable[[list[dict]], bool]) -> tuple[list[dict], list[dict]]:
        """The conversation with its last (user) message turned into the question with the best passages
        for which ``fits(conversation)`` holds, and those passages' sources. Called from a worker of
        the server's thread pool: it waits for the search."""
        question = messages[-1]["content"]
        hits = self.worker.submit(self.searcher.search, question, self.k).result()

        def asking(turn: str) -> list[dict]:
            return [*messages[:-1], {"role": "user", "content": turn}]

        try:
            turn, used = fit_passages(question, hits, lambda turn: fits(asking(turn)))
        except ValueError:
            raise APIError(
                "the conversation leaves no room for the question with retrieved passages (--rag) in this "
                "server's context; shorten it, or send 'rag': false",
                "messages",
                code="context_length_exceeded",
            ) from None
        return asking(turn), source_records(used)

    async def embed(self, request: Embeddings) -> tuple[np.ndarray, int]:
        """(unit vectors, tokens read) for the request's texts, computed on the worker."""
        return await asyncio.wrap_future(self.worker.submit(self._embed, request))

    def _embed(self, request: Embeddings) -> tuple[np.ndarray, int]:
        limit = self.embedder.max_length  # one token more shows a text is too long, without reading all of it
        ids = self.embedder.tokenizer(request.texts, truncation=True, max_length=limit + 1)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > limit:
                raise APIError(
                    f"'{request.param(i)}' is longer than this encoder's {limit} tokens; split it",
                    request.param(i),
                    code="context_length_exceeded",
                )
        return self.embedder.embed(request.texts), sum(map(len, ids))

    def close(self) -> None:
        if self.searcher is not None:
            self.worker.submit(self.searcher.close).result()
        self.worker.shutdown()


def source_records(hits: list[Hit]) -> list[dict]:
    """The passages given to the model, numbered as the prompt cites them ([1] is the first)."""
    return [
        {"index": i, "source": h.source, "part": h.part, "start": h.start, "score": h.score, "text": h.text}
        for i, h in enumerate(hits, 1)
    ]
