"""Atomic checkpoints: one plain dict (weights, optimiser, step, RNG states, config)."""

import os
from pathlib import Path
from typing import Any

import torch

from metalearn.errors import CheckpointError


def save(path: Path, state: dict[str, Any]) -> None:
    """Write a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU, with a clear error for a missing or unreadable file."""
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass checkpoint=<run dir>/checkpoints/best.pt"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or "config" not in state or "algo_state" not in state:
        raise CheckpointError(f"{path} is not a metalearn checkpoint (no config or weights in it)")
    return state


def check_compatible(state: dict[str, Any], algo: str, model: str, path: Path) -> None:
    """Refuse to load weights into a different algorithm or model than the ones that made them."""
    saved_algo, saved_model = state["config"]["algo"]["name"], state["config"]["model"]["name"]
    if (saved_algo, saved_model) != (algo, model):
        raise CheckpointError(
            f"{path} was trained with algo={saved_algo} model={saved_model}, but this run asks for "
            f"algo={algo} model={model}; drop the algo/model overrides or use a matching checkpoint"
        )
