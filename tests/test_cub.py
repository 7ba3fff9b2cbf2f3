"""CUB-200-2011 from its official archive (or the extracted folder), on a tiny fixture in the real
layout: the Chen et al. split, pixels and class sizes, the cache, and clear errors."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.cub import CLASSES, SIZE, SIZES, decoded, lists, make_archive, make_images
from PIL import Image

import metalearn.data.images.cub as cub
from metalearn.data.files.preprocess import image_array
from metalearn.data.images.cub import CUBConfig, chen_split, cub_tasks, load_cub
from metalearn.errors import DataError


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))


def load(root: Path, **options) -> dict[str, cub.CUBSplit]:
    return load_cub(CUBConfig(root=str(root), download=False, **{"image_size": SIZE} | options))


def test_the_split_is_chen_et_als_100_50_50_disjoint_classes(tmp_path: Path):
    make_archive(tmp_path)
    splits = load(tmp_path)
    names = sorted(CLASSES)  # write_CUB_filelist.py: index in sorted order, % 2 == 0 base, ...
    want = {"train": names[0::2], "val": names[1::4], "test": names[3::4]}
    assert {s: splits[s].classes for s in splits} == want == chen_split(list(reversed(CLASSES)))
    assert [len(splits[s].classes) for s in ("train", "val", "test")] == [100, 50, 50]
    train, val, test = (set(splits[s].classes) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test) and train | val | test == set(CLASSES)
    assert want["val"][:2] == ["002.Bird_2", "006.Bird_6"] and want["test"][0] == "004.Bird_4"


def test_images_and_class_sizes_are_those_of_the_archive_in_image_id_order(tmp_path: Path):
    images = make_images()
    make_archive(tmp_path, images)
    splits = load(tmp_path)
    for split, part in splits.items():
        counts = [len(images[c]) for c in part.classes]
        assert part.counts.tolist() == counts and len(set(counts)) == len(SIZES), split
        want = [decoded(data) for c in part.classes for _, _, data in images[c]]
        assert part.images.dtype == torch.uint8
        assert torch.equal(part.images, torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2))
    first_gray = images["002.Bird_2"][2]  # image id 5 was saved as a grayscale JPEG
    assert Image.open(io.BytesIO(first_gray[2])).mode == "L"
    gray = splits["val"].images[2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_images_are_resized_once_with_the_shared_preprocessing(tmp_path: Path):
    images = make_images()
    make_archive(tmp_path, images)
    test = load(tmp_path, image_size=32)["test"]
    assert test.images.shape == (int(test.counts.sum()), 3, 32, 32)
    data = images[test.classes[0]][0][2]
    want = image_array(Image.open(io.BytesIO(data)), mode="RGB", invert=False, size=32)
    assert torch.equal(test.images[0], torch.from_numpy(want.copy()).permute(2, 0, 1))


def test_the_extracted_folder_gives_the_same_splits(tmp_path: Path):
    archive = make_archive(tmp_path / "a")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "b" / "cub", filter="data")
    from_archive, from_folder = load(tmp_path / "a"), load(tmp_path / "b")
    for split, part in from_archive.items():
        assert part.classes == from_folder[split].classes
        assert torch.equal(part.images, from_folder[split].images)
        assert torch.equal(part.counts, from_folder[split].counts)


def test_the_cache_is_reused_and_rebuilt_when_the_archive_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    archive = make_archive(tmp_path)
    first = load(tmp_path)
    decoded_again = []
    real = cub.decode_archive
    monkeypatch.setattr(cub, "decode_archive", lambda *a: decoded_again.append(1) or real(*a))
    assert torch.equal(load(tmp_path)["train"].images, first["train"].images)
    assert not decoded_again and len(list((tmp_path / "cache").glob("cub-16-*.pt"))) == 1
    make_archive(tmp_path, make_images(seed=1))  # another archive at the same path
    assert archive.is_file() and not torch.equal(
        load(tmp_path)["train"].images, first["train"].images
    )
    assert decoded_again == [1]


def test_tasks_are_drawn_from_classes_of_different_sizes(tmp_path: Path):
    make_archive(tmp_path)
    tasks = cub_tasks(
        CUBConfig(root=str(tmp_path), download=False, image_size=SIZE), torch.device("cpu")
    )
    assert tasks.in_shape == (3, SIZE, SIZE) and tasks.classes("train") == 100
    batch = tasks.sample("val", torch.Generator().manual_seed(0), 2, 5, 1, 1)
    assert batch.support.x.shape == (2, 5, 3, SIZE, SIZE) and batch.query.x.shape[1] == 5
    with pytest.raises(DataError, match="has 2 in its smallest class"):
        tasks.check("test", 5, 1, 2)


def test_a_truncated_archive_is_named_as_truncated(tmp_path: Path):
    archive = make_archive(tmp_path)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"CUB_200_2011.tgz is truncated or corrupt"):
        load(tmp_path)


def test_an_undecodable_image_is_named(tmp_path: Path):
    images = make_images()
    image_id, filename, data = images["010.Bird_10"][1]
    images["010.Bird_10"][1] = (image_id, filename, data[: len(data) // 3])
    make_archive(tmp_path, images)
    with pytest.raises(
        DataError, match=f"cannot decode the image CUB_200_2011/images/010.Bird_10/{filename}"
    ):
        load(tmp_path)


@pytest.mark.parametrize(
    "member", ["../escape.txt", "/tmp/escape.jpg", "CUB_200_2011/images/../../x"]
)
def test_member_paths_outside_the_data_set_are_refused(tmp_path: Path, member: str):
    make_archive(tmp_path, extra={member: b"x"})
    with pytest.raises(DataError, match="refusing the path .* outside the data set"):
        load(tmp_path)


def test_a_listed_path_outside_the_data_set_is_refused(tmp_path: Path):
    text = "1 001.Bird_1/../../../etc/passwd\n"
    make_archive(tmp_path, text={"images.txt": text, "image_class_labels.txt": "1 1\n"})
    with pytest.raises(DataError, match="images.txt: refusing the path '001.Bird_1/../"):
        load(tmp_path)


def test_a_class_without_images_and_a_missing_image_are_reported(tmp_path: Path):
    images = make_images()
    images["007.Bird_7"] = []
    make_archive(tmp_path, images)
    with pytest.raises(DataError, match="class 007.Bird_7 .* has no images"):
        load(tmp_path)
    images = make_images()
    listed = lists(images)
    _, lost, _ = images["003.Bird_3"].pop()
    make_archive(tmp_path, images, text=listed)  # listed, but not in the archive
    with pytest.raises(DataError, match=f"1 images listed in images.txt are missing .*{lost}"):
        load(tmp_path)


def test_a_missing_data_set_says_which_files_go_where(tmp_path: Path):
    folder = tmp_path / "cub"
    with pytest.raises(DataError, match="download is false") as error:
        load(tmp_path)
    assert f"{folder / 'CUB_200_2011.tgz'}" in str(error.value)
    assert f"{folder / 'CUB_200_2011'}/ (images.txt" in str(error.value)


def test_the_archive_is_downloaded_with_its_md5_from_the_mirror_when_caltech_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    source = make_archive(tmp_path / "source")
    calls = []

    def fake_download(url: str, dest: Path, *, md5: str) -> Path:
        calls.append((url, md5))
        if "caltech" in url:
            raise DataError("HTTP Error 503")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
        return dest

    monkeypatch.setattr(cub, "download", fake_download)
    splits = load_cub(CUBConfig(root=str(tmp_path / "root"), download=True, image_size=SIZE))
    assert [url for url, _ in calls] == list(cub.URLS) and {m for _, m in calls} == {cub.MD5}
    assert len(splits["test"].classes) == 50
