"""CIFAR-FS and FC100 from a tiny cifar-100-python.tar.gz in the real format, and from MetaOptNet's
pickles: the packaged splits, the decoded pixels, the cache, and every failure's message."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.cifar100 import (
    FINE,
    PER_CLASS,
    SUPERCLASS,
    make_archive,
    make_pickles,
    members,
    write_archive,
)

import metalearn.data.images.cifar as cifar
from metalearn.data.images.cifar import CIFARFSConfig, FC100Config, load_cifar, split_lists
from metalearn.errors import DataError

CONFIGS = {"cifarfs": CIFARFSConfig, "fc100": FC100Config}


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))


def load(name: str, root: Path, **options) -> dict[str, torch.Tensor]:
    return load_cifar(CONFIGS[name](root=str(root), download=False, **options))


def classes(name: str) -> dict[str, list[str]]:
    return {
        split: [e.rpartition("/")[2] for e in entries]
        for split, entries in split_lists(name).items()
    }


@pytest.mark.parametrize(("name", "sizes"), [("cifarfs", [64, 16, 20]), ("fc100", [60, 20, 20])])
def test_the_packaged_splits_cover_cifar100_with_disjoint_classes(name: str, sizes: list[int]):
    lists = classes(name)
    assert [len(lists[s]) for s in ("train", "val", "test")] == sizes
    train, val, test = (set(lists[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert sorted(train | val | test) == FINE


def test_fc100_splits_whole_superclasses_12_4_4_as_in_tadam():
    for entries in split_lists("fc100").values():
        for entry in entries:
            superclass, _, name = entry.partition("/")
            assert SUPERCLASS[name] == superclass, entry
    superclasses = {
        s: {e.partition("/")[0] for e in split_lists("fc100")[s]} for s in classes("fc100")
    }
    assert [len(superclasses[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert superclasses["test"] == {"aquatic_mammals", "insects", "medium_mammals", "people"}


@pytest.mark.parametrize("name", ["cifarfs", "fc100"])
def test_the_archive_decodes_to_its_pixels_class_by_class(name: str, tmp_path: Path):
    pixels = make_archive(tmp_path)
    images = load(name, tmp_path)
    for split, names in classes(name).items():
        assert images[split].dtype == torch.uint8
        assert images[split].shape == (len(names), sum(PER_CLASS), 3, 32, 32)
        want = torch.from_numpy(np.stack([pixels[c] for c in names]))  # channel-major rows
        assert torch.equal(images[split], want), split


def test_images_are_resized_once_to_the_configured_size(tmp_path: Path):
    make_archive(tmp_path)
    assert load("fc100", tmp_path, image_size=20)["val"].shape == (20, sum(PER_CLASS), 3, 20, 20)


def test_the_cache_is_used_on_the_next_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    make_archive(tmp_path)
    first = load("cifarfs", tmp_path)
    decoded = []
    real = cifar.read_archive
    monkeypatch.setattr(cifar, "read_archive", lambda *a: decoded.append(1) or real(*a))
    again = load("cifarfs", tmp_path)
    assert torch.equal(again["test"], first["test"]) and not decoded
    blob = torch.load(next((tmp_path / "cache").glob("cifarfs-32-*.pt")), weights_only=True)
    assert blob["test_classes"] == classes("cifarfs")["test"]
    load("fc100", tmp_path)  # another data set from the same archive: its own cache
    assert decoded == [1]


def test_metaoptnet_pickles_are_read_before_the_archive(tmp_path: Path):
    pixels = make_archive(tmp_path / "other")
    splits = classes("fc100")
    make_pickles(tmp_path / "fc100", "FC100", splits, pixels)
    images = load("fc100", tmp_path)  # no archive under tmp_path: the pickles alone
    for split, names in splits.items():
        order = sorted(names, key=FINE.index)  # classes come in label order
        want = torch.from_numpy(np.stack([pixels[c] for c in order]))
        assert torch.equal(images[split], want), split


def test_a_pickle_with_another_split_says_how_many_classes(tmp_path: Path):
    pixels = make_archive(tmp_path / "other")
    splits = classes("cifarfs") | {"val": classes("cifarfs")["val"][:15]}
    make_pickles(tmp_path / "cifarfs", "CIFAR_FS", splits, pixels)
    with pytest.raises(
        DataError, match="CIFAR_FS_val.pickle holds 15 classes; the val split has 16"
    ):
        load("cifarfs", tmp_path)


def test_a_truncated_archive_is_a_clear_error(tmp_path: Path):
    make_archive(tmp_path)
    archive = tmp_path / "cifar100" / "cifar-100-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cifar-100-python.tar.gz is truncated or corrupt.*md5"):
        load("cifarfs", tmp_path)
    archive.write_bytes(gzip.compress(b"not a tar file" * 100))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load("cifarfs", tmp_path)


def test_wrong_pickle_keys_name_the_member_and_the_keys(tmp_path: Path):
    blobs, _ = members()
    blobs["test"][b"labels"] = blobs["test"].pop(b"fine_labels")  # CIFAR-10's key
    write_archive(tmp_path / "cifar100" / "cifar-100-python.tar.gz", blobs)
    with pytest.raises(DataError, match=r"cifar-100-python/test lacks the key\(s\) fine_labels"):
        load("fc100", tmp_path)


def test_a_missing_member_and_a_wrong_shape_are_named(tmp_path: Path):
    blobs, _ = members()
    archive = tmp_path / "cifar100" / "cifar-100-python.tar.gz"
    write_archive(archive, {k: v for k, v in blobs.items() if k != "meta"})
    with pytest.raises(DataError, match="lacks cifar-100-python/meta; it is not"):
        load("cifarfs", tmp_path)
    blobs["train"][b"data"] = blobs["train"][b"data"][:, :1024]  # one plane only
    write_archive(archive, blobs)
    with pytest.raises(DataError, match=r"cifar-100-python/train: data has shape \(300, 1024\)"):
        load("cifarfs", tmp_path)


def test_class_names_missing_from_the_archive_are_listed(tmp_path: Path):
    blobs, _ = members()
    names = blobs["meta"][b"fine_label_names"]
    names[names.index(b"pickup_truck")] = b"pickup"
    write_archive(tmp_path / "cifar100" / "cifar-100-python.tar.gz", blobs)
    with pytest.raises(
        DataError, match=r"1 class\(es\) of the test split are not in .*\(pickup_truck\)"
    ):
        load("cifarfs", tmp_path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    blobs, _ = members()
    raw = {"meta": pickle.dumps({b"fine_label_names": Exploit()}, protocol=2)}
    write_archive(tmp_path / "cifar100" / "cifar-100-python.tar.gz", blobs, raw)
    with pytest.raises(DataError, match=r"refusing to load (builtins|__builtin__)\.print"):
        load("cifarfs", tmp_path)


def test_a_missing_archive_names_the_file_and_where_it_was_looked_for(tmp_path: Path):
    with pytest.raises(DataError, match=r"looked for .*cifar100/cifar-100-python.tar.gz.*md5"):
        load("fc100", tmp_path)


def test_torchvisions_archive_at_the_root_is_found(tmp_path: Path):
    pixels = make_archive(tmp_path)
    (tmp_path / "cifar100" / "cifar-100-python.tar.gz").rename(tmp_path / "cifar-100-python.tar.gz")
    names = classes("cifarfs")["val"]
    want = torch.from_numpy(np.stack([pixels[c] for c in names]))
    assert torch.equal(load("cifarfs", tmp_path)["val"], want)


def test_the_archive_is_downloaded_with_its_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    source = tmp_path / "source"
    make_archive(source)
    calls = []

    def fake_download(url: str, dest: Path, *, md5: str | None = None) -> Path:
        calls.append((url, dest, md5))
        dest.parent.mkdir(parents=True)
        dest.write_bytes((source / "cifar100" / "cifar-100-python.tar.gz").read_bytes())
        return dest

    monkeypatch.setattr(cifar, "download", fake_download)
    tasks = cifar.fc100_tasks(FC100Config(root=str(tmp_path / "data")), torch.device("cpu"))
    archive = tmp_path / "data" / "cifar100" / "cifar-100-python.tar.gz"
    assert calls == [(cifar.URL, archive, "eb9058c3a382ffc7106e4002c42a8d85")]
    assert tasks.in_shape == (3, 32, 32) and tasks.classes("train") == 60
