"""Datasets from the Hugging Face Hub as rows of records: ``hf:NAME[:CONFIG][@SPLIT]`` wherever a data file goes.

    parse("hf:HuggingFaceH4/ultrachat_200k@train_sft")  → HubSource("HuggingFaceH4/ultrachat_200k", None, "train_sft")
    iter_rows("hf:...", streaming=False, columns=None)   → ("hf:...@train_sft:row 0", {...}), ...  (opened at once)
    revision("hf:...")                                   → what the rows depend on: the key of anything built from them
    split_bytes("hf:...")                                → the split's size as datasets records it, or None

NAME is a Hub dataset id (``org/name``), a local copy of a Hub dataset repository (a folder of parquet,
JSON Lines or CSV files, with or without a README that declares its configs), or a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``. CONFIG picks one of the dataset's configs
(subsets); SPLIT one of its splits, "train" when left out.

Loading goes through the ``datasets`` library (an optional extra, imported on first use), so its cache
(``HF_DATASETS_CACHE``, by default under ``HF_HOME``), its offline switches (``HF_HUB_OFFLINE``,
``HF_DATASETS_OFFLINE``) and the usual token settings apply. A split is downloaded into that cache and
read from there, memory-mapped; with ``streaming=True`` (pretraining text, which may be larger than the
disk) rows are read as they arrive instead, unless the split is in the cache already.

Rows are read as Arrow stores them, not as ``datasets`` would decode them: an image is the struct
{"bytes", "path"} (never a PIL image), which ``tinylm.data.image_chat`` takes as it is, so nothing is
decoded only to be encoded again. Row numbers count from 0, as ``dataset[i]`` does.

A problem with a whole dataset (the library missing, the Hub unreachable with nothing cached, no such
dataset, config, split or column) is a ``HubError`` whose one line names the source and what was
expected; ``tinylm.io`` turns it into its ``DataError``. This module imports nothing from tinylm outside
this package.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tinylm.hub import HubError

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
INSTALL = 'pip install "tinylm[datasets]"'
BATCH_ROWS = 1024  # rows per Arrow batch turned into records
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "wikitext", "HuggingFaceH4/ultrachat_200k"


def is_hub_source(path) -> bool:
    """Whether a data path is a dataset of the Hub (``hf:...``) rather than a file."""
    return str(path).startswith(PREFIX)


@dataclass(frozen=True)
class HubSource:
    """One split of a dataset: ``name`` (a Hub id or a local folder), ``config`` (None: the dataset's
    default) and ``split`` (None: "train")."""

    name: str
    config: str | None = None
    split: str | None = None

    @property
    def label(self) -> str:
        """The source as errors and ``where`` strings name it, the split always written out."""
        config = f":{self.config}" if self.config else ""
        return f"{PREFIX}{self.name}{config}@{self.split or DEFAULT_SPLIT}"

    @property
    def folder(self) -> Path | None:
        """The local folder NAME is, or None for a Hub id."""
        path = Path(self.name).expanduser()
        return path if path.is_dir() else None

    @property
    def dataset_name(self) -> str:
        """What a model card lists: the Hub id, or a local folder's name."""
        return self.folder.resolve().name if self.folder else self.name


def parse(text: str) -> HubSource:
    """``hf:NAME[:CONFIG][@SPLIT]`` → HubSource; an empty part is an error that shows the form."""
    body = str(text).removeprefix(PREFIX)
    rest, at, split = body.rpartition("@") if "@" in body else (body, "", "")
    name, colon, config = rest.partition(":")
    for part, value, given in (("NAME", name, True), ("CONFIG", config, colon), ("SPLIT", split, at)):
        if given and not value.strip():
            raise HubError(
                f"{text}: empty {part}; expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:HuggingFaceH4/ultrachat_200k"
                "@train_sft or hf:Salesforce/wikitext:wikitext-2-raw-v1",
                "invalid_source",
            )
    return HubSource(name, config or None, split or None)


# -- rows -----------------------------------------------------------------------------------------


def iter_rows(text: str, *, streaming: bool = False, columns: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of the split, in order; ``where`` is ``"hf:NAME@SPLIT:row N"``. The
    dataset is opened now, so a missing dataset, config, split or column raises at once; ``columns``:
    only these (each must exist)."""
    source = parse(text)
    with _translated(source):
        dataset = _open(source, streaming)
        if columns and dataset.column_names is not None:  # a stream may not know its columns before it starts
            _check_columns(source, dataset.column_names, columns)
    return _rows(source, dataset, columns)


def _rows(source: HubSource, dataset, columns: list[str] | None) -> Iterator[tuple[str, dict]]:
    """The rows, a batch of Arrow records at a time; a stream that breaks off says at which row."""
    label, row = source.label, 0
    try:
        for table in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
            if columns:
                _check_columns(source, table.column_names, columns)
                table = table.select(columns)
            for record in table.to_pylist():
                yield f"{label}:row {row}", record
                row += 1
    except OSError as e:  # a connection lost mid-stream, a file of the cache gone
        raise HubError(f"{label}: reading stopped at row {row}: {e}", "unreadable") from None


def _check_columns(source: HubSource, names: list[str], columns: list[str]) -> None:
    if missing := [column for column in columns if column not in names]:
        raise HubError(f"{source.label}: no column {missing[0]!r} (columns: {', '.join(names)})", "missing_field")


def revision(text: str) -> dict:
    """What the split's rows depend on, to key a cache of anything built from them: the dataset, its
    config, the split and the revision (a Hub dataset's commit, a local folder's hash of its files'
    modification times), or a saved dataset's fingerprint. Nothing is downloaded."""
    source = parse(text)
    with _translated(source):
        datasets = _library(source)
        if _is_saved(datasets, source):
            dataset = _open_saved(datasets, source)
            split = source.split or DEFAULT_SPLIT
            return {"saved": str(source.folder.resolve()), "split": split, "fingerprint": dataset._fingerprint}
        builder = _builder(datasets, source)
        split = _split(source, builder)
        name = str(source.folder.resolve()) if source.folder else source.name
        return {"dataset": name, "config": builder.config.name, "split": split, "revision": builder.hash}


def split_bytes(text: str) -> int | None:
    """The split's size in bytes as datasets records it (Arrow data, about the text's size), or None
    where the dataset's card does not say (a local folder without one). Nothing is downloaded."""
    source = parse(text)
    with _translated(source):
        datasets = _library(source)
        if _is_saved(datasets, source):
            return _open_saved(datasets, source).data.nbytes
        builder = _builder(datasets, source)
        info = (builder.info.splits or {}).get(_split(source, builder))
        return info.num_bytes if info is not None and info.num_bytes else None


# -- opening a split ------------------------------------------------------------------------------


def _library(source: HubSource):
    """The datasets module, imported now (it takes a second or two), or the error that says how to install it."""
    try:
        import datasets
    except ImportError:
        raise HubError(
            f"{source.label}: reading Hub datasets needs the datasets library: {INSTALL}", "missing_datasets"
        ) from None
    return datasets


def _open(source: HubSource, streaming: bool):
    """The split as a ``datasets.Dataset`` (memory-mapped from the cache or a saved folder) or, when
    streaming a split that is not cached, an ``IterableDataset``."""
    datasets = _library(source)
    if _is_saved(datasets, source):
        return _open_saved(datasets, source)
    builder = _builder(datasets, source)
    split = _split(source, builder)
    if streaming and not Path(builder.cache_dir, datasets.config.DATASET_INFO_FILENAME).is_file():
        return builder.as_streaming_dataset(split=split)
    builder.download_and_prepare()  # what load_dataset does: download, convert to Arrow in the cache (once)
    return builder.as_dataset(split=split)


def _is_saved(datasets, source: HubSource) -> bool:
    """Whether NAME is a folder written by ``save_to_disk`` (which load_dataset refuses)."""
    folder = source.folder
    saved = (datasets.config.DATASET_STATE_JSON_FILENAME, datasets.config.DATASETDICT_JSON_FILENAME)
    return folder is not None and any((folder / name).is_file() for name in saved)


def _open_saved(datasets, source: HubSource):
    """The split of a saved DatasetDict, or a saved Dataset, which is its own one split ("train" when it
    has no split name)."""
    if source.config:
        raise HubError(
            f"{source.label}: a dataset saved with save_to_disk has no configs; drop :{source.config}",
            "missing_config",
        )
    saved = datasets.load_from_disk(str(source.folder))
    if isinstance(saved, datasets.DatasetDict):
        return saved[_check_split(source, list(saved))]
    _check_split(source, [str(saved.split or DEFAULT_SPLIT)])
    return saved


def _builder(datasets, source: HubSource):
    """The dataset's builder (``load_dataset`` without the loading): its config, splits and revision."""
    folder = source.folder
    if folder is None and (source.name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(source.name)):
        raise HubError(
            f"{source.label}: no such folder {source.name!r}; expected a Hub dataset id (org/name) or a local "
            "dataset folder",
            "missing_dataset",
        )
    try:
        return datasets.load_dataset_builder(str(folder) if folder else source.name, source.config)
    except ValueError as e:  # "BuilderConfig 'x' not found", "Config name is missing"
        raise _config_error(datasets, source, e) from None


def _config_error(datasets, source: HubSource, error: ValueError) -> HubError:
    """The error of a config that is not there, or of one left out where there are several, listing them."""
    try:
        configs = datasets.get_dataset_config_names(str(source.folder or source.name))
    except (ValueError, OSError):
        configs = []
    if not configs or (source.config in configs):
        return HubError(f"{source.label}: {error}")
    split = f"@{source.split}" if source.split else ""
    choices = ", ".join(f"{PREFIX}{source.name}:{config}{split}" for config in configs)
    problem = f"no config {source.config!r}" if source.config else f"{source.name} has several configs"
    return HubError(f"{source.label}: {problem}; expected one of {choices}", "missing_config")


def _split(source: HubSource, builder) -> str:
    """The split asked for, checked against the builder's (from the dataset's card, else its files)."""
    names = list(builder.info.splits or {}) or list(builder.config.data_files or {})
    return _check_split(source, names) if names else source.split or DEFAULT_SPLIT


def _check_split(source: HubSource, names: list[str]) -> str:
    split = source.split or DEFAULT_SPLIT
    if split not in names:
        raise HubError(
            f"{source.label}: no split {split!r}; expected one of {', '.join(names)} (choose it with @SPLIT)",
            "missing_split",
        )
    return split


@contextmanager
def _translated(source: HubSource):
    """The datasets library's errors about a whole dataset as one HubError line naming the source."""
    try:
        yield
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE) or unreachable, and nothing in the cache
        raise HubError(_unreachable(source, e), "offline") from None
    except FileNotFoundError as e:  # no such dataset (or a gated or private one without access)
        raise HubError(f"{source.label}: {e}", "missing_dataset") from None
    except Exception as e:
        library = sys.modules.get("datasets")
        if library is None or not isinstance(e, library.exceptions.DatasetsError):
            raise
        raise HubError(f"{source.label}: {e}", "unreadable") from None  # files that do not make the dataset


def _unreachable(source: HubSource, error: Exception) -> str:
    import datasets

    why = (
        "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
        if datasets.config.HF_HUB_OFFLINE
        else f"the Hugging Face Hub cannot be reached ({error})"
    )
    config = f", {source.config!r}" if source.config else ""
    fill = f"datasets.load_dataset({source.name!r}{config}, split={source.split or DEFAULT_SPLIT!r})"
    return (
        f"{source.label}: {why} and {source.name} is not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}); "
        f'load it once where the Hub can be reached (python -c "import datasets; {fill}"), or point HF_HOME or '
        "HF_DATASETS_CACHE at a cache that holds it"
    )
