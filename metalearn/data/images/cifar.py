"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of CIFAR-100.

Both keep all 600 images (500 training + 100 test images of the archive) of each of their classes:
CIFAR-FS 64/16/20 classes (the R2D2 release's lists), FC100 60/20/20 classes from 12/4/4
superclasses (TADAM's supplementary). Two sources, tried in this order:

1. the pickles MetaOptNet distributes, `<root>/cifarfs/CIFAR_FS_{train,val,test}.pickle` or
   `<root>/fc100/FC100_{train,val,test}.pickle` (RFS renames them `{train,val,test}.pickle`):
   keys `data`, uint8 (N, 32, 32, 3), and `labels`, N integer class labels;
2. the CIFAR-100 python archive `<root>/cifar100/cifar-100-python.tar.gz` (or torchvision's
   `<root>/cifar-100-python.tar.gz`), shared by both data sets and downloaded (md5-checked) when
   missing and `data.download`. Its members `train`, `test` and `meta` are unpickled straight
   from the tar: nothing is extracted.

Whatever the source, the images are decoded once into a uint8 cache under `cache_dir()` and
memory-mapped from it afterwards. The class lists are packaged under metalearn/splits/.
"""

import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from metalearn.data.files.archives import open_tgz, tar_member
from metalearn.data.files.classes import check_disjoint, read_split_lists
from metalearn.data.files.download import download
from metalearn.data.files.pickles import SafeUnpickler
from metalearn.data.files.preprocess import image_array
from metalearn.data.files.root import cache_path, cached, fingerprint, resolve_root, splits_blob
from metalearn.data.images.base import ImageTaskConfig
from metalearn.data.tasks import ClassTasks
from metalearn.errors import DataError

SPLITS = ("train", "val", "test")
ARCHIVE = "cifar-100-python.tar.gz"
# where the archive is looked for under the data root: ours (downloads go there), torchvision's
ARCHIVE_PLACES = (f"cifar100/{ARCHIVE}", ARCHIVE)
URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"  # torchvision's CIFAR100.tgz_md5
_IMAGE_KEYS = ("data", "fine_labels", "coarse_labels")
# the archive's members under cifar-100-python/ -> the keys each must hold
MEMBERS = {
    "train": _IMAGE_KEYS,
    "test": _IMAGE_KEYS,
    "meta": ("fine_label_names", "coarse_label_names"),
}
SIZE = 32
PREPROCESS = {"mode": "RGB", "invert": False}
CACHE_FORMAT = 1


class Layout(NamedTuple):
    folder: str  # under the data root: MetaOptNet's pickles
    split: str  # the packaged lists, metalearn/splits/<name>/<split>/{train,val,test}.txt
    pickles: tuple[str, ...]  # the pickles' names ({} is the split), MetaOptNet's then RFS's
    classes: tuple[int, int, int]  # classes in the train, val and test splits


DATASETS = {
    "cifarfs": Layout("cifarfs", "bertinetto", ("CIFAR_FS_{}.pickle", "{}.pickle"), (64, 16, 20)),
    "fc100": Layout("fc100", "oreshkin", ("FC100_{}.pickle", "{}.pickle"), (60, 20, 20)),
}
# arrays, plain containers and the str->bytes helper of protocol-2 pickles; nothing else loads
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
_REFETCH = f"it is not {ARCHIVE}: delete it and download it again from {URL}"


@dataclass
class CIFARFSConfig(ImageTaskConfig):
    """CIFAR-FS with the Bertinetto et al. (2019) split: 64/16/20 classes of 600 32x32 images."""

    name: str = "cifarfs"
    image_size: int = SIZE  # images are resized once to image_size x image_size


@dataclass
class FC100Config(CIFARFSConfig):
    """FC100 with the Oreshkin et al. (2018) split: 60/20/20 classes of 12/4/4 superclasses."""

    name: str = "fc100"


def split_lists(name: str) -> dict[str, list[str]]:
    """split -> packaged class names; FC100's lines are `<superclass>/<class>`."""
    return read_split_lists(name, DATASETS[name].split, SPLITS)


def unpickle(data: bytes, where: str, keys: tuple[str, ...], encoding: str) -> dict:
    """A pickled dict with byte-string or str keys, as str keys; checks that `keys` are there."""
    try:
        blob = SafeUnpickler(io.BytesIO(data), encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"{where} is not a readable pickle ({error}); replace the file") from error
    if not isinstance(blob, dict):
        raise DataError(f"{where} holds a {type(blob).__name__}, not a dict of arrays")
    blob = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in blob.items()}
    missing = [key for key in keys if key not in blob]
    if missing:
        raise DataError(
            f"{where} lacks the key(s) {', '.join(missing)} (found {', '.join(map(str, blob))}); "
            f"it is not the file of that name the data set's authors distribute"
        )
    return blob


def _images(array, count: int, where: str) -> np.ndarray:
    """The archive's rows, uint8 (N, 3072) with the red, green and blue planes one after another,
    as (N, 3, 32, 32)."""
    if not (isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 2):
        raise DataError(f"{where}: data must be a uint8 array (N, 3072), got {type(array)}")
    if array.shape != (count, 3 * SIZE * SIZE):
        raise DataError(f"{where}: data has shape {array.shape} for {count} labels, not (N, 3072)")
    return array.reshape(count, 3, SIZE, SIZE)


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_archive(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """(images (N, 3, 32, 32), fine labels (N,), coarse labels (N,), fine names, coarse names):
    the archive's training images, then its test images."""
    blobs = {}
    try:
        with open_tgz(path) as tar:
            for member in tar:  # each member is read in memory: its name never becomes a path
                name = tar_member(member, str(path), _REFETCH).as_posix()  # folds a leading "./"
                folder, _, part = name.partition("/")
                if member.isfile() and folder == "cifar-100-python" and part in MEMBERS:
                    data = tar.extractfile(member).read()
                    blobs[part] = unpickle(data, f"{path}:{member.name}", MEMBERS[part], "bytes")
    except _ARCHIVE_ERRORS as error:
        raise DataError(
            f"the archive {path} is truncated or corrupt ({type(error).__name__}: {error}); "
            f"delete it and download it again (md5 {MD5})"
        ) from error
    missing = [part for part in MEMBERS if part not in blobs]
    if missing:
        raise DataError(
            f"the archive {path} lacks cifar-100-python/{missing[0]}; it is not {ARCHIVE}: "
            f"delete it and download it again from {URL}"
        )
    fine_names = _names(blobs["meta"]["fine_label_names"])
    coarse_names = _names(blobs["meta"]["coarse_label_names"])
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        blob, where = blobs[part], f"{path}:cifar-100-python/{part}"
        fine.append(np.asarray(blob["fine_labels"], dtype=np.int64))
        coarse.append(np.asarray(blob["coarse_labels"], dtype=np.int64))
        images.append(_images(blob["data"], len(fine[-1]), where))
        if len(coarse[-1]) != len(fine[-1]):
            raise DataError(f"{where}: {len(fine[-1])} fine but {len(coarse[-1])} coarse labels")
    fine, coarse = np.concatenate(fine), np.concatenate(coarse)
    for labels, names in ((fine, fine_names), (coarse, coarse_names)):
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"{path}: labels outside the {len(names)} classes named in its meta")
    return np.concatenate(images), fine, coarse, fine_names, coarse_names


def _stack(per_class: list[np.ndarray], size: int, where: str) -> torch.Tensor:
    """Equal-sized classes of (E, 3, 32, 32) images -> uint8 (C, E, 3, size, size)."""
    sizes = sorted({len(images) for images in per_class})
    if len(sizes) != 1:
        raise DataError(f"{where}: classes have different numbers of images {sizes}")
    array = np.stack(per_class)
    if size != SIZE:  # (C, E, 3, H, W) -> resized once, through the channel-last PIL layout
        flat = array.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1)
        resized = [image_array(Image.fromarray(x), **PREPROCESS, size=size) for x in flat]
        array = np.stack(resized).transpose(0, 3, 1, 2).reshape(*array.shape[:3], size, size)
    return torch.from_numpy(np.ascontiguousarray(array))


def decode_archive(path: Path, lists: dict[str, list[str]], size: int) -> dict:
    """split -> (images (C, 600, 3, S, S), class names) for the listed classes; an FC100 entry
    `<superclass>/<class>` must also name the class's superclass in the archive."""
    images, fine, coarse, fine_names, coarse_names = read_archive(path)
    index = {name: i for i, name in enumerate(fine_names)}
    out = {}
    for split, entries in lists.items():
        classes = [entry.rpartition("/")[2] for entry in entries]
        missing = [c for c in classes if c not in index]
        if missing:
            raise DataError(
                f"{len(missing)} class(es) of the {split} split are not in {path} "
                f"({', '.join(missing[:5])}); it is not the CIFAR-100 archive: delete it and "
                f"download it again from {URL}"
            )
        per_class = []
        for entry, name in zip(entries, classes, strict=True):
            rows = np.flatnonzero(fine == index[name])
            if not len(rows):
                raise DataError(
                    f"{path} holds no images of class {name} (of the {split} split); it is not "
                    f"the CIFAR-100 archive: delete it and download it again from {URL}"
                )
            superclass = entry.rpartition("/")[0]
            found = {coarse_names[c] for c in coarse[rows]}
            if superclass and found != {superclass}:
                raise DataError(
                    f"{path}: class {name} is in superclass(es) {found}, not {superclass}"
                )
            per_class.append(images[rows])
        out[split] = (_stack(per_class, size, str(path)), classes)
    return out


def decode_pickles(folder: Path, pattern: str, counts: tuple[int, ...], size: int) -> dict:
    """split -> (images (C, 600, 3, S, S), class ids as names) from MetaOptNet's pickles."""
    out = {}
    for split, expected in zip(SPLITS, counts, strict=True):
        path = folder / pattern.format(split)
        blob = unpickle(path.read_bytes(), str(path), ("data", "labels"), "latin1")
        data, labels = blob["data"], np.asarray(blob["labels"], dtype=np.int64)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4):
            raise DataError(f"{path}: data must be a uint8 array (N, 32, 32, 3)")
        if data.shape[1:] != (SIZE, SIZE, 3) or len(data) != len(labels):
            raise DataError(
                f"{path}: data {data.shape} for {len(labels)} labels, not (N, 32, 32, 3)"
            )
        ids = sorted(set(labels.tolist()))
        if len(ids) != expected:
            raise DataError(f"{path} holds {len(ids)} classes; the {split} split has {expected}")
        per_class = [data[labels == c].transpose(0, 3, 1, 2) for c in ids]
        out[split] = (_stack(per_class, size, str(path)), [str(c) for c in ids])
    files = {split: str(folder / pattern.format(split)) for split in SPLITS}
    check_disjoint({split: names for split, (_, names) in out.items()}, files)
    return out


def find_source(name: str, root: Path) -> tuple[str, Path, str] | None:
    """('pickle', folder, file pattern) or ('archive', path, '') of the first source present."""
    folder = root / DATASETS[name].folder
    for pattern in DATASETS[name].pickles:
        if all((folder / pattern.format(split)).is_file() for split in SPLITS):
            return "pickle", folder, pattern
    archives = [root / place for place in ARCHIVE_PLACES if (root / place).is_file()]
    return ("archive", archives[0], "") if archives else None


def load_cifar(cfg: CIFARFSConfig) -> dict[str, torch.Tensor]:
    """split -> uint8 (C, 600, 3, S, S), memory-mapped from the cache (decoded on first use)."""
    root = resolve_root(cfg.root)
    source = find_source(cfg.name, root)
    if source is None and cfg.download:
        download(URL, root / ARCHIVE_PLACES[0], md5=MD5)
        source = find_source(cfg.name, root)
    if source is None:
        layout = DATASETS[cfg.name]
        pickles = root / layout.folder / layout.pickles[0].format("{train,val,test}")
        archives = [root / place for place in ARCHIVE_PLACES]
        raise DataError(
            f"{cfg.name} was not found: looked for {' and '.join(map(str, archives))} and for "
            f"{pickles}. Download {URL} (md5 {MD5}) to {archives[0]}, or set "
            f"data.download=true, or point data.root (or METALEARN_DATA) at the folder holding "
            f"cifar100/"
        )
    kind, path, pattern = source
    lists = split_lists(cfg.name)
    stats = fingerprint(path, pattern.format("*")) + repr(sorted(lists.items()))
    cache = cache_path(f"{cfg.name}-{cfg.image_size}", CACHE_FORMAT, kind, path, stats)

    def build() -> dict:
        if kind == "pickle":
            layout = DATASETS[cfg.name]
            return splits_blob(decode_pickles(path, pattern, layout.classes, cfg.image_size))
        return splits_blob(decode_archive(path, lists, cfg.image_size))

    blob = cached(cache, build)
    return {split: blob[split] for split in SPLITS}


def cifarfs_tasks(cfg: CIFARFSConfig, device: torch.device) -> ClassTasks:
    return ClassTasks(load_cifar(cfg), device)


def fc100_tasks(cfg: FC100Config, device: torch.device) -> ClassTasks:
    return ClassTasks(load_cifar(cfg), device)
