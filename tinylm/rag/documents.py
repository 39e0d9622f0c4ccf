"""Your documents as text: the files of some paths, each cut into the parts it is made of.

    .txt .md .markdown   the file's text
    .html .htm           the visible text (scripts and styles dropped, block elements on lines of their own)
    .pdf                 each page's text (needs pypdf: pip install pypdf)
    .json .jsonl         each record's "text" field (or the record, when it is a string), as the data
                         readers read them (gzip-compressed too)

A part keeps where it came from ("page 3", "line 12"), so an answer can cite it. A file that cannot be
read (binary, not UTF-8, a broken PDF) raises a DataError that names it; the indexer counts and skips it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from tinylm.io import DataError, iter_records

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
SUFFIXES = (*TEXT_SUFFIXES, *HTML_SUFFIXES, ".pdf", ".json", ".jsonl", ".json.gz", ".jsonl.gz")


@dataclass
class Part:
    """A piece of a document's text and where in the file it is ("" for a file read whole)."""

    text: str
    where: str = ""


def suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), path.suffix.lower())


def find_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(the readable kinds of files under ``paths``, recursively and sorted; the other files found).
    A path that does not exist raises at once."""
    found, others = [], []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder", "missing_file")
        if path.is_dir():  # everything inside but hidden files and folders (.git, .venv, .DS_Store)
            candidates = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
            )
        else:
            candidates = [path]
        for candidate in candidates:
            (found if suffix(candidate) in SUFFIXES else others).append(candidate)
    return list(dict.fromkeys(found)), others


def read_parts(path: Path) -> list[Part]:
    """The text parts of one file; a DataError (naming the file) when it cannot be read."""
    kind = suffix(path)
    if kind in TEXT_SUFFIXES:
        return [Part(decode(path))]
    if kind in HTML_SUFFIXES:
        return [Part(html_text(decode(path)))]
    if kind == ".pdf":
        return pdf_parts(path)
    if kind in (".json", ".jsonl", ".json.gz", ".jsonl.gz"):
        return list(record_parts(path))
    raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}", "unsupported_file")


def decode(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DataError(f"{path}: a binary file (it holds NUL bytes), not text", "binary")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})", "encoding"
        ) from None


def record_parts(path: Path) -> Iterator[Part]:
    for where, record in iter_records(path, types=(".json", ".jsonl")):
        if isinstance(record, DataError):
            raise record
        text = record if isinstance(record, str) else record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: expected a string or an object with a string 'text' field", "wrong_type")
        place = where.rsplit(":", 1)[-1]
        yield Part(text, f"line {place}" if place.isdigit() else place)


def pdf_parts(path: Path) -> list[Part]:
    try:
        import pypdf
    except ImportError:
        raise DataError(f"{path}: reading PDF needs pypdf: pip install pypdf", "missing_pypdf") from None
    try:
        reader = pypdf.PdfReader(path)
        return [Part(page.extract_text() or "", f"page {i + 1}") for i, page in enumerate(reader.pages)]
    except Exception as e:  # pypdf raises many kinds for a broken file
        raise DataError(f"{path}: not a readable PDF ({type(e).__name__}: {e})", "broken_pdf") from None


BLOCKS = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
          "article", "header", "footer", "blockquote", "pre", "title", "dd", "dt"}  # fmt: skip


class _Visible(HTMLParser):
    """Collects the text a browser shows: no scripts, styles or templates; blocks on lines of their own."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "template", "noscript"):
            self.hidden += 1
        elif tag in BLOCKS:
            self.pieces.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "template", "noscript"):
            self.hidden = max(0, self.hidden - 1)
        elif tag in BLOCKS:
            self.pieces.append("\n\n")

    def handle_data(self, data):
        if not self.hidden:
            self.pieces.append(data)


def html_text(html: str) -> str:
    parser = _Visible()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.pieces).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
