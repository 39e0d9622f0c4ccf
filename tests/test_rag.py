"""tinylm rag: documents into passages, one SQLite index (BM25 over CJK-aware terms, vectors from a
local encoder, both fused), incremental and atomic rebuilds, and answers that cite their passages."""

import itertools
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import add_hub_commit, files_of, offline_hub, tiny_chat_dir, tiny_encoder_dir

from tinylm.cli import main
from tinylm.io import DataError
from tinylm.rag.ask import Asker, fit_passages, with_passages
from tinylm.rag.chunks import passages, sentences, size, terms
from tinylm.rag.documents import html_text, read_parts
from tinylm.rag.index import FORMAT, RagIndexError, build_index
from tinylm.rag.search import Hit, Searcher

DOCS = {
    "animals/grimum.md": "# The Grimum\n\nThe Grimum has 8 legs. It is orange and lives in Thistledown.",
    "animals/zorven.txt": "The Zorven is yellow. It eats berries every morning.",
    "people/小明.txt": "小明喜欢黄色。他住在北京。\n\n小红喜欢白色！她是医生。",
    "cities.html": "<html><head><title>Cities</title><style>p{color:red}</style><script>var x = 'Paris';</script>"
    "</head><body><p>Lyon is a city in France.</p><ul><li>Kyoto is in Japan.</li></ul></body></html>",
    "facts.jsonl": '{"text": "Kebel works as a painter."}\n{"text": "Water boils at 100 degrees."}\n',
}


def write_docs(root, docs=DOCS):
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def minimal_pdf(pages: list[str]) -> bytes:
    """A PDF with one line of Helvetica text per page (pypdf reads it back)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", ""]
    kids = []
    for text in pages:
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        page, stream = len(objects) + 1, len(objects) + 2
        kids.append(f"{page} 0 R")
        font = "<< /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >>"
        page_box = "/Type /Page /Parent 2 0 R /MediaBox [0 0 612 792]"
        objects.append(f"<< {page_box} /Contents {stream} 0 R /Resources << /Font {font} >> >>")
        objects.append(f"<< /Length {len(content)} >>\nstream\n{content.decode()}\nendstream")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


# -- passages and terms -----------------------------------------------------------------------------


def test_terms_split_english_words_and_chinese_into_characters_and_pairs():
    assert terms("Tom's 2 cats, 小明喜欢") == ["tom", "s", "2", "cats", "小", "明", "喜", "欢", "小明", "明喜", "喜欢"]
    assert size("The cat 小明喜欢黄色。") == 2 + 6


def test_sentences_end_at_english_and_chinese_marks():
    assert sentences("He ran. She sat! Why? Yes.") == ["He ran.", "She sat!", "Why?", "Yes."]
    assert sentences("小明喜欢黄色。小红呢？她喜欢白色！") == ["小明喜欢黄色。", "小红呢？", "她喜欢白色！"]


def test_passages_keep_sentences_whole_within_the_budget_and_overlap():
    text = " ".join(f"Sentence number {i} is here." for i in range(30))
    cut = passages(text, budget=20, overlap=6)
    assert all(size(p.text) <= 20 for p in cut)
    assert all(p.text.endswith(".") and p.text.startswith("Sentence") for p in cut)  # no sentence is cut
    for before, after in itertools.pairwise(cut):  # each repeats the previous one's last sentence
        assert after.text.split(". ")[0] + "." == before.text.split(". ")[-1]
    assert all(text[p.start :].startswith(p.text.split(". ")[0]) for p in cut)  # offsets point at the text
    chinese = passages("小明喜欢黄色。" * 10, budget=15, overlap=0)
    assert [p.text for p in chinese] == ["小明喜欢黄色。小明喜欢黄色。"] * 5  # no space is put between them
    assert [p.text for p in passages("字" * 25, budget=10, overlap=0)] == ["字" * 10, "字" * 10, "字" * 5]
    with pytest.raises(ValueError, match="overlap"):
        passages("x", budget=10, overlap=10)


# -- documents ---------------------------------------------------------------------------------------


def test_documents_of_every_kind_are_read_as_text(tmp_path):
    write_docs(tmp_path)
    assert html_text(DOCS["cities.html"]) == "Cities\n\nLyon is a city in France.\n\nKyoto is in Japan."
    parts = read_parts(tmp_path / "facts.jsonl")
    assert [(p.text, p.where) for p in parts] == [
        ("Kebel works as a painter.", "line 1"),
        ("Water boils at 100 degrees.", "line 2"),
    ]
    pytest.importorskip("pypdf")
    (tmp_path / "two.pdf").write_bytes(minimal_pdf(["The lighthouse is red.", "Ships pass at night."]))
    parts = read_parts(tmp_path / "two.pdf")
    assert [p.where for p in parts] == ["page 1", "page 2"] and "lighthouse is red" in parts[0].text
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01abc")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    for name, message in [("bin.txt", "binary"), ("latin1.txt", "not UTF-8"), ("broken.pdf", "not a readable PDF")]:
        with pytest.raises(DataError, match=message):
            read_parts(tmp_path / name)


# -- the index -----------------------------------------------------------------------------------------


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs")


def search(index, query, k=3, embedder=None):
    searcher = Searcher(index, embedder)
    try:
        return searcher.search(query, k)
    finally:
        searcher.close()


def test_lexical_search_finds_english_and_chinese_passages(docs, tmp_path):
    (docs / "skip.png").write_bytes(b"\x89PNG")
    (docs / "empty.md").write_text("  \n\n ", encoding="utf-8")
    (docs / ".git").mkdir()
    (docs / ".git" / "HEAD.txt").write_text("ref: main")
    report = build_index([docs], tmp_path / "docs.db", progress=False)
    assert sorted(report.added) == sorted(str(docs / name) for name in DOCS)
    assert report.ignored == [str(docs / "skip.png")] and report.empty == [str(docs / "empty.md")]
    assert report.chunks == 6 and "1 empty" in report.summary()
    assert search(tmp_path / "docs.db", "How many legs does the Grimum have?")[0].source.endswith("grimum.md")
    assert search(tmp_path / "docs.db", "Where is Kyoto?")[0].text.endswith("Kyoto is in Japan.")
    best = search(tmp_path / "docs.db", "小红喜欢什么颜色？")[0]
    assert best.source.endswith("小明.txt") and "小红喜欢白色" in best.text
    assert search(tmp_path / "docs.db", "Kebel")[0].part == "line 1"
    assert search(tmp_path / "docs.db", "!!! ???") == []


def test_rebuilding_reads_only_what_changed_and_keeps_what_cannot_be_read(docs, tmp_path, monkeypatch):
    index = tmp_path / "docs.db"
    build_index([docs], index, progress=False)
    (docs / "animals" / "zorven.txt").write_text("The Zorven is purple now.", encoding="utf-8")
    (docs / "facts.jsonl").unlink()
    (docs / "new.md").write_text("Moonfish glow in the dark.", encoding="utf-8")
    (docs / "cities.html").write_bytes(b"\xff\xfe broken")  # was readable, now is not: the old version stays

    import tinylm.rag.index as rag_index

    read = []
    original = rag_index.read_parts
    monkeypatch.setattr(rag_index, "read_parts", lambda path: read.append(path.name) or original(path))
    report = build_index([docs], index, progress=False)
    assert sorted(read) == ["cities.html", "new.md", "zorven.txt"]  # unchanged files are not read again
    assert (report.added, report.unchanged) == ([str(docs / "new.md")], 2)
    assert report.updated == [str(docs / "animals" / "zorven.txt")] and report.removed == [str(docs / "facts.jsonl")]
    assert list(report.unreadable) == [str(docs / "cities.html")] and "not UTF-8" in report.summary()
    assert "purple" in search(index, "Zorven colour")[0].text
    assert search(index, "Kyoto Japan")[0].source.endswith("cities.html")
    assert not any(h.source.endswith("facts.jsonl") for h in search(index, "Kebel painter boils", k=10))


def test_a_failed_build_leaves_the_last_good_index(docs, tmp_path):
    index = tmp_path / "docs.db"
    build_index([docs], index, progress=False)
    before = index.read_bytes()

    class Broken:
        directory, reference, pooling, query_prefix = tmp_path, str(tmp_path), "mean", ""

        def fingerprint(self):
            return "broken"

        def embed(self, texts):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        build_index([docs], index, embedder=Broken(), progress=False)
    assert index.read_bytes() == before and list(tmp_path.glob(".*partial")) == []


def test_an_index_of_another_format_or_no_index_is_refused(docs, tmp_path):
    index = tmp_path / "docs.db"
    build_index([docs], index, progress=False)
    with sqlite3.connect(index) as con:
        con.execute("UPDATE meta SET value = 'tinylm-rag 0' WHERE key = 'format'")
    with pytest.raises(RagIndexError, match=r"format 'tinylm-rag 0'; this tinylm reads 'tinylm-rag 1'"):
        Searcher(index)
    with pytest.raises(RagIndexError, match="format"):  # and an update does not touch it
        build_index([docs], index, progress=False)
    (tmp_path / "notes.db").write_text("hello")
    with pytest.raises(RagIndexError, match="not a tinylm index"):
        Searcher(tmp_path / "notes.db")
    with pytest.raises(RagIndexError, match="no such index"):
        Searcher(tmp_path / "missing.db")
    assert FORMAT == "tinylm-rag 1"


# -- dense and hybrid ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_encoder_dir(tmp_path_factory.mktemp("encoder"), list(DOCS.values()))


def test_an_encoder_directory_gives_unit_vectors_and_hybrid_search(docs, tmp_path, encoder_dir):
    from tinylm.rag.embed import Embedder

    embedder = Embedder(encoder_dir)
    assert embedder.pooling == "cls"
    vectors = embedder.embed(["The Grimum has 8 legs.", "小明喜欢黄色。", "x"])
    assert vectors.shape == (3, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    index = tmp_path / "hybrid.db"
    report = build_index([docs], index, embedder=embedder, progress=False)
    assert report.embedded == report.chunks == 6
    searcher = Searcher(index)  # reloads the encoder the index names
    assert searcher.mode == "hybrid" and searcher.embedder.fingerprint() == embedder.fingerprint()
    dense = searcher.dense("The Grimum has 8 legs.", 6)
    assert len(dense) == 6 and dense[0][1] >= dense[-1][1]
    hits = searcher.search("How many legs does the Grimum have?", 3)
    assert len(hits) == 3 and hits[0].source.endswith("grimum.md")  # fused: the lexical winner stays on top
    assert build_index([docs], index, embedder=embedder, progress=False).embedded == 0  # nothing changed
    build_index([docs], tmp_path / "lexical.db", progress=False)
    with pytest.raises(RagIndexError, match="without an encoder"):
        Searcher(tmp_path / "lexical.db", embedder)


def test_an_encoder_from_the_hub_is_recorded_by_its_id(docs, tmp_path, encoder_dir, monkeypatch):
    """--embedder ID: the encoder comes from the Hugging Face cache, and the index names the id (not the
    cache's folder), from which a Searcher loads it again."""
    from tinylm.rag.embed import Embedder

    cache = offline_hub(monkeypatch, tmp_path / "hf-cache")
    add_hub_commit(cache, "tinylm-test/encoder", files_of(encoder_dir), refs=("main",))
    embedder = Embedder("tinylm-test/encoder")
    assert embedder.name == embedder.reference == "tinylm-test/encoder"
    build_index([docs], tmp_path / "hub.db", embedder=embedder, progress=False)
    searcher = Searcher(tmp_path / "hub.db")
    assert searcher.meta["encoder_dir"] == "tinylm-test/encoder" and searcher.embedder.name == "tinylm-test/encoder"
    searcher.close()


# -- asking ----------------------------------------------------------------------------------------


def test_passages_that_do_not_fit_are_dropped_weakest_first():
    hits = [Hit(f"{i}.txt", "", 0, f"passage number {i} " * 5, 1.0 / (i + 1)) for i in range(5)]
    turn, used = fit_passages("Who?", hits, lambda turn: turn.count("passage number") <= 15)  # 3 passages
    assert [h.source for h in used] == ["0.txt", "1.txt", "2.txt"] and "[3] passage number 2" in turn
    assert "Question: Who?" in with_passages("Who?", hits[:1]) and "问题：谁？" in with_passages("谁？", hits[:1])
    with pytest.raises(ValueError, match=r"must contain \{question\}"):
        with_passages("Who?", hits, "Passages: {passages}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return tiny_chat_dir(tmp_path_factory.mktemp("rag-chat") / "chat", max_len=512)


def test_ask_search_and_chat_with_rag_through_the_command_line(docs, tmp_path, chat_dir, capsys):
    index = str(tmp_path / "docs.db")
    assert main(["rag", "index", str(docs), "--out", index]) == 0
    assert "5 added" in capsys.readouterr().err
    assert main(["rag", "search", index, "Grimum legs and the Zorven", "-k", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["source"].endswith("grimum.md") and lines[0]["score"] >= lines[1]["score"]
    assert set(lines[0]) >= {"source", "score", "text"}
    assert (
        main(
            [
                "rag",
                "ask",
                index,
                "How many legs does the Grimum have?",
                "--model",
                str(chat_dir),
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Sources:\n[1] " in out and "grimum.md" in out
    (tmp_path / "q.txt").write_text("Where is Kyoto?\n小红喜欢什么颜色？\n", encoding="utf-8")
    args = ["chat", str(chat_dir), "--rag", index, "--rag-k", "2", "--prompts", str(tmp_path / "q.txt")]
    assert main([*args, "--max-new-tokens", "4", "--output", str(tmp_path / "a.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert "cities.html" in records[0]["sources"] and "小明.txt" in records[1]["sources"]


def test_the_context_decides_how_many_passages_go_in(docs, tmp_path):
    from tinylm.infer.engine import Engine
    from tinylm.infer.sampling import SamplingSettings

    build_index([docs], tmp_path / "docs.db", progress=False)
    small = tiny_chat_dir(tmp_path / "chat", max_len=400)  # its 300-token vocabulary spends about a token a byte
    engine = Engine.from_dir(small, device="cpu")
    asker = Asker(
        engine, Searcher(tmp_path / "docs.db"), k=6, settings=SamplingSettings(max_new_tokens=16, temperature=0)
    )
    question = "Where does the Grimum live, what colour is the Zorven, and who likes white? 小红"
    hits = asker.searcher.search(question, 6)
    turn, used = asker.turn(question)
    assert 0 < len(used) < len(hits) == 4 and used == hits[: len(used)]  # the best ones, as many as fit
    assert len(engine.encode(asker.prompt(turn))) + 16 <= engine.context_length
    assert not asker.fits(with_passages(question, hits[: len(used) + 1]))
    _, given = asker.answer("How many legs does the Grimum have?")
    assert given[0].source.endswith("grimum.md")


# -- reading practice and the reading test -------------------------------------------------------------


def test_reading_practice_quotes_passages_and_cites_the_right_one():
    import re

    from tinylm.data.builtin import VALUES, value_text
    from tinylm.rag.builtin import NOT_IN_PASSAGES, reading_conversations, training_names

    values = {value_text(a, v, lang) for a in VALUES for v in VALUES[a] for lang in ("en", "zh")}
    taken = training_names(0)
    conversations = reading_conversations(200, taken)
    unanswerable = 0
    for user, assistant in conversations:
        turn, reply = user["content"], assistant["content"]
        numbered = dict(re.findall(r"^\[(\d)\] (.*)$", turn, flags=re.M))
        assert 1 <= len(numbered) <= 5 and turn == with_passages(turn.rsplit("：" if "问题：" in turn else ": ", 1)[1],
            [Hit("", "", 0, numbered[str(i)], 0) for i in range(1, len(numbered) + 1)])  # fmt: skip
        assert not any(name in turn for name in taken)
        if reply in NOT_IN_PASSAGES.values():
            unanswerable += 1
            continue
        statement, cited = re.fullmatch(r"(.*) \[(\d)\]", reply).groups()
        value = max((v for v in values if v in statement), key=len)  # the fact's value, as the reply states it
        assert value in numbered[cited]  # ... and as the passage the reply cites states it
    assert 0.15 < unanswerable / len(conversations) < 0.35


def test_the_reading_test_world_is_new_and_its_passages_are_found(tmp_path):
    from tinylm.rag.builtin import ReadingTest, training_names

    taken = training_names(0)
    test = ReadingTest(0, tmp_path / "world", exclude=taken)
    assert len(test.questions) > 150 and not any(q.name in taken for q in test.questions)
    assert {q.item.lang for q in test.questions} == {"en", "zh"}
    build_index([test.folder], tmp_path / "world.db", progress=False)
    searcher = Searcher(tmp_path / "world.db")
    retrieval = test.retrieval(searcher)
    for lang in ("en", "zh"):
        assert retrieval[lang]["hit@5"] >= 0.95 and retrieval[lang]["hit@1"] >= 0.6, retrieval
    limited = ReadingTest(0, tmp_path / "again", exclude=taken, limit=3)
    assert [q.item.lang for q in limited.questions] == ["en"] * 3 + ["zh"] * 3


def test_a_large_index_scores_only_the_passages_holding_a_rare_term(docs, tmp_path, monkeypatch):
    import tinylm.rag.search as rag_search

    build_index([docs], tmp_path / "docs.db", progress=False)
    question = "The Grimum lives in France"  # "the" and "in" are in two passages each, the others in one
    everything = {Path(hit.source).name: hit.score for hit in search(tmp_path / "docs.db", question, k=10)}
    assert list(everything) == ["grimum.md", "cities.html", "zorven.txt"]  # the Zorven's passage: "the" alone
    monkeypatch.setattr(rag_search, "SCORED", 3)  # room for the passages of "grimum", "lives" and "france"
    rare = {Path(hit.source).name: hit.score for hit in search(tmp_path / "docs.db", question, k=10)}
    assert rare == pytest.approx({name: everything[name] for name in ("grimum.md", "cities.html")})
    assert list(rare) == ["grimum.md", "cities.html"]  # BM25 over every term, best first, as before
