"""Corrupt, truncated or wrong input files, built in the real on-disk formats of each release: every
one is a DataError, raised while the data loads (before any training), that names the file and
what is wrong; and no archive member or link may point outside the data set.

Each test damages a tiny copy of one data set, loads it through the loader the CLI uses and checks
the message; the truncated Omniglot archive of tests/test_errors.py is not repeated here. Images of
another size than the release's are resized (user images get the same preprocessing), so the
"wrong size" faults are arrays of the wrong shape and images that claim a size no loader decodes.
"""

import copy
import io
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import real_data_root
from fixtures import cifar100, cub, miniimagenet, tieredimagenet

from metalearn.data.files import classes
from metalearn.data.images.cifar import CIFARFSConfig, load_cifar, split_lists
from metalearn.data.images.cub import CUBConfig, load_cub
from metalearn.data.images.miniimagenet import MiniImageNetConfig, load_miniimagenet
from metalearn.data.images.omniglot import load_characters, load_omniglot
from metalearn.data.images.tieredimagenet import TieredImageNetConfig, load_tieredimagenet
from metalearn.errors import DataError

# pixels a side of an image no loader decodes: 9e8 pixels, over PIL's limit of 2 * 89,478,485
HUGE = 30_000


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh decode cache: every load reads the damaged files themselves."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))


def refused(load: Callable[[], object], words: list[str]) -> str:
    """The message of the DataError that `load()` raises; it must hold each of `words`."""
    with pytest.raises(DataError) as error:
        load()
    message = str(error.value)
    for word in words:
        assert word in message, f"{word!r} is not in the message: {message}"
    return message


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height: signature, IHDR, empty IDAT, IEND (PIL reads the size
    from IHDR when it opens the file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def jpeg_header(width: int, height: int) -> bytes:
    """A baseline JPEG's start, frame header (its size) and end: no scan to decode."""
    frame = struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + frame + b"\xff\xd9"


def tar_entry(name: str, link: str | None = None, kind: bytes = tarfile.SYMTYPE):
    """A one-byte file member `name`, or a link member `name` -> `link` (symbolic or hard)."""
    info = tarfile.TarInfo(name)
    if link is None:
        info.size = 1
    else:
        info.type, info.linkname = kind, link
    return info


def prepend_members(path: Path, extra: list[tarfile.TarInfo]) -> None:
    """Rewrite the .tar.gz at `path` with the members `extra` first."""
    with tarfile.open(path) as tar:
        kept = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x") if info.isfile() else None)
        for info, data in kept:
            tar.addfile(info, None if data is None else io.BytesIO(data))


# gzip faults shared by the .tar.gz releases (CIFAR-100, CUB): each returns the words of its error
def html_page(path: Path) -> list[str]:
    path.write_bytes(b"<html><body>503 Service Unavailable</body></html>\n")  # a proxy's answer
    return [str(path), "truncated or corrupt"]


def flipped_checksum(path: Path) -> list[str]:
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # the gzip trailer's CRC-32: every member reads, only the check can tell
    path.write_bytes(bytes(raw))
    return [str(path), "truncated or corrupt", "CRC check failed"]


def cut_off_end(path: Path) -> list[str]:
    path.write_bytes(path.read_bytes()[:-4])  # all members intact, the trailer cut short
    return [str(path), "truncated or corrupt", "ended before the end-of-stream marker"]


GZIP_FAULTS = [html_page, flipped_checksum, cut_off_end]


def fault_id(fault: Callable) -> str:
    return fault.__name__.replace("_", "-")


# --- Omniglot: images_{background,evaluation}.zip ----------------------------------------------


@pytest.fixture(scope="module")
def omniglot_members() -> dict[str, dict[str, bytes]]:
    """part -> member name -> PNG: the first two characters of each archive's first alphabet, cut
    from the real archives (without them, test_omniglot's synthetic ones)."""
    root = real_data_root()
    if root is None:
        from test_omniglot import MEMBERS

        return MEMBERS
    members = {}
    for part in ("background", "evaluation"):
        with zipfile.ZipFile(root / "omniglot" / f"images_{part}.zip") as archive:
            names = archive.namelist()
            alphabet = sorted({name.split("/")[1] for name in names})[0]
            chosen = [f"images_{part}/{alphabet}/character0{k}/" for k in (1, 2)]
            members[part] = {
                name: archive.read(name) for name in names if name.startswith(tuple(chosen))
            }
    return members


def write_omniglot(root: Path, members: dict[str, dict[str, bytes]]) -> dict[str, Path]:
    """Both archives under root/omniglot/, stored uncompressed as the official ones are."""
    paths = {}
    for part, files in members.items():
        paths[part] = root / "omniglot" / f"images_{part}.zip"
        paths[part].parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(paths[part], "w", zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    return paths


def a_character(members: dict[str, dict[str, bytes]]) -> str:
    """images_background/<Alphabet>/character01: a character of the tiny copy."""
    return sorted(members["background"])[0].rsplit("/", 1)[0]


# Each damage edits the members, writes the copy under `root` and returns the error's words.
def not_a_zip(root: Path, members: dict) -> list[str]:
    path = write_omniglot(root, members)["background"]
    path.write_bytes(b"<html><body>404 Not Found</body></html>\n")
    return [str(path), "BadZipFile", "truncated or corrupt"]


def bad_member_checksum(root: Path, members: dict) -> list[str]:
    name = sorted(members["evaluation"])[7]
    path = write_omniglot(root, members)["evaluation"]
    raw = bytearray(path.read_bytes())
    png = members["evaluation"][name]
    raw[raw.index(png) + len(png) // 2] ^= 0xFF  # stored, so this is one byte of the PNG
    path.write_bytes(bytes(raw))
    return [str(path), name, "Bad CRC-32"]


def huge_image(root: Path, members: dict) -> list[str]:
    name = sorted(members["background"])[3]
    members["background"][name] = png_header(HUGE, HUGE)
    path = write_omniglot(root, members)["background"]
    return [str(path), name, "DecompressionBombError"]


def empty_character_folder_in_the_zip(root: Path, members: dict) -> list[str]:
    folder = a_character(members).replace("character01", "character07") + "/"
    members["background"][folder] = b""  # a folder entry, no images under it
    path = write_omniglot(root, members)["background"]
    return [str(path), folder, "hold no images", "drawers 01..20"]


def empty_character_folder_extracted(root: Path, members: dict) -> list[str]:
    top = root / "omniglot-py"  # torchvision's extracted layout
    for files in members.values():
        for name, data in files.items():
            (top / name).parent.mkdir(parents=True, exist_ok=True)
            (top / name).write_bytes(data)
    folder = a_character(members).replace("character01", "character07")
    (top / folder).mkdir()
    return [str(top / "images_background"), f"{folder}/", "hold no images"]


OMNIGLOT_FAULTS = [
    not_a_zip,
    bad_member_checksum,
    huge_image,
    empty_character_folder_in_the_zip,
    empty_character_folder_extracted,
]


@pytest.mark.parametrize("damage", OMNIGLOT_FAULTS, ids=fault_id)
def test_a_damaged_omniglot_copy_is_named(damage, omniglot_members, tmp_path, tally):
    words = damage(tmp_path, copy.deepcopy(omniglot_members))
    refused(lambda: load_characters(tmp_path, download=False), words)
    tally["corrupt_input"] += 1


@pytest.mark.parametrize(
    "member",
    [
        "../evil.png",
        "/tmp/evil.png",
        "images_background/../../evil.png",
        "images_background\\..\\x",
    ],
    ids=["dot-dot", "absolute", "dot-dot-inside", "backslashes"],
)
def test_an_omniglot_member_outside_the_data_set_is_refused(
    member, omniglot_members, tmp_path, tally
):
    members = copy.deepcopy(omniglot_members)
    members["background"][member] = b"x"
    path = write_omniglot(tmp_path, members)["background"]
    refused(lambda: load_characters(tmp_path, download=False), [str(path), repr(member), "outside"])
    tally["corrupt_input"] += 1


@pytest.fixture
def packaged_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder standing in for metalearn/splits/: <dataset>/<split>/<part>.txt read from it."""
    folder = tmp_path / "splits"
    monkeypatch.setattr(
        classes, "class_list_path", lambda data, split, part: folder / data / split / f"{part}.txt"
    )
    return folder


def write_lists(folder: Path, lists: dict[str, list[str]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for part, names in lists.items():
        (folder / f"{part}.txt").write_text("".join(f"{name}\n" for name in names))
    return {part: folder / f"{part}.txt" for part in lists}


@pytest.mark.parametrize(("first", "second"), [("train", "test"), ("train", "val"), ("val", "val")])
def test_an_omniglot_class_listed_twice_in_the_split_lists_is_refused(
    first, second, omniglot_members, packaged_lists, tmp_path, tally
):
    write_omniglot(tmp_path / "data", omniglot_members)
    members = [name for files in omniglot_members.values() for name in files]
    characters = sorted({name.split("/", 1)[1].rsplit("/", 1)[0] for name in members})
    lists = {
        "train": [f"{characters[0]}/rot000", f"{characters[1]}/rot090"],
        "val": [f"{characters[2]}/rot000"],
        "test": [f"{characters[3]}/rot180"],
    }
    lists[second].append(lists[first][0])
    files = write_lists(packaged_lists / "omniglot" / "vinyals", lists)
    words = [str(files[first]), str(files[second]), repr(lists[first][0]), "disjoint"]
    refused(lambda: load_omniglot(tmp_path / "data", "vinyals", download=False), words)
    tally["corrupt_input"] += 1


# --- CIFAR-100 (CIFAR-FS, FC100): cifar-100-python.tar.gz and MetaOptNet's pickles -------------


@pytest.fixture(scope="module")
def cifar_blobs() -> dict:
    """The archive's three pickled dicts, all 100 classes with 2 images each."""
    return cifar100.members(per_class=(1, 1))[0]


def load_cifarfs(root: Path) -> Callable[[], object]:
    return lambda: load_cifar(CIFARFSConfig(root=str(root), download=False))


def cifar_archive(root: Path, blobs: dict, raw: dict | None = None) -> Path:
    return cifar100.write_archive(root / "cifar100" / "cifar-100-python.tar.gz", blobs, raw)


@pytest.mark.parametrize("damage", GZIP_FAULTS, ids=fault_id)
def test_a_damaged_cifar_archive_is_named(damage, cifar_blobs, tmp_path, tally):
    refused(load_cifarfs(tmp_path), damage(cifar_archive(tmp_path, cifar_blobs)))
    tally["corrupt_input"] += 1


def truncated_member(blobs: dict) -> tuple[dict, list[str]]:
    raw = {"train": cifar100.python2_pickle(blobs["train"])[:300]}
    return raw, ["cifar-100-python/train", "is not a readable pickle"]


def rows_of_another_size(blobs: dict) -> tuple[dict, list[str]]:
    blobs["test"][b"data"] = blobs["test"][b"data"][:, : 3 * 28 * 28]  # 28x28 rows
    return {}, ["cifar-100-python/test", "data has shape (100, 2352)", "(N, 3072)"]


def meta_without_fine_names(blobs: dict) -> tuple[dict, list[str]]:
    blobs["meta"][b"label_names"] = blobs["meta"].pop(b"fine_label_names")  # CIFAR-10's key
    return {}, ["cifar-100-python/meta", "lacks the key(s) fine_label_names", "label_names"]


def class_without_images(blobs: dict) -> tuple[dict, list[str]]:
    apple = cifar100.FINE.index("apple")
    for part in ("train", "test"):
        keep = [i for i, label in enumerate(blobs[part][b"fine_labels"]) if label != apple]
        for key in (b"fine_labels", b"coarse_labels", b"filenames"):
            blobs[part][key] = [blobs[part][key][i] for i in keep]
        blobs[part][b"data"] = blobs[part][b"data"][keep]
    return {}, ["holds no images of class apple"]


@pytest.mark.parametrize(
    "damage",
    [truncated_member, rows_of_another_size, meta_without_fine_names, class_without_images],
    ids=fault_id,
)
def test_a_wrong_cifar_member_is_named(damage, cifar_blobs, tmp_path, tally):
    blobs = copy.deepcopy(cifar_blobs)
    raw, words = damage(blobs)
    path = cifar_archive(tmp_path, blobs, raw)
    refused(load_cifarfs(tmp_path), [str(path), *words])
    tally["corrupt_input"] += 1


OUTSIDE_TAR = [
    pytest.param(tar_entry("../evil"), "'../evil'", id="dot-dot"),
    pytest.param(tar_entry("/tmp/evil"), "'/tmp/evil'", id="absolute"),
    pytest.param(tar_entry("cifar-100-python/../../evil"), "../../evil", id="dot-dot-inside"),
    pytest.param(tar_entry("cifar-100-python/x", "/etc/passwd"), "'/etc/passwd'", id="symlink"),
    pytest.param(tar_entry("cifar-100-python/x", "../../x"), "'../../x'", id="symlink-dot-dot"),
    pytest.param(
        tar_entry("cifar-100-python/x", "../x", tarfile.LNKTYPE), "'../x'", id="hardlink-dot-dot"
    ),
]


@pytest.mark.parametrize(("member", "shown"), OUTSIDE_TAR)
def test_a_cifar_member_outside_the_data_set_is_refused(
    member, shown, cifar_blobs, tmp_path, tally
):
    path = cifar_archive(tmp_path, cifar_blobs)
    prepend_members(path, [member])
    refused(load_cifarfs(tmp_path), [str(path), repr(member.name), shown, "outside"])
    tally["corrupt_input"] += 1


def cifarfs_pickles(root: Path, blobs: dict) -> Path:
    """MetaOptNet's CIFAR_FS_{train,val,test}.pickle of the packaged CIFAR-FS classes."""
    data = np.concatenate([blobs[part][b"data"] for part in ("train", "test")])
    labels = blobs["train"][b"fine_labels"] + blobs["test"][b"fine_labels"]
    pixels = {
        name: data[np.asarray(labels) == i].reshape(-1, 3, 32, 32)
        for i, name in enumerate(cifar100.FINE)
    }
    cifar100.make_pickles(root / "cifarfs", "CIFAR_FS", split_lists("cifarfs"), pixels)
    return root / "cifarfs"


def rewrite(path: Path, edit: Callable[[dict], dict]) -> None:
    path.write_bytes(pickle.dumps(edit(pickle.loads(path.read_bytes())), protocol=2))


PICKLE_FAULTS = {
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[:1000]), "not a readable pickle"),
    "wrong-keys": (
        lambda path: rewrite(path, lambda b: {"data": b["data"], "fine_labels": b["labels"]}),
        "lacks the key(s) labels",
    ),
    "28x28-images": (
        lambda path: rewrite(path, lambda b: b | {"data": b["data"][:, :28, :28]}),
        "not (N, 32, 32, 3)",
    ),
}


@pytest.mark.parametrize("fault", sorted(PICKLE_FAULTS))
def test_a_wrong_metaoptnet_pickle_is_named(fault, cifar_blobs, tmp_path, tally):
    path = cifarfs_pickles(tmp_path, cifar_blobs) / "CIFAR_FS_val.pickle"
    damage, problem = PICKLE_FAULTS[fault]
    damage(path)
    refused(load_cifarfs(tmp_path), [str(path), problem])
    tally["corrupt_input"] += 1


def test_metaoptnet_pickles_sharing_a_class_are_refused(cifar_blobs, tmp_path, tally):
    folder = cifarfs_pickles(tmp_path, cifar_blobs)
    val = pickle.loads((folder / "CIFAR_FS_val.pickle").read_bytes())
    test = pickle.loads((folder / "CIFAR_FS_test.pickle").read_bytes())
    moved, shared = val["labels"][0], test["labels"][0]  # a val class relabelled as a test one
    val["labels"] = [shared if label == moved else label for label in val["labels"]]
    (folder / "CIFAR_FS_val.pickle").write_bytes(pickle.dumps(val, protocol=2))
    words = [str(folder / "CIFAR_FS_val.pickle"), str(folder / "CIFAR_FS_test.pickle")]
    refused(load_cifarfs(tmp_path), [*words, repr(str(shared)), "disjoint"])
    tally["corrupt_input"] += 1


@pytest.mark.parametrize(("first", "second"), [("train", "test"), ("test", "test")])
def test_a_cifarfs_class_listed_twice_in_the_split_lists_is_refused(
    first, second, cifar_blobs, packaged_lists, tmp_path, tally
):
    names = cifar100.FINE  # 64/16/20 of the archive's classes, as the Bertinetto lists are
    lists = {"train": names[:64], "val": names[64:80], "test": names[80:]}
    lists[second].append(lists[first][0])
    files = write_lists(packaged_lists / "cifarfs" / "bertinetto", lists)
    cifar_archive(tmp_path, cifar_blobs)
    words = [str(files[first]), str(files[second]), repr(lists[first][0]), "disjoint"]
    refused(load_cifarfs(tmp_path), words)
    tally["corrupt_input"] += 1


# --- CUB-200-2011: CUB_200_2011.tgz and the folder extracted from it ----------------------------


@pytest.fixture(scope="module")
def cub_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a tiny CUB_200_2011.tgz in the official layout (200 classes of 2 to 4)."""
    return cub.make_archive(tmp_path_factory.mktemp("cub")).read_bytes()


def load_cub_from(root: Path) -> Callable[[], object]:
    return lambda: load_cub(CUBConfig(root=str(root), download=False, image_size=cub.SIZE))


def write_cub(root: Path, data: bytes) -> Path:
    path = root / "cub" / "CUB_200_2011.tgz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("damage", GZIP_FAULTS, ids=fault_id)
def test_a_damaged_cub_archive_is_named(damage, cub_archive, tmp_path, tally):
    refused(load_cub_from(tmp_path), damage(write_cub(tmp_path, cub_archive)))
    tally["corrupt_input"] += 1


def test_a_cub_image_of_a_size_no_loader_decodes_is_named(tmp_path, tally):
    images = cub.make_images()
    image_id, filename, _ = images["010.Bird_10"][1]
    images["010.Bird_10"][1] = (image_id, filename, jpeg_header(60_000, 60_000))
    path = cub.make_archive(tmp_path, images)
    words = [str(path), f"CUB_200_2011/images/010.Bird_10/{filename}", "exceeds limit"]
    refused(load_cub_from(tmp_path), ["cannot decode the image", *words])
    tally["corrupt_input"] += 1


@pytest.mark.parametrize(
    ("member", "shown"),
    [
        pytest.param(
            tar_entry("CUB_200_2011/images/001.Bird_1/x.jpg", "/etc/passwd"),
            "'/etc/passwd'",
            id="symlink",
        ),
        pytest.param(
            tar_entry("CUB_200_2011/images/x.jpg", "../../../x.jpg"),
            "'../../../x.jpg'",
            id="symlink-dot-dot",
        ),
        pytest.param(
            tar_entry("CUB_200_2011/x", "../etc/x", tarfile.LNKTYPE), "'../etc/x'", id="hardlink"
        ),
    ],
)
def test_a_cub_link_outside_the_data_set_is_refused(member, shown, cub_archive, tmp_path, tally):
    path = write_cub(tmp_path, cub_archive)
    prepend_members(path, [member])
    refused(load_cub_from(tmp_path), [str(path), repr(member.name), shown, "outside"])
    tally["corrupt_input"] += 1


def test_an_empty_cub_class_folder_is_named(cub_archive, tmp_path, tally):
    with tarfile.open(write_cub(tmp_path / "archive", cub_archive)) as tar:
        tar.extractall(tmp_path / "cub", filter="data")
    folder = tmp_path / "cub" / "CUB_200_2011"
    emptied = sorted((folder / "images" / "007.Bird_7").iterdir())
    for image in emptied:
        image.unlink()  # the folder stays, images.txt still lists its images
    words = [str(folder), f"{len(emptied)} images listed in images.txt are missing", "007.Bird_7"]
    refused(load_cub_from(tmp_path), words)
    tally["corrupt_input"] += 1


# --- miniImageNet: mini-imagenet-cache-*.pkl, an images/ folder, raw ImageNet ---------------------

MINI = {"train": "train", "val": "validation", "test": "test"}


def load_mini(root: Path) -> Callable[[], object]:
    return lambda: load_miniimagenet(MiniImageNetConfig(root=str(root), download=False))


def edit_pickle(path: Path, edit: Callable[[dict], dict]) -> None:
    with open(path, "rb") as f:
        blob = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump(edit(blob), f, protocol=4)


def shaped(shape: tuple[int, ...]) -> Callable[[dict], dict]:
    return lambda blob: blob | {"image_data": np.zeros(shape, np.uint8)}


def class_dict_entry(wnid: str, indices: list[int]) -> Callable[[dict], dict]:
    return lambda blob: blob | {"class_dict": blob["class_dict"] | {wnid: indices}}


# split whose pickle is damaged -> (edit of its dict, words of the error)
MINI_PICKLE_FAULTS = {
    "cifar-keys": (
        "val",
        lambda blob: {"data": blob["image_data"], "labels": list(blob["class_dict"])},
        ["lacks the keys image_data and class_dict", "found ['data', 'labels']"],
    ),
    "rgba-images": ("train", shaped((18, 84, 84, 4)), ["(N, H, W, 3)", "(18, 84, 84, 4)"]),
    "channels-first": ("train", shaped((18, 3, 84, 84)), ["(N, H, W, 3)", "(18, 3, 84, 84)"]),
    "greyscale-images": ("test", shaped((12, 84, 84)), ["(N, H, W, 3)", "(12, 84, 84)"]),
    "index-past-the-end": (
        "train",
        class_dict_entry("n01558993", [0, 1, 2, 3, 4, 18]),
        ["class n01558993", "outside the 18 of image_data"],
    ),
    "class-without-images": (
        "test",
        class_dict_entry("n01930112", []),
        ["class n01930112 has no images"],
    ),
}


@pytest.mark.parametrize("fault", list(MINI_PICKLE_FAULTS))
def test_a_wrong_miniimagenet_pickle_is_named(fault, tmp_path, tally):
    folder = miniimagenet.make_pickles(tmp_path, miniimagenet.pixels())
    split, edit, words = MINI_PICKLE_FAULTS[fault]
    path = folder / f"mini-imagenet-cache-{MINI[split]}.pkl"
    edit_pickle(path, edit)
    refused(load_mini(tmp_path), [str(path), *words])
    tally["corrupt_input"] += 1


def test_a_truncated_miniimagenet_pickle_is_named(tmp_path, tally):
    path = (
        miniimagenet.make_pickles(tmp_path, miniimagenet.pixels()) / "mini-imagenet-cache-test.pkl"
    )
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(load_mini(tmp_path), [str(path), "not a readable miniImageNet pickle", "truncated"])
    tally["corrupt_input"] += 1


def test_miniimagenet_pickles_sharing_a_class_are_refused(tmp_path, tally):
    folder = miniimagenet.make_pickles(tmp_path, miniimagenet.pixels())
    shared = miniimagenet.CLASSES["test"][0]
    train = folder / "mini-imagenet-cache-train.pkl"
    edit_pickle(train, class_dict_entry(shared, [0, 1, 2, 3, 4, 5]))
    test = folder / "mini-imagenet-cache-test.pkl"
    refused(load_mini(tmp_path), [str(train), str(test), repr(shared), "disjoint"])
    tally["corrupt_input"] += 1


@pytest.mark.parametrize(("first", "second"), [("train", "test"), ("val", "test")])
def test_a_miniimagenet_class_in_two_ravi_lists_is_refused(first, second, tmp_path, tally):
    folder = miniimagenet.make_folder(tmp_path, miniimagenet.pixels(), per_class_dirs=True)
    ravi = folder / "splits" / "ravi"
    moved = ravi / f"{first}.csv"
    wnid = miniimagenet.CLASSES[first][0]
    rows = [line for line in moved.read_text().splitlines() if line.endswith(f",{wnid}")]
    with open(ravi / f"{second}.csv", "a") as f:
        f.write("".join(f"{row}\n" for row in rows))
    words = [str(moved), str(ravi / f"{second}.csv"), repr(wnid), "disjoint"]
    refused(load_mini(tmp_path), words)
    tally["corrupt_input"] += 1


def test_an_empty_miniimagenet_class_folder_is_named(tmp_path, tally):
    folder = miniimagenet.make_folder(tmp_path, miniimagenet.pixels(), per_class_dirs=True)
    wnid = miniimagenet.CLASSES["val"][1]
    for image in (folder / "images" / wnid).iterdir():
        image.unlink()
    words = [str(folder / "images"), f"{miniimagenet.PER_CLASS} images of class {wnid}"]
    refused(load_mini(tmp_path), [*words, "the folder is incomplete"])
    tally["corrupt_input"] += 1


def test_an_empty_imagenet_class_folder_is_named(tmp_path, tally):
    train = miniimagenet.make_imagenet(tmp_path, miniimagenet.pixels())
    wnid = miniimagenet.CLASSES["test"][1]
    for image in (train / wnid).iterdir():
        image.unlink()
    refused(load_mini(tmp_path), [str(train / wnid), "holds 0 images", f"class {wnid}"])
    tally["corrupt_input"] += 1


def test_a_miniimagenet_image_of_a_size_no_loader_decodes_is_named(tmp_path, tally):
    folder = miniimagenet.make_folder(tmp_path, miniimagenet.pixels(), per_class_dirs=True)
    image = sorted((folder / "images" / miniimagenet.CLASSES["train"][2]).iterdir())[3]
    image.write_bytes(png_header(HUGE, HUGE))
    refused(load_mini(tmp_path), [str(image), "cannot decode the image", "exceeds limit"])
    tally["corrupt_input"] += 1


# --- tieredImageNet: Ren et al.'s PNG pickles and the npz release --------------------------------


@pytest.fixture(scope="module")
def tiered_pixels() -> dict[str, list[np.ndarray]]:
    return tieredimagenet.pixels(tieredimagenet.class_sizes(train=3, other=2, smallest=2))


def load_tiered(root: Path) -> Callable[[], object]:
    return lambda: load_tieredimagenet(TieredImageNetConfig(root=str(root), download=False))


def read_py2(path: Path) -> object:
    return pickle.loads(path.read_bytes(), encoding="latin1")


def huge_png(folder: Path) -> tuple[Path, list[str]]:
    path = folder / "val_images_png.pkl"
    images = read_py2(path)
    images[1] = np.frombuffer(png_header(HUGE, HUGE), np.uint8).reshape(-1, 1)
    tieredimagenet.dump(images, path)
    return path, ["image 1 is not a decodable PNG", "exceeds limit"]


def truncated_png_pickle(folder: Path) -> tuple[Path, list[str]]:
    path = folder / "test_images_png.pkl"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return path, ["truncated"]


def labels_as_a_list(folder: Path) -> tuple[Path, list[str]]:
    path = folder / "train_labels.pkl"
    tieredimagenet.dump(list(read_py2(path)["label_specific"]), path)
    return path, ["lacks label_specific", "found list"]


def float_labels(folder: Path) -> tuple[Path, list[str]]:
    path = folder / "val_labels.pkl"
    blob = read_py2(path)
    tieredimagenet.dump(blob | {"label_specific": blob["label_specific"] / 2}, path)
    return path, ["label_specific must be a non-empty 1-D list of integer class ids", "float64"]


def pngs_in_a_dict(folder: Path) -> tuple[Path, list[str]]:
    path = folder / "train_images_png.pkl"
    tieredimagenet.dump(dict(enumerate(read_py2(path))), path)
    return path, ["must be a list of one PNG per labelled image", "found no list"]


TIERED_PNG_FAULTS = [huge_png, truncated_png_pickle, labels_as_a_list, float_labels, pngs_in_a_dict]


@pytest.mark.parametrize("damage", TIERED_PNG_FAULTS, ids=fault_id)
def test_a_wrong_tieredimagenet_pickle_is_named(damage, tiered_pixels, tmp_path, tally):
    path, words = damage(tieredimagenet.make_png_pickles(tmp_path, tiered_pixels))
    refused(load_tiered(tmp_path), [str(path), *words])
    tally["corrupt_input"] += 1


@pytest.mark.parametrize(
    ("images", "words"),
    [
        (np.zeros((8, 84, 84, 4), np.uint8), ["(N, H, W, 3)", "uint8 (8, 84, 84, 4)"]),
        (np.zeros((8, 84, 84), np.uint8), ["(N, H, W, 3)", "uint8 (8, 84, 84)"]),
        (np.zeros((8, 84, 84, 3), np.float32), ["(N, H, W, 3)", "float32"]),
        (None, ["truncated or corrupt", "File is not a zip file"]),
    ],
    ids=["rgba", "greyscale", "float", "html-page"],
)
def test_a_wrong_tieredimagenet_npz_is_named(images, words, tiered_pixels, tmp_path, tally):
    path = tieredimagenet.make_npz(tmp_path, tiered_pixels) / "test_images.npz"
    if images is None:
        path.write_bytes(b"<html><body>403 Forbidden</body></html>\n")
    else:
        np.savez(path, images=images)
    refused(load_tiered(tmp_path), [str(path), *words])
    tally["corrupt_input"] += 1
