"""Checkpoints: one plain dict (weights, optimiser, step, RNG states, config) with its format
version and a checksum inside, written atomically, read with `weights_only=True`.

Every save keeps the file it replaces as `<name>.prev.pt`, so a checkpoint that is damaged
after it was written (a truncated copy, a bad disk) falls back to the previous good one."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from metalearn.errors import CheckpointError

# 1: no format key and no checksum (metalearn 0.1 before checksums); 2: "format" and "sha256"
FORMAT = 2
WHICH = "pass a checkpoints/last.pt or best.pt that metalearn wrote"  # what a bad file needs
WHY_NOT_WRITTEN = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than this process may write",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "the folder is not writable",
    errno.EPERM: "the folder is not writable",
}


def previous(path: Path) -> Path:
    """Where save() keeps the checkpoint that `path` replaced: last.pt -> last.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def exists(path: Path) -> bool:
    """Whether there is a checkpoint to load at `path` (or its previous one, see load)."""
    return path.is_file() or previous(path).is_file()


def digest(tree: Any) -> str:
    """SHA-256 of a checkpoint's contents: tensors by dtype, shape and bytes, containers in
    order (dicts by key), everything else by type and repr."""
    hasher = hashlib.sha256()
    _feed(hasher, tree)
    return hasher.hexdigest()


def _feed(hasher: Any, node: Any) -> None:
    if isinstance(node, torch.Tensor):
        tensor = node.detach().cpu().contiguous()
        hasher.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(node, dict):
        hasher.update(f"dict {len(node)}:".encode())
        for key in sorted(node, key=repr):
            hasher.update(repr(key).encode())
            _feed(hasher, node[key])
    elif isinstance(node, list | tuple):
        hasher.update(f"{type(node).__name__} {len(node)}:".encode())
        for item in node:
            _feed(hasher, item)
    else:
        hasher.update(f"{type(node).__name__} {node!r};".encode())


def save(path: Path, state: dict[str, Any]) -> None:
    """Write `state` with its format and checksum: a temporary file in the same folder, synced,
    then renamed over `path` (whose old version becomes previous(path)). A crash at any moment
    leaves `path` or its previous version whole; a failed write (disk full) leaves both as they
    were and says so. Weights that are not finite are refused: no checkpoint holds a NaN."""
    _check_finite(path, state.get("algo_state", {}))
    payload = {**state, "format": FORMAT}
    payload["sha256"] = digest(payload)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        if path.exists():
            os.replace(path, previous(path))
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        why = WHY_NOT_WRITTEN.get(error.errno, error.strerror or str(error))
        kept = [p for p in (path, previous(path)) if p.is_file()]
        kept_words = f"{kept[0]} is intact" if kept else "no earlier checkpoint was written"
        raise CheckpointError(
            f"cannot write checkpoint {path}: {why} ({error}); {kept_words}; free some space or "
            f"choose a writable hydra.run.dir, then continue with trainer.resume=true"
        ) from error


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_finite(path: Path, tree: Any, where: str = "algo_state") -> None:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not torch.isfinite(tree).all():
            raise CheckpointError(
                f"refusing to write {path}: {where} holds NaN or Inf values; the previous "
                f"checkpoint is kept (this is a bug: training should have stopped before)"
            )
    elif isinstance(tree, dict):
        for key, value in tree.items():
            _check_finite(path, value, f"{where}[{key!r}]")


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU (weights only: no code from the file runs). A damaged `path`
    falls back, with a warning, to previous(path) when that one is whole; anything else is a
    CheckpointError that names the file and what is wrong with it."""
    path = Path(path)
    fallback = previous(path)
    if not path.is_file() and not fallback.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass checkpoint=<run dir>/checkpoints/best.pt"
        )
    try:
        return _read(path)
    except CheckpointError as error:
        if not fallback.is_file():
            raise
        try:
            state = _read(fallback)
        except CheckpointError as second:
            raise CheckpointError(
                f"{error}; the previous one is no better: {second}; restore a copy of either, or "
                f"start the run again without trainer.resume=true"
            ) from error
        iteration = state.get("progress", {}).get("iteration", "?")
        warnings.warn(
            f"{error}; using the previous good checkpoint {fallback} (iteration {iteration})",
            RuntimeWarning,
            stacklevel=2,
        )
        return state


def _unpickler_detail(error: Exception) -> str:
    """The informative line of a torch.load error (weights_only's message is a page long)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        line = rest.splitlines()[0].strip() if rest else "refused by the weights-only loader"
        return line.split(" was not an allowed global")[0]  # not its allowlisting advice
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (a save was interrupted)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and torch errors all mean "damaged or not ours"
        detail = _unpickler_detail(error)
        if detail.startswith("Unsupported global"):  # weights_only refused an object: not ours
            raise CheckpointError(
                f"{path} is not a metalearn checkpoint: it holds Python objects that a "
                f"checkpoint never holds ({detail}); {WHICH}"
            ) from error
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, damaged or not a checkpoint "
            f"({detail}); {WHICH}"
        ) from error
    if not isinstance(state, dict) or "config" not in state or "algo_state" not in state:
        raise CheckpointError(
            f"{path} is not a metalearn checkpoint (no config or weights in it); {WHICH}"
        )
    version = state.pop("format", 1)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, written by a newer metalearn; this one "
            f"reads formats 1 to {FORMAT}: upgrade metalearn to load it"
        )
    checksum = state.pop("sha256", None)
    if version >= 2 and checksum != digest({**state, "format": version}):
        raise CheckpointError(
            f"{path} is damaged: its contents do not match the checksum written with them; "
            f"restore a copy of it, or retrain"
        )
    return state


def check_compatible(state: dict[str, Any], algo: str, model: str, path: Path) -> None:
    """Refuse to load weights into a different algorithm or model than the ones that made them."""
    saved_algo, saved_model = state["config"]["algo"]["name"], state["config"]["model"]["name"]
    if (saved_algo, saved_model) != (algo, model):
        raise CheckpointError(
            f"{path} was trained with algo={saved_algo} model={saved_model}, but this run asks for "
            f"algo={algo} model={model}; drop the algo/model overrides or use a matching checkpoint"
        )
