"""Shared fixtures: the real data root, Hydra composition of the project's configs, quiet W&B."""

import collections
import importlib.util
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
    from metalearn.cli import train

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


@pytest.fixture(scope="session")
def tieredimagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tieredImageNet fixture in Ren et al.'s PNG-pickle format, classes of 21 to 26 images,
    enough for every published protocol (30-way training, 10-shot 6-query MetaOptNet episodes,
    5-shot 15-query tests)."""
    from fixtures.tieredimagenet import class_sizes, make_png_pickles, pixels

    root = tmp_path_factory.mktemp("tieredimagenet")
    make_png_pickles(root, pixels(class_sizes()))
    return root


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar-100-python.tar.gz in the real format, all 100 classes with 21 images each (17 + 4):
    enough for every CIFAR-FS and FC100 protocol."""
    from fixtures.cifar100 import PROTOCOL_PER_CLASS, make_archive

    root = tmp_path_factory.mktemp("cifar100")
    make_archive(root, per_class=PROTOCOL_PER_CLASS)
    return root


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CUB-200-2011 archive in the official layout with 21 to 23 images per class."""
    from fixtures.cub import PROTOCOL_SIZES, make_archive, make_images

    root = tmp_path_factory.mktemp("cub")
    make_archive(root, make_images(sizes=PROTOCOL_SIZES))
    return root


# task families generated on the fly: no files, any root does
PROCEDURAL = ("sinusoid", "bandit", "dependent_bandit", "harlow", "tabular_mdp", "causal")
PROCEDURAL += ("navigation", "cheetah_velocity", "cheetah_direction")
PROCEDURAL += ("quadratic", "digits_mlp")  # optimizee problems (digits: scikit-learn's wheel)
PROCEDURAL += ("gp",)  # Gaussian-process functions
# data set -> the session fixture holding a protocol-sized copy in its real on-disk format
FIXTURE_ROOTS = {
    "miniimagenet": "miniimagenet_root",
    "tieredimagenet": "tieredimagenet_root",
    "cifarfs": "cifar100_root",
    "fc100": "cifar100_root",
    "cub": "cub_root",
}


@pytest.fixture
def data_root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """data name -> the root its tests read: real Omniglot, or a fixture (with its own decoded
    cache, shared by the session); procedural data needs none, so any folder does."""

    def root(data: str) -> Path:
        if data in PROCEDURAL:
            return request.getfixturevalue("tmp_path")
        if data in ("omniglot", "omniglot_completion"):
            return request.getfixturevalue("omniglot_root")
        folder = request.getfixturevalue(FIXTURE_ROOTS[data])
        monkeypatch.setenv("METALEARN_CACHE", str(folder / "cache"))
        return folder

    return root


def pytest_collection_modifyitems(config, items):
    """Tests marked `reference("pkg", ...)` compare with reference code that `make reference`
    installs (learn2learn, torchvision): without it they are skipped, saying so, so that
    `make install && make test` passes on a fresh machine; CI runs them after `make reference`."""
    for item in items:
        on_cpu = os.environ.get("METALEARN_CUDA_TESTS_ON") == "cpu"  # tests/test_cuda.py
        if item.get_closest_marker("cuda") and not (torch.cuda.is_available() or on_cpu):
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU: scripts/gpu_check.sh runs it"))
        marker = item.get_closest_marker("reference")
        if marker is None:
            continue
        missing = [name for name in marker.args if importlib.util.find_spec(name) is None]
        if missing:
            reason = f"{', '.join(missing)} not installed: run `make reference`"
            item.add_marker(pytest.mark.skip(reason=reason))


# tally key -> what the printed line says of it
FAULT_KINDS = {
    "sigkill": "SIGKILLs of real training runs, each resumed to the identical result",
    "sigkill_random": "  of which at random moments (in start-up, training or anything else)",
    "sigkill_checkpoint": "  of which halfway through a checkpoint write or between its renames",
    "sigkill_eval": "  of which halfway through a validation or the final test",
    "stop_signal": "SIGTERM/SIGINT stops, resumed to the identical result",
    "checkpoint_corrupt": "damaged checkpoints, fallen back to the previous good one or refused",
    "corrupt_input": "corrupted or wrong input files, each a clear error naming the file",
    "disk": "disk-full or unwritable outputs, a clear error or a warning, nothing lost",
    "nonfinite": "NaN/Inf faults, stopped or skipped by policy with the iteration named",
    "wandb": "W&B outages (unreachable, hanging, failing), training went on",
    "oom": "out-of-memory faults, a clear error with the peak memory",
    "invalid_config": "invalid configs, each refused at start-up naming the key and range",
    "valid_config": "valid random configs, each built",
    "determinism": "repeated or resumed runs compared, metrics identical",
}
FAULT_TALLY: collections.Counter = collections.Counter()  # summed from the tests' reports


def pytest_runtest_logreport(report) -> None:
    """Sum each faults test's tally (tests/faults/conftest.py), here or from xdist workers."""
    if report.when == "teardown":
        for key, counts in report.user_properties:
            if key == "tally":
                FAULT_TALLY.update(counts)


def pytest_terminal_summary(terminalreporter) -> None:
    if not FAULT_TALLY:
        return
    unknown = set(FAULT_TALLY) - set(FAULT_KINDS)
    assert not unknown, f"tally keys not in FAULT_KINDS: {unknown}"
    terminalreporter.section("faults injected and survived")
    for key, words in FAULT_KINDS.items():
        if FAULT_TALLY[key]:
            terminalreporter.write_line(f"{FAULT_TALLY[key]:5d}  {words}")
