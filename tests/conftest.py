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


# A tiny ProtoNet run on real Omniglot: 5-way training episodes, two iterations, two episodes.
TINY_PROTONET = [
    "experiment=protonet_omniglot_5w1s",
    "debug=smoke",
    "hardware.threads=1",
    "algo.train_ways=5",
    "trainer.iterations=2",
    "eval.episodes=2",
    "eval.val_episodes=2",
]


@pytest.fixture(scope="session")
def protonet_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny ProtoNet run dir (checkpoints/{last,best}.pt); tests must not modify it."""
    from metalearn.build import build_run
    from metalearn.train import train

    root = real_data_root()
    if root is None:
        pytest.skip("real Omniglot not found: set METALEARN_DATA to the folder holding omniglot/")
    run_dir = tmp_path_factory.mktemp("protonet_run")
    train(build_run(compose_config([*TINY_PROTONET, f"data.root={root}"])), run_dir)
    return run_dir


@pytest.fixture
def float64():
    """float64 as the default dtype for the test (gradient checks against references)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def miniimagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniImageNet fixture in the distributed pickle format with enough classes and images
    for every published protocol (30-way training, 15-shot 6-query MetaOptNet episodes)."""
    from fixtures.miniimagenet import make_pickles, pixels, protocol_classes

    root = tmp_path_factory.mktemp("miniimagenet")
    classes = protocol_classes()
    make_pickles(root, pixels(classes=classes, per_class=21), classes)
    return root


@pytest.fixture
def data_root(
    request: pytest.FixtureRequest, miniimagenet_root: Path, monkeypatch: pytest.MonkeyPatch
):
    """data name -> the root its tests read (real Omniglot, or a fixture with its own cache;
    procedural data needs none, so any root does)."""

    def root(data: str) -> Path:
        if data == "sinusoid":
            return miniimagenet_root
        if data == "omniglot":
            return request.getfixturevalue("omniglot_root")
        monkeypatch.setenv("METALEARN_CACHE", str(miniimagenet_root / "cache"))
        return {"miniimagenet": miniimagenet_root}[data]

    return root
