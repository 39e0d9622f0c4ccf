"""Retrieval-augmented generation: answer questions from your own documents, citing them.

documents.py  files and folders → text parts (txt, md, html, pdf, json, jsonl)
chunks.py     text → passages on sentence boundaries; passages → the terms lexical search matches
index.py      passages → one SQLite file (FTS5 BM25, optional vectors), incremental and atomic
embed.py      a local sentence-transformers / transformers encoder → unit vectors
search.py     a question → the best passages (lexical, dense, or fused)
ask.py        a question and its passages → the user's turn a chat model answers, with sources
builtin.py    reading practice for a small model, and the reading test on a world it never saw
"""
