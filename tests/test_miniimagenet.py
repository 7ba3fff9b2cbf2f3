"""miniImageNet from each format users hold, on tiny fixtures in the real on-disk layouts."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.miniimagenet import (
    CLASSES,
    PER_CLASS,
    make_folder,
    make_imagenet,
    make_pickles,
    pixels,
)

from metalearn.data.images.miniimagenet import MiniImageNetConfig, load_miniimagenet, ravi_lists
from metalearn.errors import DataError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))


def expected(data: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {s: torch.from_numpy(x).permute(0, 1, 4, 2, 3) for s, x in data.items()}


def load(root: Path, **options) -> dict[str, torch.Tensor]:
    return load_miniimagenet(MiniImageNetConfig(root=str(root), download=False, **options))


@pytest.mark.parametrize("layout", ["pickle", "folder", "folder_per_class", "imagenet"])
def test_every_format_gives_the_same_images_per_class(layout: str, tmp_path: Path):
    data = pixels()
    if layout == "pickle":
        make_pickles(tmp_path, data)
    elif layout == "imagenet":
        make_imagenet(tmp_path, data)
    else:
        make_folder(tmp_path, data, per_class_dirs=layout == "folder_per_class")
    images = load(tmp_path)
    for split, want in expected(data).items():
        assert images[split].dtype == torch.uint8
        assert images[split].shape == (len(CLASSES[split]), PER_CLASS, 3, 84, 84)
        assert torch.equal(images[split], want), f"{layout}: {split}"


def test_the_cache_is_used_on_the_next_load_and_rebuilt_when_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import metalearn.data.images.miniimagenet as mini

    folder = make_folder(tmp_path, pixels())
    first = load(tmp_path)
    decoded = []
    real = mini.decode_folder
    monkeypatch.setattr(mini, "decode_folder", lambda *a: decoded.append(1) or real(*a))
    assert torch.equal(load(tmp_path)["train"], first["train"]) and not decoded
    image = next((folder / "images").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")  # an edited file: new size, new fingerprint
    assert torch.equal(load(tmp_path)["train"], first["train"]) and decoded == [1]
    blob = torch.load(
        next((tmp_path / "cache").glob("miniimagenet-*.pt")), mmap=True, weights_only=True
    )
    assert blob["train_classes"] == CLASSES["train"]


def test_images_are_resized_once_to_the_configured_size(tmp_path: Path):
    make_pickles(tmp_path, pixels())
    images = load(tmp_path, image_size=32)
    assert images["test"].shape == (2, PER_CLASS, 3, 32, 32)


def test_wrong_pickle_keys_name_the_file_and_what_is_expected(tmp_path: Path):
    folder = make_pickles(tmp_path, pixels())
    bad = folder / "mini-imagenet-cache-validation.pkl"
    bad.write_bytes(pickle.dumps({"images": np.zeros((1, 84, 84, 3), np.uint8)}))
    with pytest.raises(DataError, match="mini-imagenet-cache-validation.pkl.*image_data"):
        load(tmp_path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path):
    folder = make_pickles(tmp_path, pixels())

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load(tmp_path)


def test_missing_images_and_missing_data_say_where_and_what(tmp_path: Path):
    folder = make_folder(tmp_path, pixels())
    next((folder / "images").glob("n01930112*.jpg")).unlink()
    with pytest.raises(DataError, match="class n01930112 listed in the Ravi test split"):
        load(tmp_path)
    with pytest.raises(DataError, match="mini-imagenet-cache-.*data.imagenet"):
        load(tmp_path / "empty")


def test_the_packaged_ravi_split_is_64_16_20_classes_of_600():
    lists = ravi_lists(Path("/nonexistent"))
    assert [len(lists[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert all(len(files) == 600 for split in lists.values() for files in split.values())
    classes = [set(lists[s]) for s in lists]
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])


def test_a_pickle_calling_numpy_functions_is_refused(tmp_path: Path):
    folder = make_pickles(tmp_path, pixels())
    target = tmp_path / "written.npy"

    class Exploit:  # numpy.save would write a file: only data constructors may load
        def __reduce__(self):
            return (np.save, (str(target), np.zeros(1)))

    (folder / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(DataError, match="refusing to load numpy"):
        load(tmp_path)
    assert not target.exists()
