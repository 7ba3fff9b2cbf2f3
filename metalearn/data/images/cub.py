"""CUB-200-2011 (Wah et al. 2011) with the few-shot split of Chen et al. (2019).

Two sources, tried in this order under `<root>/cub/`: the official archive `CUB_200_2011.tgz`,
read member by member and never extracted (downloaded, md5-checked, when no source is found and
`data.download`), or the folder extracted from it, `CUB_200_2011/`.

Classes and images come from the data set's own lists: classes.txt (`<class id> <NNN.Name>`),
images.txt (`<image id> <NNN.Name>/<file>.jpg`, under images/) and image_class_labels.txt
(`<image id> <class id>`); a class's images are kept in image-id order. The split is the rule of
Chen et al.'s filelists/CUB/write_CUB_filelist.py: class folders in sorted order, index i goes to
train (their "base") when i % 2 == 0, val when i % 4 == 1, test ("novel") when i % 4 == 3, so
100/50/50 classes. Images are converted to RGB (a few are grayscale) and resized once to
image_size x image_size into a uint8 cache under `cache_dir()`, memory-mapped afterwards. Classes
keep their own sizes (41 to 60 images): a split is its classes' images one after another plus
the count of each (the counts form of EpisodeSampler).
"""

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from metalearn.data.files.archives import inside, open_tgz, tar_member
from metalearn.data.files.download import download
from metalearn.data.files.preprocess import image_array
from metalearn.data.files.root import cache_path, cached, fingerprint, resolve_root
from metalearn.data.images.base import ImageTaskConfig
from metalearn.data.tasks import ClassTasks
from metalearn.errors import DataError

FOLDER = "CUB_200_2011"  # the archive's top folder, and the extracted one
ARCHIVE = f"{FOLDER}.tgz"
# Caltech's data repository (CaltechDATA record 65de6-vp158), then learn2learn's Zenodo copy
URLS = (
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
    "https://zenodo.org/record/8000562/files/CUB_200_2011.tgz",
)
MD5 = "97eceeb196236b17998738112f37df78"
LISTS = ("classes.txt", "images.txt", "image_class_labels.txt")
SPLITS = ("train", "val", "test")
PREPROCESS = {"mode": "RGB", "invert": False}
CACHE_FORMAT = 1
# what a truncated or corrupt gzip/tar stream (or a list that is not text) raises
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeDecodeError)
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_REFETCH = f"the file is not the official {ARCHIVE}: delete it and download it again"


@dataclass
class CUBConfig(ImageTaskConfig):
    """CUB-200-2011 with the Chen et al. (2019) split: 100/50/50 classes of 41 to 60 images."""

    name: str = "cub"


@dataclass
class CUBSplit:
    """One split's classes, decoded: the images of classes[0], then of classes[1], ..."""

    images: torch.Tensor  # uint8 (sum E_c, 3, S, S)
    counts: torch.Tensor  # (C,) images per class
    classes: list[str]  # class folder names, "NNN.Name", sorted


def chen_split(classes: list[str]) -> dict[str, list[str]]:
    """Chen et al. 2019: sorted class folders, i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test."""
    names = sorted(classes)
    return {"train": names[0::2], "val": names[1::4], "test": names[3::4]}


def _rows(text: str, name: str, where: str) -> dict[int, str]:
    """`<integer id> <value>` lines -> {id: value}."""
    rows: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) in rows:
            raise DataError(
                f"{where}: line {number} of {name} is {line!r}, not '<id> <value>' with a new id; "
                f"the list is corrupt"
            )
        rows[int(parts[0])] = parts[1].strip()
    return rows


def class_images(lists: dict[str, str], where: str) -> dict[str, list[str]]:
    """Class folder -> its images' paths under images/ (`NNN.Name/<file>.jpg`), by image id."""
    classes = _rows(lists["classes.txt"], "classes.txt", where)
    paths = _rows(lists["images.txt"], "images.txt", where)
    labels = _rows(lists["image_class_labels.txt"], "image_class_labels.txt", where)
    per_class: dict[str, list[str]] = {classes[i]: [] for i in sorted(classes)}
    for image in sorted(paths):
        path = inside(paths[image], f"{where}: images.txt", _REFETCH)
        label = labels.get(image, "")
        folder = classes.get(int(label)) if label.isdigit() else None
        if folder is None or path.parent.as_posix() != folder:
            raise DataError(
                f"{where}: image {image} ({paths[image]}) has class {label or 'none'} in "
                f"image_class_labels.txt, which classes.txt does not name as its folder; "
                f"the lists are corrupt"
            )
        per_class[folder].append(path.as_posix())
    empty = [name for name, images in per_class.items() if not images]
    if empty:
        raise DataError(
            f"{where}: class {empty[0]} ({len(empty)} classes in all) has no images in "
            f"images.txt; the data set is incomplete"
        )
    return per_class


class _Slots:
    """Where each listed image goes: split tensors allocated up front and filled by path."""

    def __init__(self, per_class: dict[str, list[str]], size: int) -> None:
        self.classes = chen_split(list(per_class))
        self.counts = {s: [len(per_class[c]) for c in names] for s, names in self.classes.items()}
        self.images = {
            s: torch.empty((sum(n), 3, size, size), dtype=torch.uint8)
            for s, n in self.counts.items()
        }
        self.where: dict[str, tuple[str, int]] = {}  # path under images/ -> (split, row)
        for split, names in self.classes.items():
            paths = [p for c in names for p in per_class[c]]
            self.where |= {path: (split, row) for row, path in enumerate(paths)}
        self.missing = set(self.where)
        self.size = size

    def fill(self, path: str, data: bytes, name: str, hint: str) -> None:
        try:
            with Image.open(io.BytesIO(data)) as image:
                array = image_array(image, **PREPROCESS, size=self.size)  # (S, S, 3)
        except _IMAGE_ERRORS as error:
            raise DataError(f"cannot decode the image {name} ({error}); {hint}") from error
        split, row = self.where[path]
        self.images[split][row].numpy()[:] = array.transpose(2, 0, 1)  # a view: fills the tensor
        self.missing.discard(path)

    def splits(self, where: str) -> dict[str, CUBSplit]:
        if self.missing:
            example = sorted(self.missing)[0]
            raise DataError(
                f"{where}: {len(self.missing)} images listed in images.txt are missing (e.g. "
                f"images/{example}); the data set is incomplete"
            )
        return {
            s: CUBSplit(self.images[s], torch.tensor(self.counts[s]), self.classes[s])
            for s in SPLITS
        }


def _corrupt(path: Path, error: Exception) -> DataError:
    return DataError(
        f"the archive {path} is truncated or corrupt ({type(error).__name__}: {error}); delete "
        f"it and download it again (md5 {MD5})"
    )


def _members(tar: tarfile.TarFile, path: Path):
    """(member, name under CUB_200_2011/) of every regular file of the data set; refuses names
    and links that point outside it. Other members (the top-level attributes.txt, folders, links
    inside) are skipped."""
    for member in tar:
        name = tar_member(member, str(path), _REFETCH).as_posix()  # also folds a leading "./"
        if member.isfile() and name.startswith(f"{FOLDER}/"):
            yield member, name.removeprefix(f"{FOLDER}/")


def decode_archive(path: Path, size: int) -> dict[str, CUBSplit]:
    """Two streaming passes over the .tgz: the lists, then the listed images, decoded."""
    lists = {}
    try:
        with open_tgz(path) as tar:
            for member, name in _members(tar, path):
                if name in LISTS:
                    lists[name] = tar.extractfile(member).read().decode("utf-8")
        missing = [name for name in LISTS if name not in lists]
        if missing:
            raise DataError(
                f"the archive {path} lacks {FOLDER}/{missing[0]}; it is not the official "
                f"{ARCHIVE}: delete it and download it again"
            )
        slots = _Slots(class_images(lists, str(path)), size)
        hint = f"the archive is corrupt: delete {path} and download it again"
        with (
            open_tgz(path) as tar,
            tqdm(total=len(slots.where), desc=f"decode {ARCHIVE}", unit="img", leave=False) as bar,
        ):
            for member, name in _members(tar, path):
                image = name.removeprefix("images/")
                if name.startswith("images/") and image in slots.missing:
                    data = tar.extractfile(member).read()
                    slots.fill(image, data, f"{FOLDER}/{name} in {path}", hint)
                    bar.update()
    except _ARCHIVE_ERRORS as error:
        raise _corrupt(path, error) from error
    return slots.splits(str(path))


def decode_folder(folder: Path, size: int) -> dict[str, CUBSplit]:
    """The extracted CUB_200_2011/ folder: its lists, then each listed image."""
    lists = {}
    for name in LISTS:
        if not (folder / name).is_file():
            raise DataError(
                f"{folder} lacks {name}; extract the whole {ARCHIVE} there, or put the archive "
                f"itself in {folder.parent}"
            )
        try:
            lists[name] = (folder / name).read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{folder / name} is not a text list ({error}); re-extract it"
            ) from error
    slots = _Slots(class_images(lists, str(folder)), size)
    images = (folder / "images").resolve()
    for path in tqdm(sorted(slots.where), desc=f"decode {folder}", unit="img", leave=False):
        file = folder / "images" / path
        if not file.resolve().is_relative_to(images):  # a link that leads out of the folder
            raise DataError(f"refusing {file}: it resolves outside {images}")
        if file.is_file():
            slots.fill(path, file.read_bytes(), str(file), "replace the file (re-extract it)")
    return slots.splits(str(folder))


def find_source(folder: Path) -> tuple[str, Path] | None:
    """('archive', <folder>/CUB_200_2011.tgz) or ('folder', <folder>/CUB_200_2011), if present."""
    if (folder / ARCHIVE).is_file():
        return "archive", folder / ARCHIVE
    if (folder / FOLDER).is_dir():
        return "folder", folder / FOLDER
    return None


def _missing(folder: Path, reason: str) -> str:
    return (
        f"CUB-200-2011 was not found: expected the archive {folder / ARCHIVE} (from {URLS[0]}, "
        f"md5 {MD5}) or the folder extracted from it, {folder / FOLDER}/ (images.txt, "
        f"classes.txt, image_class_labels.txt, images/). {reason} Set data.root=/path/to/data "
        f"or METALEARN_DATA to the folder holding cub/."
    )


def fetch_archive(folder: Path) -> Path:
    """Download the archive into `folder`, from the official host, else the mirror."""
    failures = []
    for url in URLS:
        try:
            return download(url, folder / ARCHIVE, md5=MD5)
        except DataError as error:
            failures.append(str(error))
    raise DataError(_missing(folder, "The download failed: " + " Then: ".join(failures)))


def load_cub(cfg: CUBConfig) -> dict[str, CUBSplit]:
    """split -> its classes' images, memory-mapped from the cache (decoded on first use)."""
    folder = resolve_root(cfg.root) / "cub"
    source = find_source(folder)
    if source is None and cfg.download:
        source = "archive", fetch_archive(folder)
    if source is None:
        raise DataError(_missing(folder, "Not downloaded: data.download is false."))
    kind, path = source
    stats = fingerprint(path)  # a replaced or edited source is decoded again
    cache = cache_path(f"cub-{cfg.image_size}", CACHE_FORMAT, kind, path, stats)

    def build() -> dict:
        decode = decode_archive if kind == "archive" else decode_folder
        blob = {}
        for split, part in decode(path, cfg.image_size).items():
            blob |= {split: part.images, f"{split}_counts": part.counts}
            blob[f"{split}_classes"] = part.classes
        return blob

    blob = cached(cache, build)
    return {s: CUBSplit(blob[s], blob[f"{s}_counts"], blob[f"{s}_classes"]) for s in SPLITS}


def cub_tasks(cfg: CUBConfig, device: torch.device) -> ClassTasks:
    splits = load_cub(cfg)
    images = {split: part.images for split, part in splits.items()}
    return ClassTasks(images, device, {split: part.counts for split, part in splits.items()})
