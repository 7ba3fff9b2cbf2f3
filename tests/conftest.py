"""Shared fixtures: the real data root, Hydra composition of the project's configs, quiet W&B."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

torch.set_num_threads(min(2, torch.get_num_threads()))


def real_data_root() -> Path | None:
    """$METALEARN_DATA, else ../shared/data next to the repository; None when Omniglot is absent."""
    root = Path(os.environ.get("METALEARN_DATA") or REPO.parent / "shared" / "data")
    return root if (root / "omniglot" / "images_background.zip").is_file() else None


@pytest.fixture
def omniglot_root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real Omniglot not found: set METALEARN_DATA to the folder holding omniglot/")
    return root


def compose_config(overrides: list[str], config_name: str = "train") -> dict:
    """The resolved config dict that `metalearn <config_name> overrides...` would build."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
