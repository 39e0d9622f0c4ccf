"""Raw text → token shards on disk → packed training windows.

    read_documents(path)            .txt / .jsonl / .json / .parquet / hf:NAME → one string per document
    build_token_shards(paths, ...)  tokenize every document once → train.bin, val.bin, meta.json
    PackedWindows(train.bin, ...)   endless, shuffled, resumable windows of seq_len + 1 tokens
    iter_eval_windows(val.bin, ...) the same validation windows, in order, every time

A shard is just the token ids of all its documents back to back, each document followed by
<|endoftext|>, stored as raw uint16 (uint32 for vocabularies over 65,536). Training reads it through
``np.memmap``: the operating system pages in what is used, so a corpus larger than memory is fine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tinylm.data.walk import SeededWalk
from tinylm.io import DataError, atomic_write_text, iter_records, source_key
from tinylm.tokenizer import Tokenizer, train_tokenizer

SHARD_VERSION = 1  # bump when the shard layout changes, so old caches are rebuilt
BATCH_CHARS = 1 << 22  # about 4 MB of text per call to the tokenizer's parallel batch encoder


# -- reading documents --------------------------------------------------------------------------


def read_documents(path: str | Path, text_field: str = "text", txt_split: str = "blank") -> Iterator[str]:
    """The documents of one file, in order. Empty and whitespace-only documents are skipped.

    - ``.txt``: ``txt_split`` "blank" = blocks separated by blank lines, "line" = one per line,
      "file" = the whole file
    - ``.jsonl``: one JSON object per line, the text in ``text_field``
    - ``.json``: a list of such objects
    - ``.parquet``: the string column ``text_field`` (needs pyarrow)
    - ``.txt.gz``, ``.jsonl.gz``, ``.json.gz``: the same, gzip-compressed
    - ``hf:NAME[:CONFIG][@SPLIT]``: the column ``text_field`` of a Hub dataset's split, streamed: a
      pretraining corpus may be larger than the disk (``tinylm.io.iter_records``)

    A missing file or an unsupported type is an error at once; a bad record when it is reached.
    """
    records = iter_records(path, txt_split=txt_split, columns=[text_field], stream=True)
    return (text for text in (_text_of(record, text_field, where) for where, record in records) if text.strip())


def _text_of(record, field: str, where: str) -> str:
    """The text of one record: a .txt document itself, or the ``field`` of a JSON object / parquet row."""
    if isinstance(record, str):
        return record
    if isinstance(record, DataError):
        raise DataError(f"{where}: {record}", record.reason)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no {field!r} field (found: {', '.join(map(repr, record)) or 'none'})")
    text = record[field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise DataError(f"{where}: field {field!r} is {kind}, expected a string")
    return text


def train_tokenizer_from_files(
    paths, vocab_size: int = 6400, text_field: str = "text", txt_split: str = "blank", *, cjk_merges: bool = False
) -> Tokenizer:
    """Train on the documents of .txt / .jsonl / .json / .parquet files and Hub datasets (see ``read_documents``)."""

    def documents():
        for path in paths:
            yield from read_documents(path, text_field=text_field, txt_split=txt_split)

    return train_tokenizer(documents(), vocab_size, cjk_merges=cjk_merges)


# -- building shards ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """A built shard directory: train.bin, val.bin, {train,val}_docs.npy and meta.json."""

    directory: Path
    meta: dict

    @property
    def train_bin(self) -> Path:
        return self.directory / "train.bin"

    @property
    def val_bin(self) -> Path:
        return self.directory / "val.bin"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def train_tokens(self) -> int:
        return self.meta["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.meta["val_tokens"]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def load_shard_info(directory: str | Path) -> ShardInfo:
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (build the shards with build_token_shards first)")
    try:
        return ShardInfo(Path(directory), json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def build_token_shards(
    paths: Iterable[str | Path],
    tokenizer,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    txt_split: str = "blank",
    val_fraction: float = 0.01,
    seed: int = 0,
    val_paths: Iterable[str | Path] = (),
) -> ShardInfo:
    """Tokenize every document of ``paths`` once and split whole documents into train and validation.

    Documents go to validation by a seeded hash of their text: the ``val_fraction`` share (at least
    one when there are two or more) with the smallest hashes. The split does not depend on file order,
    and identical documents share a hash, so a duplicate rarely sits on both sides. Given
    ``val_paths``, those files are the validation set instead and every document of ``paths`` trains.

    The result is cached: when ``out_dir/meta.json`` records the same inputs (paths, sizes,
    modification times, settings, tokenizer fingerprint; for a Hub dataset its name, config, split and
    revision), nothing is read or written again.
    """
    paths, val_paths = [Path(p) for p in paths], [Path(p) for p in val_paths]
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction {val_fraction}: expected a number in [0, 1)")
    out_dir = Path(out_dir)
    fingerprint = _inputs_fingerprint(paths + val_paths, tokenizer, text_field, txt_split, val_fraction, seed)
    cached = _cached_shards(out_dir, fingerprint)
    if cached is not None:
        return cached

    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".build-*"):  # scratch of a build that was killed; only one process builds
        shutil.rmtree(leftover, ignore_errors=True)
    dtype = token_dtype(tokenizer.vocab_size)
    train_docs = [0]  # how many documents come from ``paths`` (the rest, from val_paths, validate)

    def documents():
        for path in paths:
            for document in read_documents(path, text_field, txt_split):
                train_docs[0] += 1
                yield document
        for path in val_paths:
            yield from read_documents(path, text_field, txt_split)

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as scratch:
        scratch = Path(scratch)
        lengths, text_bytes, hashes = _tokenize(documents(), tokenizer, scratch / "all.bin", dtype, seed)
        if train_docs[0] == 0:
            raise DataError(f"no documents in {', '.join(map(str, paths))}")
        if val_paths:
            is_val = np.arange(len(lengths)) >= train_docs[0]
            if is_val.sum() == 0:
                raise DataError(f"no documents in the validation files {', '.join(map(str, val_paths))}")
        else:
            is_val = _choose_validation(hashes, val_fraction)
        tokens = np.memmap(scratch / "all.bin", dtype=dtype, mode="r")
        starts = np.cumsum(lengths) - lengths
        meta = {
            "version": SHARD_VERSION,
            "fingerprint": fingerprint,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "sources": [str(p) for p in paths],
            "val_sources": [str(p) for p in val_paths],
        }
        for split, selected in (("train", ~is_val), ("val", is_val)):
            doc_starts = _copy_documents(tokens, starts, lengths, selected, scratch / f"{split}.bin")
            np.save(scratch / f"{split}_docs.npy", doc_starts)
            meta.update(
                {
                    f"{split}_tokens": int(lengths[selected].sum()),
                    f"{split}_docs": int(selected.sum()),
                    f"{split}_bytes": int(text_bytes[selected].sum()),
                }
            )
        del tokens  # close the memmap before the scratch directory is removed
        (out_dir / "meta.json").unlink(missing_ok=True)  # old meta must never describe new files
        for name in ("train.bin", "val.bin", "train_docs.npy", "val_docs.npy"):
            os.replace(scratch / name, out_dir / name)
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return ShardInfo(out_dir, meta)


def sources_fingerprint(paths: Iterable[str | Path], **settings) -> str:
    """SHA-256 of the sources (a file's path, size and modification time; a Hub dataset's revision, see
    ``tinylm.io.source_key``) and ``settings``: the key of anything built from them, so a changed source
    or setting means building again."""
    key = {"sources": [source_key(path) for path in paths], **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()


def _inputs_fingerprint(paths: list[Path], tokenizer, text_field, txt_split, val_fraction, seed) -> str:
    """SHA-256 of everything the shards depend on."""
    return sources_fingerprint(
        paths,
        version=SHARD_VERSION,
        text_field=text_field,
        txt_split=txt_split,
        val_fraction=val_fraction,
        seed=seed,
        tokenizer=tokenizer.fingerprint(),
    )


def _cached_shards(out_dir: Path, fingerprint: str) -> ShardInfo | None:
    """The shards in ``out_dir`` if they were built from the same inputs and are complete."""
    try:
        info = load_shard_info(out_dir)
    except (FileNotFoundError, DataError):
        return None
    if info.meta.get("fingerprint") != fingerprint:
        return None
    for split in ("train", "val"):
        path = out_dir / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != info.meta[f"{split}_tokens"] * info.dtype.itemsize:
            return None
        if not (out_dir / f"{split}_docs.npy").is_file():
            return None
    return info


def _batches(documents: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenize(documents: Iterator[str], tokenizer, out_path: Path, dtype: np.dtype, seed: int):
    """Append each document's ids and an <|endoftext|> to ``out_path``.

    Returns per document: its length in tokens, its length in UTF-8 bytes, its seeded 64-bit hash.
    """
    lengths, text_bytes, hashes = [], [], []
    salt = str(seed).encode("utf-8")
    bar = tqdm(desc="tokenizing", unit=" docs", unit_scale=True, file=sys.stderr, disable=None, dynamic_ncols=True)
    with open(out_path, "wb") as out, bar:
        for batch in _batches(documents, BATCH_CHARS):
            flat: list[int] = []
            for text, ids in zip(batch, tokenizer.encode_batch(batch)):
                flat.extend(ids)
                flat.append(tokenizer.eos_id)
                lengths.append(len(ids) + 1)
                utf8 = text.encode("utf-8")
                text_bytes.append(len(utf8))
                hashes.append(int.from_bytes(hashlib.blake2b(utf8, digest_size=8, key=salt).digest(), "little"))
            np.asarray(flat, dtype=dtype).tofile(out)
            bar.update(len(batch))
    return np.array(lengths, np.int64), np.array(text_bytes, np.int64), np.array(hashes, np.uint64)


def _choose_validation(hashes: np.ndarray, val_fraction: float) -> np.ndarray:
    """A boolean mask: True for the validation documents (the smallest hashes)."""
    count = len(hashes)
    n_val = 0 if val_fraction == 0 or count < 2 else min(count - 1, max(1, round(val_fraction * count)))
    is_val = np.zeros(count, dtype=bool)
    is_val[np.argsort(hashes, kind="stable")[:n_val]] = True
    return is_val


def _copy_documents(
    tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, selected: np.ndarray, path: Path
) -> np.ndarray:
    """Write the selected documents to ``path`` in their original order; return their start offsets there.

    Consecutive selected documents are contiguous in ``tokens``, so each run is copied in one piece.
    """
    # +1 where a run of selected documents begins, -1 just after it ends
    edges = np.diff(np.concatenate([[0], selected.astype(np.int8), [0]]))
    run_starts, run_ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    with open(path, "wb") as out:
        for first, end in zip(run_starts, run_ends):
            tokens[starts[first] : starts[end - 1] + lengths[end - 1]].tofile(out)
    kept = lengths[selected]
    return np.cumsum(kept) - kept


# -- training and validation windows ------------------------------------------------------------


def _open_tokens(bin_path: str | Path, dtype) -> np.ndarray:
    """The token ids of a .bin file as a read-only memmap (an empty array for an empty file)."""
    bin_path, dtype = Path(bin_path), np.dtype(dtype)
    if not bin_path.is_file():
        raise FileNotFoundError(f"{bin_path}: missing token shard")
    if bin_path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(bin_path, dtype=dtype, mode="r")


class PackedWindows:
    """Endless training windows of ``seq_len + 1`` tokens, packed across documents with no padding.

    The token stream is cut into windows starting every ``seq_len`` tokens; a window's last token
    is the next one's first, so within an epoch every token is predicted exactly once. The windows are
    visited in the seeded, sharded, resumable order of ``SeededWalk``, the one every stage's batches
    take: a run resumed from ``state_dict`` reads the very same batches it would have read without
    stopping.
    """

    def __init__(self, bin_path: str | Path, seq_len: int, dtype, *, seed: int, rank: int = 0, world_size: int = 1):
        self.tokens = _open_tokens(bin_path, dtype)
        self.seq_len, self.seed = seq_len, seed
        self.num_windows = max(len(self.tokens) - 1, 0) // seq_len
        if self.num_windows // world_size == 0:
            raise ValueError(
                f"{bin_path}: {len(self.tokens)} tokens do not make one window of {seq_len + 1} tokens "
                f"for each of {world_size} process(es); use a smaller seq_len or more data"
            )
        self.walk = SeededWalk(self.num_windows, 1, seed=seed, rank=rank, world_size=world_size, what="windows")

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` windows as a LongTensor [batch_size, seq_len + 1]."""
        self.walk.batch_size = batch_size
        starts = [index * self.seq_len for index in self.walk.next_picks()]
        rows = [self.tokens[start : start + self.seq_len + 1] for start in starts]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        walk = self.walk.state_dict()
        return {"epoch": walk["epoch"], "cursor": walk["cursor"], "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": self.num_windows, "world_size": walk["world_size"]}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (saved with another number of processes: from the same point
        of the epoch, rounded down to a whole step)."""
        saved = (state["seed"], state["seq_len"], state["num_windows"])
        if saved != (self.seed, self.seq_len, self.num_windows):
            raise ValueError(
                f"the saved data position is for seed/seq_len/windows {saved}, but this data has "
                f"{(self.seed, self.seq_len, self.num_windows)}; resume with the same data and settings"
            )
        self.walk.load_state_dict({**state, "rows": state["num_windows"]})


def iter_eval_windows(bin_path: str | Path, seq_len: int, dtype, max_windows: int | None) -> Iterator[torch.Tensor]:
    """Validation windows from the start of ``bin_path``, in order: LongTensors of ``seq_len + 1``
    tokens (the last one may be shorter), at most ``max_windows`` of them (None: all)."""
    tokens = _open_tokens(bin_path, dtype)
    for start in itertools.islice(range(0, len(tokens) - 1, seq_len), max_windows):
        yield torch.from_numpy(tokens[start : start + seq_len + 1].astype(np.int64))
