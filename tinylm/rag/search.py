"""Finding the passages for a question: BM25 over terms, cosine over vectors, or both fused.

Lexical search asks the index's FTS5 table for passages sharing any of the question's terms
(English words, Chinese characters and character pairs) and ranks them by BM25, which rewards rare
terms and discounts long passages; in a large index it scores only the passages holding one of the
question's rarer terms (``Searcher.lexical`` says why). Dense search compares the question's vector
with every passage's. With both, the two rankings are fused by reciprocal rank (each passage scores
the sum of 1 / (60 + its rank) over the lists it is in): a passage near the top of either list rises,
and no score scale has to be matched to another. An index built with an encoder reloads it from the directory it names.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm.hub.models import hub_reference
from tinylm.rag.chunks import terms
from tinylm.rag.index import RagIndexError, connect

RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
CANDIDATES = 50  # passages each ranking contributes to the fusion
SCORED = 5000  # about the most passages lexical search scores (Searcher.lexical says why)


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

            encoder = self.meta["encoder_dir"]
            if hub_reference(encoder) is None and not Path(encoder).is_dir():
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
        # how many passages hold a term: FTS5's own counts, through its vocabulary table (in memory, so
        # a read-only index can have it)
        self.con.execute("CREATE VIRTUAL TABLE temp.term_passages USING fts5vocab(main, terms, row)")
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
        """(passage id, BM25 score) of the best ``k`` passages sharing a term with ``query``.

        FTS5 computes BM25 for every passage a query matches, and that is the cost of a search: in a
        large index an OR of the question's terms matches most passages through its commonest ones
        ("the", "is", 的, 是), which add almost nothing to a score. So the candidates are the passages
        holding one of the question's *rarest* terms, taken rarest first while they hold no more than
        ``SCORED`` passages between them (the rarest one always counts). Each candidate still gets BM25
        over all the question's terms. Left out are the passages sharing only common terms with the
        question, which could outrank one holding a rare term only when the question is almost all
        common words. (bench/rag.py at 100k passages: the same top 5 for 296 of 300 questions, the
        others follow-ups that name nothing, such as 她住在哪个镇？; a median query in about 20 ms, not 90.)
        """
        wanted = list(dict.fromkeys(terms(query)))
        counts = {term: self.passages_with(term) for term in wanted}
        found = sorted((term for term in wanted if counts[term]), key=counts.get)  # others neither match nor score
        if not found:
            return []
        rare, covered = found[:1], counts[found[0]]
        for term in found[1:]:
            covered += counts[term]
            if covered > SCORED:
                break
            rare.append(term)
        if rare == found:
            rows = self.con.execute(
                "SELECT rowid, -rank FROM terms WHERE terms MATCH ? ORDER BY rank LIMIT ?", (any_of(found), k)
            )
            return rows.fetchall()
        # FTS5's BM25 (its rank, negated) sums over every phrase of the MATCH expression. "rare AND (all)"
        # matches the candidates and scores every term, the rare ones twice; less the score of "rare"
        # alone, that is each candidate's BM25 over all the terms.
        twice = dict(
            self.con.execute(
                "SELECT rowid, rank FROM terms WHERE terms MATCH ?", (f"({any_of(rare)}) AND ({any_of(found)})",)
            )
        )
        once = self.con.execute("SELECT rowid, rank FROM terms WHERE terms MATCH ?", (any_of(rare),))
        return heapq.nlargest(k, ((chunk, rank - twice[chunk]) for chunk, rank in once), key=lambda hit: hit[1])

    def passages_with(self, term: str) -> int:
        """How many passages hold ``term`` (FTS5 counts them in the term's list of passages)."""
        row = self.con.execute("SELECT doc FROM temp.term_passages WHERE term = ?", (term,)).fetchone()
        return row[0] if row else 0

    def dense(self, query: str, k: int) -> list[tuple[int, float]]:
        """(passage id, cosine) of the ``k`` passages whose vectors are closest to the question's."""
        if self._vectors is None:
            rows = self.con.execute("SELECT id, vector FROM chunks WHERE vector IS NOT NULL").fetchall()
            self._ids = np.array([r[0] for r in rows], dtype=np.int64)
            self._vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        if not len(self._ids):
            return []
        scores = self._vectors @ self.embedder.embed_query(query)
        best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))  # no full sort
        best = best[np.argsort(-scores[best])]
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


def any_of(words: list[str]) -> str:
    """An FTS5 query matching any of ``words``, each quoted as a string."""
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)
