"""tieredImageNet (Ren et al. 2018) from the files users hold: the npz release or the PNG pickles.

608 ILSVRC-12 classes in 34 categories, split by category into 351/97/160 train/val/test classes
(779,165 images, 84x84). Two sources, tried in this order under `<root>/tieredimagenet/`, each
with Ren et al.'s labels pickles `{train,val,test}_labels.pkl` (a dict: `label_specific`, the
class of each image, int (N,); `label_specific_str`, the class names; `label_general` and
`label_general_str`, the categories; the npz release's loaders, MetaOptNet's and RFS's, read the
class of each image from `labels` instead, ids that continue across splits):

1. the npz release used by MetaOptNet and RFS, `{split}_images.npz`: one array `images`, uint8
   (N, 84, 84, 3) in OpenCV's BGR order (Ren et al. decoded the PNGs with cv2.imdecode), read
   memory-mapped and flipped to RGB;
2. Ren et al.'s release, `{split}_images_png.pkl`: a list of N PNG-encoded images (the uint8
   arrays of cv2.imencode); downloaded from learn2learn's Zenodo mirror when no source is found
   and `data.download`.

The pickles were written by Python 2, hence encoding='latin1'; restricted unpicklers load numpy
arrays and plain containers only. Splits are decoded one at a time (the train split alone is about
9.5 GB of uint8 at 84x84) into uint8 caches under `cache_dir()`, memory-mapped afterwards; each PNG
is decoded as it is unpickled and then dropped, and npz files are memory-mapped, so a split's
source and its decoded images are never both in memory. Classes keep their own sizes: a split is
its classes' images one after another plus the count of each (the counts form of
EpisodeSampler), classes in the order of their label ids.

Over 300 lines because it reads both published releases (npz and PNG pickles), each checked
for the damage users meet, from the archive to the sampler.
"""

import functools
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metalearn.data.files.download import download
from metalearn.data.files.pickles import Refused, Restricted
from metalearn.data.files.preprocess import image_array
from metalearn.data.files.root import cache_path, cached, fingerprint, resolve_root
from metalearn.data.images.base import ImageTaskConfig
from metalearn.data.tasks import ClassTasks
from metalearn.errors import DataError

SPLITS = ("train", "val", "test")
SOURCES = {"npz": "{}_images.npz", "png": "{}_images_png.pkl"}  # in the order they are tried
LABELS = "{}_labels.pkl"
# learn2learn's mirror of Ren et al.'s files (learn2learn/vision/datasets/tiered_imagenet.py),
# named tiered-imagenet-<file>. No checksums: none are published with it.
MIRROR = "https://zenodo.org/record/7978538/files/tiered-imagenet-{}"
PREPROCESS = {"mode": "RGB", "invert": False}
CACHE_FORMAT = 1
CHUNK = 1024  # npz images copied per step
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class TieredImageNetConfig(ImageTaskConfig):
    """tieredImageNet (Ren et al. 2018): 351/97/160 classes of 732 to 1300 images each."""

    name: str = "tieredimagenet"


@dataclass
class TieredSplit:
    """One split's classes, decoded: the images of classes[0], then of classes[1], ..."""

    images: torch.Tensor  # uint8 (sum E_c, 3, S, S)
    counts: torch.Tensor  # (C,) images per class
    classes: list[str]  # label_specific_str (or, without it, the label ids), in label-id order


class _SafeUnpickler(Restricted, pickle.Unpickler):
    pass


def _small(value: object) -> bool:
    """Whether the memo may keep `value`: no image data (arrays, which are memoized while still
    empty, long strings, tuples of them)."""
    if isinstance(value, np.ndarray):
        return False
    if isinstance(value, tuple | list):
        return len(value) < 64 and all(_small(v) for v in value)
    return not isinstance(value, str | bytes | bytearray) or len(value) < 1024


class _SmallMemo(dict):
    """A memo that keeps only small objects (globals, dtypes, short strings): the images, which a
    list of distinct PNGs never refers back to, are not kept alive by it."""

    size = 0  # entries memoized, kept or not: protocol 4's MEMOIZE numbers the next one by it

    def __setitem__(self, key: int, value: object) -> None:
        self.size = max(self.size, key + 1)
        if _small(value):
            super().__setitem__(key, value)

    def __len__(self) -> int:
        return self.size


class _StreamingUnpickler(Restricted, pickle._Unpickler):
    """Unpickles a list item by item, handing each to `take(index, item)` and keeping none, so a
    split's PNGs are never all in memory (the pure-Python unpickler, whose opcodes can be
    overridden; the top-level list stays empty)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, take, **options) -> None:
        super().__init__(file, **options)
        self.memo, self.take, self.count, self.root = _SmallMemo(), take, 0, None

    def _streamed(self, items: list) -> bool:
        if not (self.stack and self.stack[-1] is self.root):
            return False
        for item in items:
            self.take(self.count, item)
            self.count += 1
        return True

    def load_empty_list(self) -> None:
        self.append([])
        if len(self.stack) == 1 and not self.metastack:  # the pickle's own object
            self.root = self.stack[0]

    def load_append(self) -> None:
        item = self.stack.pop()
        if not self._streamed([item]):
            self.stack[-1].append(item)

    def load_appends(self) -> None:
        items = self.pop_mark()
        if not self._streamed(items):
            self.stack[-1].extend(items)

    dispatch[pickle.EMPTY_LIST[0]] = load_empty_list
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends


def _unpickle(path: Path, unpickler: type, *args) -> "_SafeUnpickler | _StreamingUnpickler":
    """`unpickler(file, *args)` loaded from `path`; Python 2 `str` read as latin1."""
    try:
        with open(path, "rb") as f:
            loader = unpickler(f, *args, encoding="latin1")
            loader.result = loader.load()
            return loader
    except Refused as error:
        raise DataError(f"{path}: {error}; it is not a genuine file, delete it") from error
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as error:
        detail = str(error) or type(error).__name__  # the Python unpickler's EOFError is bare
        raise DataError(
            f"cannot read {path} ({detail}): it is truncated, corrupt or not a tieredImageNet "
            f"pickle; delete it and fetch it again"
        ) from error


def read_pickle(path: Path) -> object:
    return _unpickle(path, _SafeUnpickler).result


def _text(value: object) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """(class index 0..C-1 of each image (N,), class names): from `label_specific` (Ren et al.)
    or `labels` (MetaOptNet's and RFS's key); classes in the order of their ids."""
    blob = read_pickle(path)
    # keys are bytes when a pickle was re-saved after loading it with encoding='bytes'
    blob = {_text(k): v for k, v in blob.items()} if isinstance(blob, dict) else blob
    key = "label_specific" if isinstance(blob, dict) and "label_specific" in blob else "labels"
    if not isinstance(blob, dict) or key not in blob:
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise DataError(
            f"{path} lacks label_specific (Ren et al.'s labels pickle) and labels (the npz "
            f"release's) (found {found}); it is not a tieredImageNet labels pickle"
        )
    labels = np.asarray(blob[key])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0:
        raise DataError(
            f"{path}: {key} must be a non-empty 1-D list of integer class ids, got "
            f"{labels.dtype} {labels.shape}"
        )
    ids, classes = np.unique(labels, return_inverse=True)
    names = blob.get("label_specific_str") if key == "label_specific" else None
    if names is None:
        return classes, [str(i) for i in ids]
    if ids[0] < 0 or ids[-1] >= len(names):
        raise DataError(
            f"{path}: label_specific holds ids {ids[0]}..{ids[-1]} but label_specific_str names "
            f"{len(names)} classes"
        )
    return classes, [_text(names[i]) for i in ids]


def _memmap_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """An uncompressed .npy member of a zip file (what np.savez writes), memory-mapped."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header; its name and extra lengths end it
        if header[:4] != b"PK\x03\x04":
            raise ValueError(f"no local zip header for {info.filename}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in read:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read[version](f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"images must be a C-ordered numeric array, got {dtype}")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def open_npz(path: Path) -> np.ndarray:
    """The `images` array of an npz file: (N, H, W, 3) uint8, memory-mapped when stored."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "images.npy" not in names:
                found = ", ".join(n.removesuffix(".npy") for n in names)
                raise DataError(
                    f"{path} lacks the array images of the tieredImageNet npz files (found "
                    f"{found}); it is not a {{train,val,test}}_images.npz"
                )
            info = archive.getinfo("images.npy")
            if info.compress_type == zipfile.ZIP_STORED:
                array = _memmap_member(path, info)
            else:  # np.savez_compressed: no way around reading it
                with archive.open(info) as member:
                    array = np.lib.format.read_array(member, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise DataError(
            f"cannot read {path} ({error}): it is truncated or corrupt; fetch it again"
        ) from error
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise DataError(
            f"{path}: images must be uint8 (N, H, W, 3), got {array.dtype} {array.shape}"
        )
    return array


def _rgb(array: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) RGB -> (3, S, S), resized with the preprocessing user images get."""
    if array.shape[:2] != (size, size):
        array = image_array(Image.fromarray(array), **PREPROCESS, size=size)
    return torch.tensor(array).permute(2, 0, 1)  # a copy: PIL's arrays are read-only


def fill_from_npz(path: Path, order: np.ndarray, images: torch.Tensor) -> None:
    """images[i] = the npz's image order[i], BGR -> RGB."""
    array = open_npz(path)
    if len(array) != len(order):
        raise DataError(f"{path} holds {len(array)} images but its labels pickle {len(order)}")
    size = images.shape[-1]
    for start in tqdm(range(0, len(order), CHUNK), desc=f"decode {path.name}", leave=False):
        chunk = np.ascontiguousarray(array[order[start : start + CHUNK]][..., ::-1])  # RGB
        if chunk.shape[1:3] == (size, size):
            images[start : start + len(chunk)] = torch.from_numpy(chunk).permute(0, 3, 1, 2)
        else:
            images[start : start + len(chunk)] = torch.stack([_rgb(a, size) for a in chunk])


def _png(item: object, path: Path, index: int, size: int) -> torch.Tensor:
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        item = item.tobytes()  # cv2.imencode's (L, 1) buffer
    elif isinstance(item, str):
        item = item.encode("latin1")  # a Python 2 str, as latin1 unpickles it
    if not isinstance(item, bytes | bytearray):
        raise DataError(f"{path}: image {index} is a {type(item).__name__}, not PNG bytes")
    try:
        with Image.open(io.BytesIO(item)) as image:
            return _rgb(image_array(image, **PREPROCESS, size=size), size)
    except _IMAGE_ERRORS as error:
        raise DataError(
            f"{path}: image {index} is not a decodable PNG ({error}); the file is corrupt, fetch "
            f"it again"
        ) from error


def fill_from_png(path: Path, order: np.ndarray, images: torch.Tensor) -> None:
    """images[i] = the pickle's PNG order[i], decoded as it is read."""
    row = np.empty_like(order)
    row[order] = np.arange(len(order))  # file position -> row of `images`
    with tqdm(total=len(order), desc=f"decode {path.name}", leave=False) as bar:

        def take(index: int, item: object) -> None:
            if index < len(order):
                images[row[index]] = _png(item, path, index, images.shape[-1])
            bar.update()

        loader = _unpickle(path, _StreamingUnpickler, take)
    if loader.root is not loader.result or loader.count != len(order):
        found = f"{loader.count} items" if loader.root is loader.result else "no list"
        raise DataError(
            f"{path} must be a list of one PNG per labelled image ({len(order)}), found {found}"
        )


def decode_split(folder: Path, split: str, kind: str, size: int) -> TieredSplit:
    classes, names = read_labels(folder / LABELS.format(split))
    order = np.argsort(classes, kind="stable")  # class-major, file order within a class
    images = torch.empty((len(order), 3, size, size), dtype=torch.uint8)  # (sum E_c, 3, S, S)
    fill = fill_from_npz if kind == "npz" else fill_from_png
    fill(folder / SOURCES[kind].format(split), order, images)
    return TieredSplit(images, torch.from_numpy(np.bincount(classes)), names)


def _decoded(folder: Path, split: str, kind: str, size: int) -> dict:
    return vars(decode_split(folder, split, kind, size))  # what a cache holds: a plain dict


def _files(kind: str) -> list[str]:
    return [name.format(s) for s in SPLITS for name in (SOURCES[kind], LABELS)]


def find_source(folder: Path) -> str | None:
    """The first format whose six files are all present: 'npz' or 'png'."""
    return next((k for k in SOURCES if all((folder / n).is_file() for n in _files(k))), None)


def _missing(folder: Path) -> str:
    absent = {k: [n for n in _files(k) if not (folder / n).is_file()] for k in SOURCES}
    return (
        f"tieredImageNet was not found in {folder}: of the npz release it lacks "
        f"{', '.join(absent['npz'])}; of Ren et al.'s PNG pickles it lacks "
        f"{', '.join(absent['png'])}. Put either set there (the PNG pickles are "
        f"{MIRROR.format('train_images_png.pkl')} and its siblings, saved without the "
        f"tiered-imagenet- prefix), set data.download=true, or set data.root (or METALEARN_DATA) "
        f"to the folder holding tieredimagenet/."
    )


def load_tieredimagenet(cfg: TieredImageNetConfig) -> dict[str, TieredSplit]:
    """split -> its classes' images, memory-mapped from the caches (decoded on first use)."""
    folder = resolve_root(cfg.root) / "tieredimagenet"
    kind = find_source(folder)
    if kind is None and cfg.download:
        for name in _files("png"):
            if not (folder / name).is_file():
                download(MIRROR.format(name), folder / name)
        kind = find_source(folder)
    if kind is None:
        raise DataError(_missing(folder))
    out = {}
    for split in SPLITS:  # one at a time, each its own cache
        sources = [folder / SOURCES[kind].format(split), folder / LABELS.format(split)]
        stats = "|".join(fingerprint(p) for p in sources)  # an edited source is decoded again
        name = f"tieredimagenet-{cfg.image_size}-{split}"
        cache = cache_path(name, CACHE_FORMAT, kind, folder, stats)
        blob = cached(cache, functools.partial(_decoded, folder, split, kind, cfg.image_size))
        out[split] = TieredSplit(**blob)
    return out


def tieredimagenet_tasks(cfg: TieredImageNetConfig, device: torch.device) -> ClassTasks:
    splits = load_tieredimagenet(cfg)
    images = {split: part.images for split, part in splits.items()}
    return ClassTasks(images, device, {split: part.counts for split, part in splits.items()})
