"""The index: one SQLite file holding your documents' passages, their terms and (optionally) vectors.

    sources   one row per file: its path as indexed, SHA-256 and size
    chunks    one row per passage: its file, the part of the file ("page 3"), its character offset,
              its text, and its unit vector (float32 bytes) when the index has an encoder
    terms     an FTS5 full-text table over each passage's terms (tinylm.rag.chunks.terms), which
              ranks with BM25; its row id is the passage's
    meta      the format version, the chunking settings, the encoder (directory or Hub id, and fingerprint)

Building is incremental: a file whose SHA-256 is unchanged is not read again (nor re-embedded), a file
no longer found leaves the index, a changed one is replaced. It is atomic: the new index is written
beside the old one (a copy, for an update) and renamed over it only when complete, so a crash leaves
the last good index. A file that cannot be read is reported by name and skipped, and if the index held
an earlier version of it, that version stays.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tinylm.io import DataError, sha256_file
from tinylm.rag.chunks import passages, terms
from tinylm.rag.documents import find_files, read_parts

FORMAT = "tinylm-rag 1"
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE chunks (
  id INTEGER PRIMARY KEY, source INTEGER NOT NULL, part TEXT NOT NULL, start INTEGER NOT NULL,
  text TEXT NOT NULL, vector BLOB
);
CREATE INDEX chunks_by_source ON chunks (source);
CREATE VIRTUAL TABLE terms USING fts5 (body, tokenize = 'unicode61 remove_diacritics 0');
"""


class RagIndexError(DataError):
    """An index file that cannot be used, with the reason."""


@dataclass
class IndexReport:
    """What a build did, file by file."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # path → why
    ignored: list[str] = field(default_factory=list)  # files of other kinds found in folders
    chunks: int = 0  # in the index afterwards
    embedded: int = 0  # passages embedded by this build

    def summary(self) -> str:
        reasons = Counter(why.split(": ", 1)[-1].split(" (")[0] for why in self.unreadable.values())
        lines = [
            f"{len(self.added)} added, {len(self.updated)} updated, {self.unchanged} unchanged, "
            f"{len(self.removed)} removed, {len(self.empty)} empty, {len(self.unreadable)} unreadable, "
            f"{len(self.ignored)} of other kinds ignored; {self.chunks} passages"
            + (f", {self.embedded} embedded" if self.embedded else "")
        ]
        lines += [f"  unreadable: {why}" for why in self.unreadable.values()]
        if len(reasons) > 1:
            lines.append("  unreadable by reason: " + ", ".join(f"{n} {r}" for r, n in reasons.most_common()))
        return "\n".join(lines)


def connect(path: Path, writable: bool = False) -> sqlite3.Connection:
    """Open an index, checking that it is one tinylm can read."""
    if not path.is_file():
        raise RagIndexError(f"{path}: no such index (build one with tinylm rag index PATH... --out {path})")
    try:
        con = sqlite3.connect(path if writable else f"file:{path}?mode=ro", uri=not writable)
        found = dict(con.execute("SELECT key, value FROM meta")).get("format")
    except sqlite3.DatabaseError as e:
        raise RagIndexError(f"{path}: not a tinylm index ({e})") from None
    if found != FORMAT:
        con.close()
        raise RagIndexError(
            f"{path}: an index of format {found!r}; this tinylm reads {FORMAT!r}: rebuild it with tinylm rag index"
        )
    return con


def build_index(
    paths: list[str | Path],
    out: str | Path,
    embedder=None,
    budget: int = 120,
    overlap: int = 20,
    progress: bool = True,
) -> IndexReport:
    """Index the files under ``paths`` into ``out`` (created, or brought up to date), atomically."""
    out = Path(out)
    files, others = find_files(paths)
    report = IndexReport(ignored=[str(p) for p in others])
    settings = {"budget": str(budget), "overlap": str(overlap), "encoder": embedder.fingerprint() if embedder else ""}
    if embedder is not None:
        settings |= {"encoder_dir": embedder.reference, "encoder_pooling": embedder.pooling,
                     "query_prefix": embedder.query_prefix}  # fmt: skip
    scratch = out.with_name(f".{out.name}.partial")
    scratch.unlink(missing_ok=True)
    try:
        if out.exists():
            connect(out).close()  # an index this tinylm reads, before anything is copied
            shutil.copyfile(out, scratch)
            con = sqlite3.connect(scratch)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(scratch)
            con.executescript(SCHEMA)
            con.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        with con:
            _update(con, files, settings, embedder, budget, overlap, report, progress)
        con.execute("VACUUM")
        con.close()
        os.replace(scratch, out)
    finally:
        scratch.unlink(missing_ok=True)
    return report


def _update(con, files, settings, embedder, budget, overlap, report: IndexReport, progress: bool) -> None:
    old = dict(con.execute("SELECT key, value FROM meta WHERE key != 'format'"))
    if {k: old.get(k, "") for k in ("budget", "overlap", "encoder")} != {
        k: settings.get(k, "") for k in ("budget", "overlap", "encoder")
    }:
        con.execute("DELETE FROM terms")  # new passages or new vectors: every file is read again
        con.execute("DELETE FROM chunks")
        con.execute("UPDATE sources SET sha256 = ''")
    known = {path: (source, digest) for source, path, digest in con.execute("SELECT id, path, sha256 FROM sources")}
    kept = set()
    for path in tqdm(files, desc="index", unit="file", disable=not progress, file=sys.stderr):
        name = str(path)
        digest = sha256_file(path)
        kept.add(name)
        if name in known and known[name][1] == digest:
            report.unchanged += 1
            continue
        try:
            chunks = [
                (part.where, p.start, p.text) for part in read_parts(path) for p in passages(part.text, budget, overlap)
            ]
        except DataError as e:
            report.unreadable[name] = str(e)
            continue  # an earlier version of it, if any, stays
        if name in known:
            _remove(con, known[name][0])
        if not chunks:
            report.empty.append(name)
            continue
        vectors = embedder.embed([text for _, _, text in chunks]) if embedder is not None else None
        report.embedded += 0 if vectors is None else len(vectors)
        source = con.execute(
            "INSERT INTO sources (path, sha256, bytes) VALUES (?, ?, ?)", (name, digest, path.stat().st_size)
        ).lastrowid
        for i, (where, start, text) in enumerate(chunks):
            blob = None if vectors is None else vectors[i].astype(np.float32).tobytes()
            chunk = con.execute(
                "INSERT INTO chunks (source, part, start, text, vector) VALUES (?, ?, ?, ?, ?)",
                (source, where, start, text, blob),
            ).lastrowid
            con.execute("INSERT INTO terms (rowid, body) VALUES (?, ?)", (chunk, " ".join(terms(text))))
        (report.updated if name in known else report.added).append(name)
    for name, (source, _) in known.items():
        if name not in kept:
            _remove(con, source)
            report.removed.append(name)
    con.execute("DELETE FROM meta WHERE key != 'format'")
    con.executemany("INSERT INTO meta VALUES (?, ?)", settings.items())
    report.chunks = con.execute("SELECT count(*) FROM chunks").fetchone()[0]


def _remove(con, source: int) -> None:
    con.execute("DELETE FROM terms WHERE rowid IN (SELECT id FROM chunks WHERE source = ?)", (source,))
    con.execute("DELETE FROM chunks WHERE source = ?", (source,))
    con.execute("DELETE FROM sources WHERE id = ?", (source,))
