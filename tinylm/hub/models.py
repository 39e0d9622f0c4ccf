"""Models from the Hugging Face Hub: wherever tinylm takes a model directory, it takes a Hub id too.

    resolve_model("runs/chat/final")         → runs/chat/final (a local path, as it is)
    resolve_model("Qwen/Qwen2.5-0.5B")       → $HF_HUB_CACHE/models--Qwen--Qwen2.5-0.5B/snapshots/<commit>
    resolve_model("Qwen/Qwen2.5-0.5B@v2")    → the snapshot of the branch, tag or commit "v2"

A local path always wins: a name that exists here is that file or directory, and only a string that
does not, shaped as the Hub shapes ids (``name`` or ``org/name``), is looked up there. So ``runs/tiny``
is the Hub's model ``tiny`` of the user ``runs`` only when there is no folder ``runs/tiny``; a path no
id can be (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``) stays a path, and its "no such directory" error
comes from the loader, as before.

``ID@REVISION`` is how an id travels with a revision (a branch, a tag or a commit hash) as one string:
through a config's ``init_from``, a command line's ``--revision``, an adapter's base. An id cannot
contain "@", so the spelling is unambiguous (``huggingface_hub``'s file system writes ``hf://org/name@rev``).

The download is ``huggingface_hub.snapshot_download``: its cache (``HF_HOME``, ``HF_HUB_CACHE``), its
offline mode (``HF_HUB_OFFLINE=1``), its tokens (``HF_TOKEN``, or the one ``hf auth login`` saved), its
resumed downloads. Only the files a model directory is made of are fetched (``MODEL_FILES``): never
pickled weights (``.bin``, ``.pt``...), which loading them would execute, nor other runtimes' copies
(GGUF, ONNX, TensorFlow, Flax).

The cache is content-addressed: ``snapshots/<commit>/<file>`` is a link to ``blobs/<etag>``, and the etag
is the file's SHA-256 for files stored in Git LFS (weights, large tokenizers), the Git blob SHA-1 for the
others. Every file tinylm reads from a snapshot is checked against it, once per process, so a corrupted
cache is an error that names the file, never a model quietly loaded from damaged bytes. (A tinylm
directory also carries SHA256SUMS, which loading verifies as for any local directory.)

Nothing here imports from tinylm outside this package, and ``huggingface_hub`` is imported only when
a Hub id is used: a local directory never touches it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePath

from tinylm.hub import HubError

# What a model directory is made of, as huggingface_hub's allow_patterns (fnmatch: "*" crosses "/").
MODEL_FILES = [
    "*.json",  # config, generation_config, tokenizer(_config), special tokens, the shards' index, adapter_config,
    #            (pre)processor configs, sentence-transformers' modules
    "model*.safetensors",  # the weights, whole or in shards (not the copies some repos keep beside them)
    "adapter_model.safetensors",  # a PEFT adapter's
    "*.jinja",  # chat_template.jinja
    "vocab.txt",  # the vocabulary of a text encoder (rag --embedder) without a tokenizer.json
    "merges.txt",
    "SHA256SUMS",  # a tinylm directory's manifest, verified on load
    "README.md",  # the model card: the license and languages a fine-tune inherits
]
# Never fetched, whatever MODEL_FILES grows into: pickles (loading them runs code) and other runtimes' weights.
NEVER_FILES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]
LOGIN = "log in with `hf auth login` or set HF_TOKEN"
SHA256, GIT_SHA1 = re.compile(r"[0-9a-f]{64}"), re.compile(r"[0-9a-f]{40}")

# (Hub id, revision) → its verified snapshot: resolved once per process, so that every load of a run
# reads the same commit and a model's files are hashed once.
SNAPSHOTS: dict[tuple[str, str | None], Path] = {}


def hub_reference(name_or_path: str | PurePath) -> tuple[str, str | None] | None:
    """(Hub id, revision or None) of ``ID[@REVISION]``; None when ``name_or_path`` is a local path: a
    Path object, anything that exists here, or a name the Hub refuses as an id (``huggingface_hub``'s
    own rules: one slash at most, letters, digits, "-", "_", "." only, no "--" or "..")."""
    if isinstance(name_or_path, PurePath) or Path(name_or_path).exists():
        return None
    repo, at, revision = str(name_or_path).partition("@")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError:
        return None
    return repo, revision if at else None


def with_revision(name_or_path: str | PurePath, revision: str | None) -> str:
    """``name_or_path`` pinned to ``revision`` as ``ID@REVISION`` (what ``--revision`` does to a
    command's model). A local path has no revisions, and a model pinned already to another one is a
    contradiction: both are errors."""
    if not revision:
        return str(name_or_path)
    reference = hub_reference(name_or_path)
    if reference is None:
        raise HubError(
            f"{name_or_path}: a local path, not a Hugging Face Hub id (org/name); --revision {revision} "
            "names a branch, tag or commit of a model on the Hub"
        )
    repo, pinned = reference
    if pinned not in (None, revision):
        raise HubError(f"{name_or_path}: names revision {pinned!r} already, and --revision says {revision!r}")
    return f"{repo}@{revision}"


def model_reference(name_or_path: str | PurePath) -> str:
    """How a saved file names the model it was made from (an adapter's base, a card's base model): a
    Hub id as given, with its revision; a local directory as its absolute path, right from anywhere."""
    return str(name_or_path) if hub_reference(name_or_path) else str(Path(name_or_path).resolve())


def resolve_model(name_or_path: str | PurePath, revision: str | None = None) -> Path:
    """The local directory of a model: ``name_or_path`` itself when it is a local path (one that does
    not exist too: the loader's "no such directory" says so), else the verified snapshot of the Hub id
    at ``revision`` (or the one it names after "@"; the default branch without), fetched if need be."""
    if revision:
        name_or_path = with_revision(name_or_path, revision)  # an error for a local path
    reference = hub_reference(name_or_path)
    if reference is None:
        return Path(name_or_path)
    if reference not in SNAPSHOTS:
        folder = download(*reference)
        verify_snapshot(folder)
        SNAPSHOTS[reference] = folder
    return SNAPSHOTS[reference]


def resolved_snapshot(name_or_path: str | PurePath) -> Path | None:
    """The snapshot a Hub id was resolved to in this process, None for any other name: what a model
    card reads of a base model, without a download or a question to the Hub."""
    reference = hub_reference(name_or_path)
    return SNAPSHOTS.get(reference) if reference else None


def download(repo: str, revision: str | None) -> Path:
    """The snapshot folder of ``repo`` at ``revision`` in the Hugging Face cache, with the files of
    MODEL_FILES; huggingface_hub's errors become one HubError that says what to do."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, ignore_patterns=NEVER_FILES))
    except OSError as e:  # huggingface_hub's HTTP and not-in-the-cache errors are OSErrors, as a full disk is
        raise HubError(explain(e, repo, revision)) from e


def explain(error: OSError, repo: str, revision: str | None) -> str:
    """The message for huggingface_hub's ``error`` while fetching ``repo`` at ``revision``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        return f"{repo}: a gated model: accept its conditions on https://huggingface.co/{repo}, then {LOGIN}"
    if isinstance(error, RepositoryNotFoundError) or status in (401, 403):
        return (
            f"{repo}: no such local directory, and no model of that name on the Hugging Face Hub that you can "
            f"see (a private one needs you to {LOGIN})"
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{repo}: the Hugging Face Hub has no revision {revision!r} of it (expected a branch, tag or commit)"
    if isinstance(error, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub cannot be reached"
        command = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        return (
            f"{repo}: no such local directory, and the Hugging Face Hub model {repo} (revision "
            f"{revision or 'main'}) is not (completely) in the cache {constants.HF_HUB_CACHE}, while {why}: "
            f"download it once with network access (`{command}`), or give a local model directory"
        )
    return f"{repo} (revision {revision or 'main'}): cannot be fetched from the Hugging Face Hub ({error})"


# -- the cache's content addresses ------------------------------------------------------------------


def verify_snapshot(folder: Path) -> None:
    """Check each file of the snapshot ``folder`` that a model directory is made of against its blob's
    name in the cache (see the module's notes)."""
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in filter_repo_objects(files, allow_patterns=MODEL_FILES, ignore_patterns=NEVER_FILES):
        verify_blob(folder / name)


def verify_blob(path: Path) -> None:
    """A HubError naming ``path`` (a snapshot's link to a blob) when its bytes do not hash to the blob's
    name: a SHA-256 (a Git LFS file's), or a Git blob SHA-1 (the SHA-1 of "blob <size>\\0" and the
    bytes). A file copied in place of its link (a system without symbolic links), or a blob named
    otherwise, has no address to check it against; SHA256SUMS still guards a tinylm directory."""
    if not path.is_symlink():
        return
    blob = Path(os.path.realpath(path))
    if SHA256.fullmatch(blob.name):
        kind, digest = "SHA-256", hashlib.sha256()
    elif GIT_SHA1.fullmatch(blob.name):
        kind, digest = "Git blob SHA-1", hashlib.sha1(b"blob %d\0" % blob.stat().st_size)
    else:
        return
    found = file_digest(path, digest)
    if found != blob.name:
        raise HubError(
            f"{path}: its {kind} is {found}, but the Hugging Face cache stores it as {blob.name}: the cache is "
            f"corrupted; delete {blob} and load the model again to download a fresh copy"
        )


def file_digest(path: Path, digest) -> str:
    """The hex digest of ``path``'s bytes fed to ``digest`` (a hashlib object), read in 1 MiB blocks."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
