"""Finding the passages for a question: BM25 over terms, cosine over vectors, or both fused.

Lexical search asks the index's FTS5 table for passages sharing any of the question's terms
(English words, Chinese characters and character pairs) and ranks them by BM25, which rewards rare
terms and discounts long passages. Dense search compares the question's vector with every passage's.
With both, the two rankings are fused by reciprocal rank (each passage scores the sum of 1 / (60 +
its rank) over the lists it is in): a passage near the top of either list rises, and no score scale
has to be matched to another. An index built with an encoder reloads it from the directory it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.rag.chunks import terms
from tinylm.rag.index import RagIndexError, connect

RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
CANDIDATES = 50  # passages each ranking contributes to the fusion


@dataclass
class Hit:
    """One retrieved passage: where it is from and how it ranked (score: BM25, cosine or fused)."""

    source: str
    part: str
    start: int
    text: str
    score: float

    def where(self) -> str:
        return self.source + (f", {self.part}" if self.part else "") + f", character {self.start}"


class Searcher:
    """An open index, ready for questions. ``embedder``: the encoder for questions (default: the one
    the index was built with, when it has vectors)."""

    def __init__(self, path: str | Path, embedder=None):
        self.path = Path(path)
        self.con = connect(self.path)
        self.meta = dict(self.con.execute("SELECT key, value FROM meta"))
        self.embedder = embedder
        if self.meta.get("encoder") and embedder is None:
            from tinylm.rag.embed import Embedder

            encoder = Path(self.meta["encoder_dir"])
            if not encoder.is_dir():
                raise RagIndexError(
                    f"{self.path}: its vectors were made by {encoder}, which is gone; give --embedder DIR"
                )
            self.embedder = Embedder(encoder, query_prefix=self.meta.get("query_prefix", ""))
        if self.embedder is not None and self.embedder.fingerprint() != self.meta.get("encoder"):
            built = "with another encoder than" if self.meta.get("encoder") else "without an encoder, not with"
            raise RagIndexError(
                f"{self.path}: was built {built} {self.embedder.directory}; rebuild it with "
                f"tinylm rag index ... --embedder {self.embedder.directory}"
            )
        self._ids: np.ndarray | None = None
        self._vectors: np.ndarray | None = None

    @property
    def mode(self) -> str:
        return "hybrid" if self.embedder is not None else "lexical"

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` best passages for ``query``, best first."""
        lexical = self.lexical(query, max(k, CANDIDATES) if self.embedder else k)
        if self.embedder is None:
            return self.hits(lexical)
        dense = self.dense(query, max(k, CANDIDATES))
        fused: dict[int, float] = {}
        for ranking in (lexical, dense):
            for rank, (chunk, _) in enumerate(ranking):
                fused[chunk] = fused.get(chunk, 0.0) + 1 / (RRF_K + rank + 1)
        return self.hits(sorted(fused.items(), key=lambda item: -item[1])[:k])

    def lexical(self, query: str, k: int) -> list[tuple[int, float]]:
        """(passage id, BM25 score) of the best ``k`` passages sharing a term with ``query``."""
        wanted = list(dict.fromkeys(terms(query)))
        if not wanted:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in wanted)
        rows = self.con.execute(
            "SELECT rowid, -bm25(terms) FROM terms WHERE terms MATCH ? ORDER BY rank LIMIT ?", (match, k)
        )
        return rows.fetchall()

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        """(passage id, cosine) of the ``k`` passages whose vectors are closest to the question's."""
        if self._vectors is None:
            rows = self.con.execute("SELECT id, vector FROM chunks WHERE vector IS NOT NULL").fetchall()
            self._ids = np.array([r[0] for r in rows], dtype=np.int64)
            self._vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        if not len(self._ids):
            return []
        scores = self._vectors @ self.embedder.embed_query(query)
        best = np.argsort(-scores)[:k] if k < len(scores) else np.argsort(-scores)
        return [(int(self._ids[i]), float(scores[i])) for i in best]

    def hits(self, ranked: list[tuple[int, float]]) -> list[Hit]:
        out = []
        for chunk, score in ranked:
            source, part, start, text = self.con.execute(
                "SELECT sources.path, part, start, text FROM chunks JOIN sources ON sources.id = chunks.source "
                "WHERE chunks.id = ?",
                (chunk,),
            ).fetchone()
            out.append(Hit(source, part, start, text, float(score)))
        return out

    def close(self) -> None:
        self.con.close()
