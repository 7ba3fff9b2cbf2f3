"""`metalearn eval checkpoint=… episode.support=DIR episode.query=DIR` on real Omniglot drawings."""

import csv
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import compose_config, real_data_root
from PIL import Image

from metalearn.build import build_run
from metalearn.cli import train
from metalearn.data.files.classes import read_class_list
from metalearn.data.images.omniglot import load_characters
from metalearn.episode import _load
from metalearn.errors import DataError, MetalearnError
from metalearn.reevaluate import evaluate_checkpoint

# images_<part>/<Alphabet>/characterKK/<ID>_<DD>.png, DD = drawer
MEMBER = re.compile(r"/(?P<character>[^/]+/character\d+)/\d+_(?P<drawer>\d+)\.png$")
TINY_MAML = [
    "algo=maml",
    "data=omniglot",
    "debug=smoke",
    "hardware.threads=1",
    "trainer.iterations=1",
    "trainer.eval_every=1",
    "trainer.meta_batch_size=1",
    "data.query=1",
    "eval.episodes=1",
    "eval.val_episodes=1",
]


@pytest.fixture(scope="module")
def root() -> Path:
    root = real_data_root()
    if root is None:
        pytest.skip("real Omniglot not found: set METALEARN_DATA to the folder holding omniglot/")
    return root


@pytest.fixture(scope="module")
def drawings(root: Path) -> dict[str, dict[int, bytes]]:
    """Original 105x105 PNG bytes of a few meta-test characters: character -> drawer -> bytes."""
    test_classes = read_class_list("omniglot", "vinyals", "test")
    characters = [c.removesuffix("/rot000") for c in test_classes if c.endswith("/rot000")]
    wanted = set(characters[::40][:5])  # five characters, mostly of different alphabets
    found: dict[str, dict[int, bytes]] = {}
    for part in ("background", "evaluation"):
        with zipfile.ZipFile(root / "omniglot" / f"images_{part}.zip") as archive:
            for name in archive.namelist():
                match = MEMBER.search(name)
                if match and match["character"] in wanted and int(match["drawer"]) <= 5:
                    drawn = found.setdefault(match["character"], {})
                    drawn[int(match["drawer"])] = archive.read(name)
    assert len(found) == 5 and all(len(d) == 5 for d in found.values())
    return dict(sorted(found.items()))


def save(data: bytes, path: Path, *, mode: str | None = None, size: int | None = None) -> Path:
    """Write a drawing as-is, or converted to `mode`, resized and saved in the suffix's format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None and size is None and path.suffix == ".png":
        path.write_bytes(data)
        return path
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert(mode or "L")
        if size is not None:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        image.save(path)
    return path


def make_episode(folder: Path, drawings: dict[str, dict[int, bytes]], classes: int) -> dict:
    """support/<class>/: 2 drawings per class; query/<class>/: 2 more; query/loose.png: 1 more.

    Formats vary on purpose: the original 1-bit 105x105 PNG, RGB JPEG, 64x64 greyscale PNG and a
    150x150 RGB PNG must all be read as the training cache was made.
    """
    names = {}
    for i, (character, drawn) in enumerate(list(drawings.items())[:classes]):
        name = names[character] = character.replace("/", "-")
        save(drawn[1], folder / "support" / name / "a.png")
        if i % 2:
            save(drawn[2], folder / "support" / name / "b.jpg", mode="RGB")
        else:
            save(drawn[2], folder / "support" / name / "b.png", mode="L", size=64)
        save(drawn[3], folder / "query" / name / "c.png", mode="RGB", size=150)
        save(drawn[4], folder / "query" / name / "d.jpeg", mode="RGB")
    first = next(iter(drawings))
    save(drawings[first][5], folder / "query" / "loose.png")
    return {"support": folder / "support", "query": folder / "query", "names": names}


def classify(checkpoint: Path, support: Path, query: Path, run_dir: Path, *extra: str) -> dict:
    overrides = [
        f"checkpoint={checkpoint}",
        f"episode.support={support}",
        f"episode.query={query}",
        *extra,
    ]
    composed = compose_config(overrides, "eval")
    return evaluate_checkpoint(composed=composed, overrides=overrides, run_dir=run_dir)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def maml_checkpoint(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MAML Omniglot run: a conv4 with a 5-way head."""
    run_dir = tmp_path_factory.mktemp("maml_run")
    train(build_run(compose_config([*TINY_MAML, f"data.root={root}"])), run_dir)
    return run_dir / "checkpoints" / "best.pt"


def test_a_protonet_checkpoint_classifies_a_folder_episode(protonet_run_dir, drawings, tmp_path):
    episode = make_episode(tmp_path / "episode", drawings, classes=3)
    best = protonet_run_dir / "checkpoints" / "best.pt"
    results = classify(best, episode["support"], episode["query"], tmp_path / "eval")
    classes = sorted(episode["names"].values())
    summary = results["episode"]
    assert summary["classes"] == classes
    assert (summary["support_images"], summary["query_images"]) == (6, 7)
    assert summary["labelled_query_images"] == 6
    rows = read_rows(tmp_path / "eval" / "predictions.csv")
    assert summary["predictions"] == str(tmp_path / "eval" / "predictions.csv")
    queries = sorted(p for p in episode["query"].rglob("*") if p.is_file())
    assert sorted(Path(r["image"]) for r in rows) == queries  # one row per query image
    for row in rows:
        assert row["predicted"] in classes
        # The arg-max of a 3-way softmax is at least 1/3 (CSV rounds to 4 digits).
        assert 1 / 3 - 1e-4 <= float(row["probability"]) <= 1
        image = Path(row["image"])
        assert row["true"] == ("" if image.parent == episode["query"] else image.parent.name)
    labelled = [r for r in rows if r["true"]]
    correct = sum(r["predicted"] == r["true"] for r in labelled)
    assert summary["accuracy"] == pytest.approx(correct / len(labelled))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["episode"]["accuracy"] == pytest.approx(summary["accuracy"])
    assert saved["checkpoint"] == str(best)


def test_user_images_are_preprocessed_exactly_like_the_training_cache(
    protonet_run_dir, drawings, root, tmp_path
):
    state = torch.load(protonet_run_dir / "checkpoints" / "best.pt", weights_only=False)
    preprocess = state["preprocess"]  # what eval applies to user images
    assert preprocess == build_run(state["config"]).preprocess
    characters = load_characters(root, image_size=preprocess["size"])
    for character, drawn in list(drawings.items())[:2]:
        cached = characters.images[characters.names.index(character)]  # uint8 (20, 28, 28)
        for drawer in (1, 4):
            png = save(drawn[drawer], tmp_path / f"{drawer}.png")
            rgb = save(drawn[drawer], tmp_path / f"{drawer}-rgb.png", mode="RGB")
            x = _load([png, rgb], preprocess, torch.device("cpu"))
            assert x.shape == (2, 1, preprocess["size"], preprocess["size"])
            expected = cached[drawer - 1].float() / 255.0
            assert torch.equal(x[0, 0], expected), f"{character} drawer {drawer}"
            assert torch.equal(x[1, 0], expected), f"{character} drawer {drawer} as RGB"


def test_a_maml_checkpoint_classifies_an_episode_of_its_own_ways(
    maml_checkpoint, drawings, tmp_path
):
    episode = make_episode(tmp_path / "episode", drawings, classes=5)
    output = tmp_path / "out" / "maml.csv"
    results = classify(
        maml_checkpoint,
        episode["support"],
        episode["query"],
        tmp_path / "eval",
        f"episode.output={output}",
    )
    rows = read_rows(output)
    assert len(rows) == results["episode"]["query_images"] == 11
    assert all(0.2 - 1e-4 <= float(r["probability"]) <= 1 for r in rows)
    assert 0 <= results["episode"]["accuracy"] <= 1


def test_a_checkpoint_alone_classifies_an_episode_without_the_data_set(
    maml_checkpoint, drawings, tmp_path, monkeypatch
):
    """On a machine with only the checkpoint (moved away from its run, the data root an empty
    folder) the episode's predictions are those made where the data set is on disk."""
    episode = make_episode(tmp_path / "episode", drawings, classes=5)
    classify(maml_checkpoint, episode["support"], episode["query"], tmp_path / "with_data")
    alone = tmp_path / "alone" / "model.pt"
    alone.parent.mkdir()
    alone.write_bytes(maml_checkpoint.read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("METALEARN_DATA", str(empty))
    results = classify(
        alone, episode["support"], episode["query"], tmp_path / "alone_eval", f"data.root={empty}"
    )
    assert results["episode"]["query_images"] == 11
    with_data = read_rows(tmp_path / "with_data" / "predictions.csv")
    assert read_rows(tmp_path / "alone_eval" / "predictions.csv") == with_data
    with pytest.raises(DataError, match="omniglot"):  # a re-test does need the data set
        evaluate_checkpoint(
            composed=compose_config([f"checkpoint={alone}", f"data.root={empty}"], "eval"),
            overrides=[f"checkpoint={alone}", f"data.root={empty}"],
            run_dir=tmp_path / "retest",
        )


def test_a_maml_head_of_other_ways_than_the_support_classes_is_a_data_error(
    maml_checkpoint, drawings, tmp_path
):
    episode = make_episode(tmp_path / "episode", drawings, classes=3)
    with pytest.raises(DataError) as error:
        classify(maml_checkpoint, episode["support"], episode["query"], tmp_path / "eval")
    assert "5-way head" in str(error.value) and "3 classes" in str(error.value)
    assert not (tmp_path / "eval" / "predictions.csv").exists()


@pytest.mark.parametrize("missing", ["support", "query"])
def test_a_missing_episode_folder_is_a_data_error(protonet_run_dir, drawings, tmp_path, missing):
    episode = make_episode(tmp_path / "episode", drawings, classes=3)
    episode[missing] = tmp_path / "nowhere"
    best = protonet_run_dir / "checkpoints" / "best.pt"
    with pytest.raises(DataError) as error:
        classify(best, episode["support"], episode["query"], tmp_path / "eval")
    assert str(tmp_path / "nowhere") in str(error.value) and "does not exist" in str(error.value)


def test_a_support_folder_with_one_class_is_a_data_error(protonet_run_dir, drawings, tmp_path):
    episode = make_episode(tmp_path / "episode", drawings, classes=1)
    best = protonet_run_dir / "checkpoints" / "best.pt"
    with pytest.raises(DataError) as error:
        classify(best, episode["support"], episode["query"], tmp_path / "eval")
    assert "at least 2 classes" in str(error.value) and "found 1" in str(error.value)


def test_query_folders_must_name_support_classes(protonet_run_dir, drawings, tmp_path):
    episode = make_episode(tmp_path / "episode", drawings, classes=3)
    first = next(iter(drawings.values()))
    save(first[5], episode["query"] / "Unknown-class" / "e.png")
    best = protonet_run_dir / "checkpoints" / "best.pt"
    with pytest.raises(DataError, match="Unknown-class"):
        classify(best, episode["support"], episode["query"], tmp_path / "eval")


def test_an_unreadable_image_is_a_data_error_naming_it(protonet_run_dir, drawings, tmp_path):
    episode = make_episode(tmp_path / "episode", drawings, classes=3)
    broken = next(episode["support"].iterdir()) / "broken.png"
    broken.write_bytes(b"not a png")
    best = protonet_run_dir / "checkpoints" / "best.pt"
    with pytest.raises(DataError) as error:
        classify(best, episode["support"], episode["query"], tmp_path / "eval")
    assert str(broken) in str(error.value)


def test_a_support_folder_needs_a_query_folder(protonet_run_dir, drawings, tmp_path):
    episode = make_episode(tmp_path / "episode", drawings, classes=3)
    best = protonet_run_dir / "checkpoints" / "best.pt"
    overrides = [f"checkpoint={best}", f"episode.support={episode['support']}"]
    with pytest.raises(MetalearnError, match="episode.query"):
        evaluate_checkpoint(compose_config(overrides, "eval"), overrides, tmp_path / "eval")


def test_the_cli_classifies_an_episode(protonet_run_dir, drawings, tmp_path):
    episode = make_episode(tmp_path / "episode", drawings, classes=3)
    output = tmp_path / "predictions.csv"
    args = [
        f"checkpoint={protonet_run_dir / 'checkpoints' / 'best.pt'}",
        f"episode.support={episode['support']}",
        f"episode.query={episode['query']}",
        f"episode.output={output}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "metalearn.cli", "eval", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"7 query images -> {output}; accuracy" in out.stdout
    assert len(read_rows(output)) == 7
