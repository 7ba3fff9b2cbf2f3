"""Where data sets live on disk, and where and how their decoded tensor caches are kept."""

import hashlib
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DATA_ENV = "METALEARN_DATA"
CACHE_ENV = "METALEARN_CACHE"
DEFAULT_ROOT = "~/.cache/metalearn"


def _absolute(path: str | os.PathLike[str]) -> Path:
    # abspath (not resolve) so messages show the path the user gave, with `..` folded away.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: `root` if given, else `$METALEARN_DATA`, else `~/.cache/metalearn`.

    An empty string counts as unset, so `data.root=` or `METALEARN_DATA=` fall through to the
    next choice. The result has `~` expanded and is absolute.
    """
    if root is not None and os.fspath(root) != "":
        return _absolute(root)
    from_env = os.environ.get(DATA_ENV, "")
    return _absolute(from_env if from_env else DEFAULT_ROOT)


def cache_dir() -> Path:
    """Where decoded tensor caches go: `$METALEARN_CACHE`, else `~/.cache/metalearn/cache`.

    Kept apart from the data root because the root may be read-only (a shared copy).
    The folder is not created here; writers create it when they first save.
    """
    from_env = os.environ.get(CACHE_ENV, "")
    return _absolute(from_env if from_env else Path(DEFAULT_ROOT) / "cache")


def fingerprint(path: Path, pattern: str = "*") -> str:
    """File count, total size and newest mtime of a file, or of a folder's files matching
    `pattern`: part of a cache key, so a replaced or edited data set is decoded again."""
    files = [f for f in path.rglob(pattern) if f.is_file()] if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    latest = max((s.st_mtime_ns for s in stats), default=0)
    return f"{len(stats)}:{sum(s.st_size for s in stats)}:{latest}"


def load_cache(path: Path, *, mmap: bool = False) -> dict[str, Any] | None:
    """A dict written by `save_cache`, or None when absent or unreadable (the caller rebuilds).

    `mmap`: tensors are memory-mapped from the file instead of read, so a large image cache
    opens in moments and its pages load as episodes touch them."""
    if not path.is_file():
        return None
    try:
        # weights_only: a cache holds tensors, strings, numbers and lists, never code.
        blob = torch.load(path, weights_only=True, mmap=mmap)
        if not isinstance(blob, dict):
            raise ValueError(f"expected a dict, found {type(blob).__name__}")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        warnings.warn(f"Ignoring the unreadable cache {path} ({err}); rebuilding it.", stacklevel=2)
        return None
    return blob


def save_cache(path: Path, blob: dict[str, Any]) -> None:
    """torch.save `blob` to `path` atomically (temp file + os.replace): a crash or a concurrent
    reader never sees a half-written cache. An unwritable cache folder only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            torch.save(blob, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as err:  # the data still loads; only the next start pays the decode again
        warnings.warn(
            f"Could not write the cache {path} ({err}); set {CACHE_ENV} to a writable folder "
            f"to skip decoding next time.",
            stacklevel=2,
        )


def cache_path(name: str, *key_parts: Any) -> Path:
    """`cache_dir()/<name>-<key>.pt`, the key hashing what the decoded data depends on (the cache
    format, the source's path and file statistics, the image size, the split lists)."""
    key = hashlib.sha256("|".join(map(str, key_parts)).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{key}.pt"


def cached(path: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The cache at `path`, memory-mapped; built by `build()` and saved first when it is absent
    or unreadable. If it cannot be saved, the built dict is returned as it is."""
    blob = load_cache(path, mmap=True)
    if blob is None:
        blob = build()
        save_cache(path, blob)
        blob = load_cache(path, mmap=True) or blob  # the memory-mapped copy, when it was saved
    return blob


def splits_blob(decoded: dict[str, tuple[Any, list[str]]]) -> dict[str, Any]:
    """split -> (images, class names) as one cache dict: `<split>` and `<split>_classes`."""
    blob = {split: images for split, (images, _) in decoded.items()}
    return blob | {f"{split}_classes": names for split, (_, names) in decoded.items()}
