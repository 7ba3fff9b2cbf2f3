"""tieredImageNet from each format users hold, on tiny fixtures in the real on-disk layouts."""

import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.tieredimagenet import class_names, class_sizes, make_npz, make_png_pickles, pixels

import metalearn.data.images.tieredimagenet as tiered
from metalearn.data.images.tieredimagenet import TieredImageNetConfig, load_tieredimagenet
from metalearn.errors import DataError

SIZES = class_sizes(train=6, other=3, smallest=3)  # 3 to 8 images per class: quick to build
SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data() -> dict[str, list[np.ndarray]]:
    return pixels(SIZES)


def load(root: Path, **options) -> dict:
    return load_tieredimagenet(TieredImageNetConfig(root=str(root), download=False, **options))


def make(layout: str, root: Path, data: dict) -> Path:
    if layout.startswith("png"):
        return make_png_pickles(root, data, py2=layout == "png")
    return make_npz(root, data, labels_key="labels" if layout == "npz_labels" else "ren")


LAYOUTS = ["png", "png_py3", "npz", "npz_labels"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_format_gives_the_same_images_per_class(layout: str, tmp_path: Path, data):
    make(layout, tmp_path, data)
    splits = load(tmp_path)
    first = 0
    for split in SPLITS:
        part = splits[split]
        want = np.concatenate(data[split])  # classes one after another, RGB
        assert part.images.dtype == torch.uint8
        assert torch.equal(part.images, torch.from_numpy(want).permute(0, 3, 1, 2)), split
        assert part.counts.tolist() == SIZES[split]
        ids = [str(first + c) for c in range(len(SIZES[split]))]  # MetaOptNet's ids
        assert part.classes == (ids if layout == "npz_labels" else class_names(split, len(ids)))
        first += len(ids)


def test_python2_pickles_need_latin1_and_get_it(tmp_path: Path, data):
    folder = make_png_pickles(tmp_path, data)
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load does with Ren's files
        pickle.loads((folder / "val_images_png.pkl").read_bytes())
    assert load(tmp_path)["val"].counts.tolist() == SIZES["val"]


@pytest.mark.parametrize("py2", [True, False])
def test_the_png_pickle_is_streamed_and_keeps_no_image(py2: bool, tmp_path: Path, data):
    path = make_png_pickles(tmp_path, data, py2=py2) / "train_images_png.pkl"
    refs = []
    take = lambda index, item: refs.append((index, weakref.ref(item)))  # noqa: E731
    loader = tiered._unpickle(path, tiered._StreamingUnpickler, take)
    assert [index for index, _ in refs] == list(range(sum(SIZES["train"])))
    assert loader.result == [] and loader.count == len(refs)
    assert all(ref() is None for _, ref in refs)  # neither the list nor the memo holds one


def test_images_are_resized_once_and_alike_from_both_formats(tmp_path: Path, data):
    make_png_pickles(tmp_path / "png", data)
    make_npz(tmp_path / "npz", data)
    png, npz = load(tmp_path / "png", image_size=32), load(tmp_path / "npz", image_size=32)
    assert png["test"].images.shape == (sum(SIZES["test"]), 3, 32, 32)
    assert all(torch.equal(png[s].images, npz[s].images) for s in SPLITS)


def test_the_cache_is_reused_memory_mapped_and_rebuilt_when_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data
):
    folder = make_npz(tmp_path, data)
    first = load(tmp_path)
    decoded = []
    real = tiered.decode_split
    monkeypatch.setattr(
        tiered, "decode_split", lambda f, s, *a: decoded.append(s) or real(f, s, *a)
    )
    again = load(tmp_path)
    assert decoded == [] and all(torch.equal(again[s].images, first[s].images) for s in SPLITS)
    caches = sorted((tmp_path / "cache").glob("tieredimagenet-84-*.pt"))
    assert len(caches) == 3  # one per split
    maps = Path("/proc/self/maps")
    if maps.is_file():  # the caches are mapped into memory, not read into it
        assert all(str(cache) in maps.read_text() for cache in caches)
    labels = folder / "val_labels.pkl"
    labels.write_bytes(labels.read_bytes() + b"\0")  # an edited file: new size, new fingerprint
    assert torch.equal(load(tmp_path)["val"].images, first["val"].images) and decoded == ["val"]


def test_wrong_keys_name_the_file_and_what_is_expected(tmp_path: Path, data):
    folder = make_npz(tmp_path, data)
    labels = folder / "test_labels.pkl"
    labels.write_bytes(pickle.dumps({"label_coarse": [0, 1]}))
    with pytest.raises(DataError, match="test_labels.pkl lacks label_specific.*labels"):
        load(tmp_path)
    make_npz(tmp_path, data)
    np.savez(folder / "val_images.npz", data=np.zeros((2, 84, 84, 3), np.uint8))
    with pytest.raises(DataError, match="val_images.npz lacks the array images.*found data"):
        load(tmp_path)


@pytest.mark.parametrize("name", ["train_images_png.pkl", "val_labels.pkl", "test_images.npz"])
def test_a_truncated_file_is_named_as_truncated(name: str, tmp_path: Path, data):
    folder = (make_npz if name.endswith(".npz") else make_png_pickles)(tmp_path, data)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{name} .*truncated"):
        load(tmp_path)


@pytest.mark.parametrize("name", ["test_labels.pkl", "test_images_png.pkl"])
def test_a_pickle_that_would_run_code_is_refused(name: str, tmp_path: Path, data, capsys):
    folder = make_png_pickles(tmp_path, data)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    payload = {"label_specific": Exploit()} if "labels" in name else [Exploit()]
    (folder / name).write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match=f"{name}: refusing to load builtins.print"):
        load(tmp_path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_and_mismatched_files_say_which_and_what(tmp_path: Path, data):
    with pytest.raises(DataError, match="lacks train_images.npz, train_labels.pkl.*data.download"):
        load(tmp_path / "empty")
    folder = make_png_pickles(tmp_path, data)
    (folder / "val_labels.pkl").unlink()
    with pytest.raises(DataError, match="PNG pickles it lacks val_labels.pkl\\."):
        load(tmp_path)
    make_png_pickles(tmp_path, data)
    images = pickle.loads((folder / "val_images_png.pkl").read_bytes(), encoding="latin1")
    (folder / "val_images_png.pkl").write_bytes(pickle.dumps(images[:-1]))
    with pytest.raises(DataError, match="val_images_png.pkl must be a list of one PNG per"):
        load(tmp_path)
    images[0] = np.frombuffer(b"not a png", np.uint8)
    (folder / "val_images_png.pkl").write_bytes(pickle.dumps(images))
    with pytest.raises(DataError, match="val_images_png.pkl: image 0 is not a decodable PNG"):
        load(tmp_path)


def test_download_fetches_the_png_pickles_from_the_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data
):
    source = make_png_pickles(tmp_path / "mirror", data)
    fetched = []

    def fake_download(url: str, dest: Path) -> Path:
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((source / url.rsplit("tiered-imagenet-", 1)[1]).read_bytes())
        return dest

    monkeypatch.setattr(tiered, "download", fake_download)
    cfg = TieredImageNetConfig(root=str(tmp_path / "root"), download=True)
    assert load_tieredimagenet(cfg)["train"].counts.tolist() == SIZES["train"]
    assert sorted(u.rsplit("/", 1)[1] for u in fetched) == sorted(
        f"tiered-imagenet-{s}_{kind}.pkl" for s in SPLITS for kind in ("images_png", "labels")
    )


def test_sampling_respects_class_sizes(tmp_path: Path, data):
    make_npz(tmp_path, data)
    cfg = TieredImageNetConfig(root=str(tmp_path), download=False)
    tasks = tiered.tieredimagenet_tasks(cfg, torch.device("cpu"))
    assert tasks.in_shape == (3, 84, 84) and tasks.classes("train") == len(SIZES["train"])
    smallest = min(SIZES["train"])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):  # 8 tasks of 4 ways, each way drawing all of the smallest class's size
        batch = tasks.sample("train", generator, 8, 4, 1, smallest - 1)
        x = torch.cat([batch.support.x, batch.query.x], 1)  # (T, N (K + Q), 3, 84, 84)
        y = torch.cat([batch.support.y, batch.query.y], 1)
        tags = (x[:, :, :, 0, 0] * 255).round().long()  # (T, N (K + Q), 3): split, class, index
        for task, labels in zip(tags, y, strict=True):
            for way in range(4):
                split, classes, index = tags_of = task[labels == way].T
                assert (split == 0).all() and (classes == classes[0]).all()  # one class per way
                assert len(set(index.tolist())) == smallest  # K + Q distinct examples
                assert index.max() < SIZES["train"][classes[0]]  # none past the class's size
                seen |= {tuple(row) for row in tags_of[1:].T.tolist()}
    assert max(e for _, e in seen) >= smallest  # the larger classes' extra images are drawn
    with pytest.raises(DataError, match="smallest class"):
        tasks.check("train", 4, 1, smallest)
