"""How fast `tinylm rag` is at scale: index build throughput and search latency at 10k and 100k passages.

    python bench/rag.py                                  # 10k and 100k passages; no encoder, then the tiny one
    python bench/rag.py --sizes 10000 --embedders minilm # a MiniLM-L6-shaped encoder (slow to embed on a CPU)
    python bench/rag.py --sizes 100000 --queries 500 --results rag.jsonl

The corpus is the built-in world's pretraining documents (English and Chinese stories, encyclopedia
paragraphs and arithmetic drills), from as many worlds (seeds) as it takes to reach each size in
passages, written as files of 1 to 40 documents each, in turn .txt (paragraphs), .md (a heading, then
paragraphs) and .jsonl (one record per document): the same files for the same size, every run.

Each (size, encoder) pair builds a fresh index with ``build_index`` and times it whole (finding and
reading the files, cutting passages, embedding them, writing SQLite, the final VACUUM): passages/s and
files/s. Then each index of the size is opened with a ``Searcher`` (its first query, which loads the
vectors, is timed apart) and gets ``--warmup`` queries, and every one of ``--queries`` queries (k = 5)
runs on each index in turn, timed on its own, so that a change in the machine's speed slows them
alike: p50, p95 and the mean. Without an encoder the search is lexical (BM25 in SQLite FTS5); with one
it is hybrid (lexical and dense, fused), and the query's embedding, part of every hybrid query, is
also timed alone.
The queries are the built-in held-out chat questions of the worlds in every corpus (facts, follow-ups
that name nothing, arithmetic, questions about the assistant, things the world does not know), half in
English and half in Chinese, and some bare names.

Encoders (random weights: speed does not depend on what they learned, and nothing is downloaded), both
BERTs read through a WordPiece tokenizer trained on world 0's documents, lower-cased, with Chinese split
into characters as BERT's is:

    tiny     1 layer, hidden 32, 2 heads, FFN 64 (about 1M parameters, almost all the embedding table):
             it measures the machinery around the encoder (tokenizing, batching, storing vectors)
    minilm   all-MiniLM-L6-v2's shape: 6 layers, hidden 384, 12 heads, FFN 1536, vocabulary 30522 (23M)

On a machine where another job holds a core, give ``--threads 1``: with two, torch's threads wait for
each other, and the tiny encoder embedded 20x slower (130 passages/s instead of 2,800).

The table goes to stdout as markdown; ``--results`` appends one JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tinylm.data import builtin, builtin_chat
from tinylm.rag.chunks import passages
from tinylm.rag.embed import Embedder
from tinylm.rag.index import build_index
from tinylm.rag.search import Searcher

ENCODERS = {  # name → BertConfig fields
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
EMBEDDERS = ("none", *ENCODERS)


# -- the corpus and the queries -------------------------------------------------------------------------


def write_corpus(folder: Path, wanted: int, budget: int, overlap: int) -> tuple[int, int, int]:
    """Files under ``folder`` holding about ``wanted`` passages: (passages, files, worlds used)."""
    count = files = seed = 0
    while count < wanted:
        documents = builtin.pretrain_documents(builtin.World(seed))
        rng = random.Random(f"bench-rag-{seed}")
        start = 0
        while start < len(documents) and count < wanted:
            group = documents[start : start + rng.randint(1, 40)]
            start += len(group)
            kind = (".txt", ".md", ".jsonl")[files % 3]
            path = folder / f"world{seed:03d}" / f"doc{files:06d}{kind}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == ".jsonl":
                path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in group), "utf-8")
                count += sum(len(passages(d, budget, overlap)) for d in group)
            else:
                text = (f"# Notes {files}\n\n" if kind == ".md" else "") + "\n\n".join(group)
                path.write_text(text, "utf-8")
                count += len(passages(text, budget, overlap))
            files += 1
        seed += 1
    return count, files, seed


def queries(count: int, seed: int = 0) -> list[str]:
    """``count`` questions, half English and half Chinese, from worlds 0 and 1 (in every corpus of 10k
    passages or more)."""
    by_lang: dict[str, list[str]] = {"en": [], "zh": []}
    for world in (builtin.World(0), builtin.World(1)):
        for item in builtin_chat.heldout_questions(world):
            by_lang[item.lang].append(item.messages[-1]["content"])
        for entity in world.entities:  # a bare name, as people type into a search box
            by_lang["en"].append(entity.names["en"])
            by_lang["zh"].append(entity.names["zh"])
    rng = random.Random(seed)
    chosen = rng.sample(by_lang["en"], count - count // 2) + rng.sample(by_lang["zh"], count // 2)
    rng.shuffle(chosen)
    return chosen


# -- encoders ------------------------------------------------------------------------------------------


def random_encoder(out: Path, name: str) -> Path:
    """A randomly initialised BERT of ``ENCODERS[name]``'s shape with a WordPiece tokenizer trained on the
    built-in documents, in sentence-transformers' layout (mean pooling, as MiniLM)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    transformers.utils.logging.disable_progress_bar()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)  # and a space around each CJK character
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = builtin.pretrain_documents(builtin.World(0))
    tokenizer.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=30522, special_tokens=special, show_progress=False)
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=512, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    ).save_pretrained(out)  # fmt: skip
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **ENCODERS[name])
    transformers.BertModel(config).save_pretrained(out)
    (out / "modules.json").write_text(
        json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return out


def describe(name: str, embedder) -> str:
    if embedder is None:
        return "none"
    shape = ENCODERS[name]
    millions = sum(p.numel() for p in embedder.model.parameters()) / 1e6
    return f"{name} ({shape['num_hidden_layers']}×{shape['hidden_size']}, {millions:.0f}M)"


# -- measuring ---------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``q`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency(times: list[float]) -> dict[str, float]:
    """p50, p95 and mean of ``times`` (seconds), in milliseconds."""
    return {
        "p50_ms": percentile(times, 0.5) * 1e3,
        "p95_ms": percentile(times, 0.95) * 1e3,
        "mean_ms": statistics.mean(times) * 1e3,
    }


def build(corpus: Path, index: Path, name: str, embedder, args) -> dict:
    """Build ``index`` afresh from ``corpus`` with ``embedder`` (or none): the row's build figures."""
    index.unlink(missing_ok=True)  # a fresh build, not an update
    began = time.perf_counter()
    report = build_index([corpus], index, embedder=embedder, budget=args.budget, overlap=args.overlap, progress=False)
    build_s = time.perf_counter() - began
    files = len(report.added)
    return {
        "passages": report.chunks,
        "files": files,
        "embedder": describe(name, embedder),
        "build_s": build_s,
        "passages_per_s": report.chunks / build_s,
        "files_per_s": files / build_s,
        "index_mib": index.stat().st_size / 2**20,
    }


def time_queries(searchers: list[Searcher], asked: list[str], args) -> list[dict]:
    """Each searcher's latency figures. Every query runs on each index in turn, so a change in the
    machine's speed during the run slows them all alike."""
    rows = []
    for searcher in searchers:
        began = time.perf_counter()
        searcher.search(asked[0], args.k)  # a hybrid search's first query loads the vectors
        rows.append({"search": searcher.mode, "first_query_ms": (time.perf_counter() - began) * 1e3})
        for question in asked[1 : 1 + args.warmup]:
            searcher.search(question, args.k)
    times: list[list[float]] = [[] for _ in searchers]
    embedding: list[list[float]] = [[] for _ in searchers]  # the part of each hybrid query spent embedding it
    for question in asked:
        for searcher, spent, embedded in zip(searchers, times, embedding, strict=True):
            began = time.perf_counter()
            searcher.search(question, args.k)
            spent.append(time.perf_counter() - began)
            if searcher.embedder is not None:
                began = time.perf_counter()
                searcher.embedder.embed_query(question)
                embedded.append(time.perf_counter() - began)
    for row, spent, embedded in zip(rows, times, embedding, strict=True):
        row |= latency(spent)
        if embedded:
            row["embed_p50_ms"] = latency(embedded)["p50_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    print("| passages | files | encoder | build | passages/s | files/s | index | first query | search "
          "| p50 | p95 | mean | query embedding p50 |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for row in rows:
        embed = f"{row['embed_p50_ms']:.1f} ms" if "embed_p50_ms" in row else ""
        print(
            f"| {row['passages']:,} | {row['files']:,} | {row['embedder']} | {row['build_s']:.1f} s "
            f"| {row['passages_per_s']:,.0f} | {row['files_per_s']:,.0f} | {row['index_mib']:.1f} MiB "
            f"| {row['first_query_ms']:,.0f} ms | {row['search']} | {row['p50_ms']:.1f} ms | {row['p95_ms']:.1f} ms "
            f"| {row['mean_ms']:.1f} ms | {embed} |"
        )


def print_ratios(rows: list[dict]) -> None:
    """Each row against the first of its encoder (the smallest size), and hybrid against lexical."""
    print()
    first: dict[str, dict] = {}
    lexical = {row["passages"]: row for row in rows if row["search"] == "lexical"}
    for row in rows:
        base = first.setdefault(row["embedder"], row)
        notes = []
        if base is not row:
            times = row["build_s"] / base["build_s"], row["p50_ms"] / base["p50_ms"]
            notes.append(
                f"{row['passages'] / base['passages']:.1f}x the passages: build {times[0]:.2f}x, p50 {times[1]:.2f}x"
            )
        if row["search"] == "hybrid" and row["passages"] in lexical:
            notes.append(f"hybrid p50 {row['p50_ms'] / lexical[row['passages']]['p50_ms']:.2f}x lexical")
        if notes:
            print(f"- {row['passages']:,} passages, encoder {row['embedder']}: " + "; ".join(notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="passages per corpus")
    parser.add_argument("--embedders", nargs="+", default=["none", "tiny"], choices=EMBEDDERS)
    parser.add_argument("--queries", type=int, default=300, help="timed queries per index")
    parser.add_argument("--warmup", type=int, default=20, help="untimed queries first")
    parser.add_argument("-k", type=int, default=5, help="passages per query")
    parser.add_argument("--budget", type=int, default=120, help="passage size in terms (tinylm rag index's default)")
    parser.add_argument("--overlap", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the encoder (default: torch's)")
    parser.add_argument("--work", type=Path, default=None, help="keep the corpora and indexes here (default: not)")
    parser.add_argument("--results", type=Path, default=None, help="append the rows here as JSON lines")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    asked = queries(args.queries)

    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.work or Path(temporary)
        embedders = {
            name: None if name == "none" else Embedder(random_encoder(scratch / name, name)) for name in args.embedders
        }
        for size in sorted(args.sizes):
            corpus = scratch / f"corpus-{size}"
            shutil.rmtree(corpus, ignore_errors=True)
            count, files, worlds = write_corpus(corpus, size, args.budget, args.overlap)
            print(f"{size:,} passages wanted: {count:,} in {files:,} files from {worlds} worlds", flush=True)
            built = []
            for name, embedder in embedders.items():
                built.append(build(corpus, scratch / f"{size}-{name}.db", name, embedder, args))
                print(f"  {built[-1]['embedder']}: built in {built[-1]['build_s']:.1f} s", flush=True)
            searchers = [Searcher(scratch / f"{size}-{name}.db", e) for name, e in embedders.items()]
            for row, timed in zip(built, time_queries(searchers, asked, args), strict=True):
                rows.append(row | timed)
                print(f"  {row['embedder']}: {timed['search']} p50 {timed['p50_ms']:.1f} ms", flush=True)
            for searcher in searchers:
                searcher.close()

    print(
        f"\n{len(asked)} queries (k = {args.k}) after {args.warmup} to warm up; {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads\n"
    )
    print_table(rows)
    print_ratios(rows)
    if args.results:
        with args.results.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(
                    json.dumps({"queries": len(asked), "k": args.k, "threads": torch.get_num_threads(), **row}) + "\n"
                )


if __name__ == "__main__":
    main()
