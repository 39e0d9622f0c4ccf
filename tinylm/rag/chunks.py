"""Cutting text into passages, and passages into the terms lexical search matches.

**Terms.** English (and any spaced script) splits into lower-cased words and numbers. Chinese has no
spaces, and a search engine without a dictionary does best with overlapping character pairs: 小明喜欢
gives 小明 明喜 喜欢 (plus each character alone, so a one-character query still matches). Terms are
also what a passage's size is counted in: about one per English word or Chinese character, close to
what a byte-level BPE tokenizer spends on them.

**Passages.** A text splits into paragraphs (blank lines), paragraphs into sentences (ending in . ! ?
followed by a space, or in 。！？ with no space after), and consecutive sentences are packed into
passages of at most ``budget`` terms that never cut a sentence (a longer sentence is cut at the
budget). Each passage after the first of a paragraph run repeats the last sentences of the previous one,
up to ``overlap`` terms, so a fact split across the boundary is whole in one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs (extension A, unified, compatibility)
TERM = re.compile(rf"[{CJK}]+|[^\W{CJK}_]+", re.UNICODE)
CJK_START = re.compile(f"[{CJK}]")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|(?<=[.!?][\"'”’)])\s+")


def terms(text: str) -> list[str]:
    """Lower-cased words and numbers, and each CJK run as its characters and overlapping pairs."""
    out = []
    for run in TERM.findall(text.lower()):
        if CJK_START.match(run):
            out += list(run) + [run[i : i + 2] for i in range(len(run) - 1)]
        else:
            out.append(run)
    return out


def size(text: str) -> int:
    """A passage's size in terms: words and numbers, plus one per CJK character."""
    return sum(len(run) if CJK_START.match(run) else 1 for run in TERM.findall(text))


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph) if s and s.strip()]


@dataclass
class Passage:
    text: str
    start: int  # character offset of its first sentence in the text it was cut from


def passages(text: str, budget: int = 120, overlap: int = 20) -> list[Passage]:
    """``text`` as passages of at most ``budget`` terms, overlapping by up to ``overlap`` terms."""
    if budget < 1 or not 0 <= overlap < budget:
        raise ValueError(f"chunk budget {budget} and overlap {overlap}: expected budget >= 1 and 0 <= overlap < budget")
    pieces = []  # (sentence, offset, size), sentences longer than the budget cut into budget-sized runs
    for paragraph in re.finditer(r"\S(?:.*?)(?=\n\s*\n|\Z)", text, flags=re.S):
        for sentence in sentences(paragraph.group()):
            offset = text.find(sentence, paragraph.start())
            pieces += [(piece, offset + at, size(piece)) for piece, at in cut(sentence, budget)]
    out: list[Passage] = []
    current: list[tuple[str, int, int]] = []
    for piece in pieces:
        if current and sum(p[2] for p in current) + piece[2] > budget:
            out.append(join(current))
            kept, kept_size = [], 0
            for previous in reversed(current):  # the overlap: whole sentences from the end
                if kept_size + previous[2] > min(overlap, budget - piece[2]):
                    break
                kept.insert(0, previous)
                kept_size += previous[2]
            current = kept
        current.append(piece)
    if current:
        out.append(join(current))
    return out


def join(pieces: list[tuple[str, int, int]]) -> Passage:
    chinese = all(re.search(rf"[{CJK}。！？；：，”’」』）]$", p[0]) for p in pieces[:-1])  # no space after Chinese
    return Passage(("" if chinese else " ").join(p[0] for p in pieces), pieces[0][1])


def cut(sentence: str, budget: int) -> list[tuple[str, int]]:
    """A sentence of more than ``budget`` terms as runs of at most ``budget`` (with their offsets)."""
    if size(sentence) <= budget:
        return [(sentence, 0)]
    runs, start, used = [], 0, 0
    for match in TERM.finditer(sentence):
        cost = size(match.group())
        if used and used + cost > budget:
            runs.append((sentence[start : match.start()].strip(), start))
            start, used = match.start(), 0
        while cost > budget:  # one CJK run longer than the budget
            runs.append((sentence[start : start + budget], start))
            start, cost = start + budget, cost - budget
        used += cost
    runs.append((sentence[start:].strip(), start))
    return [(text, at) for text, at in runs if text]
