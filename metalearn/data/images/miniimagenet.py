"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split), from the files users hold.

Three sources, tried in this order under `<root>/miniimagenet/`:

1. the pickled caches that learn2learn and others distribute,
   `mini-imagenet-cache-{train,validation,test}.pkl` (keys `image_data`: uint8 (N, 84, 84, 3),
   `class_dict`: class -> example indices); downloaded when missing and `data.download`;
2. an image folder, `images/<filename>` or `images/<wnid>/<filename>`, named as in the Ravi CSVs;
3. raw ImageNet training images, `<imagenet root>/<wnid>/<wnid>_<number>.JPEG` (`data.imagenet`,
   default `<root>/imagenet/train`): the CSV's image k of a class is the k-th of the class's files
   sorted by number (the convention of the common mini-imagenet-tools script).

Whatever the source, the images are decoded and resized once into a uint8 cache under
`cache_dir()` and memory-mapped from it afterwards. The Ravi CSVs (`filename,label`) are read
from `<root>/miniimagenet/splits/ravi/` when present, else from the packaged copy.
"""

import csv
import gzip
import io
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metalearn.data.files.classes import check_disjoint
from metalearn.data.files.download import download
from metalearn.data.files.pickles import SafeUnpickler
from metalearn.data.files.preprocess import image_array
from metalearn.data.files.root import cache_path, cached, fingerprint, resolve_root, splits_blob
from metalearn.data.images.base import ImageTaskConfig
from metalearn.data.tasks import ClassTasks
from metalearn.errors import ConfigError, DataError

SPLITS = {"train": "train", "val": "validation", "test": "test"}  # ours -> the pickles' names
PICKLE_URL = "https://zenodo.org/record/7978538/files/mini-imagenet-cache-{}.pkl"
PREPROCESS = {"mode": "RGB", "invert": False}
CACHE_FORMAT = 1


@dataclass
class MiniImageNetConfig(ImageTaskConfig):
    """miniImageNet with the Ravi split: 64/16/20 classes of 600 images."""

    name: str = "miniimagenet"
    imagenet: str | None = None  # raw ImageNet train folder (None: <root>/imagenet/train)
    split: str = "ravi"  # the only published miniImageNet split

    def __post_init__(self) -> None:
        if self.split != "ravi":
            raise ConfigError(f"data.split={self.split!r} is not a miniImageNet split; valid: ravi")
        super().__post_init__()


def ravi_lists(folder: Path) -> dict[str, dict[str, list[str]]]:
    """split -> class (wnid) -> file names in CSV order, from `folder` or the packaged copy."""
    lists, files = {}, {}
    for split in SPLITS:
        path = folder / "splits" / "ravi" / f"{split}.csv"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
        else:
            path = resources.files("metalearn") / "splits" / "miniimagenet" / "ravi"
            path = path / f"{split}.csv.gz"
            text = gzip.decompress(path.read_bytes()).decode()
        classes: dict[str, list[str]] = {}
        rows = csv.reader(io.StringIO(text))
        if next(rows, None) != ["filename", "label"]:
            raise DataError(f"{path} is not a Ravi split list: its header must be filename,label")
        for number, row in enumerate(rows, start=2):
            if len(row) != 2:
                raise DataError(f"{path}: line {number} is {row}, not filename,label")
            classes.setdefault(row[1], []).append(row[0])
        lists[split], files[split] = classes, str(path)
    check_disjoint({split: list(classes) for split, classes in lists.items()}, files)
    return lists


def read_pickle(path: Path) -> dict:
    """A miniImageNet pickle's dict, checked for the keys and dtypes of the distributed files."""
    try:
        with open(path, "rb") as f:
            blob = SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError) as error:
        raise DataError(
            f"{path} is not a readable miniImageNet pickle ({error}); delete it and download "
            f"it again"
        ) from error
    if not isinstance(blob, dict) or not {"image_data", "class_dict"} <= set(blob):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise DataError(
            f"{path} lacks the keys image_data and class_dict of the miniImageNet pickles "
            f"(found {keys}); it is not mini-imagenet-cache-*.pkl"
        )
    images = blob["image_data"]
    is_array = isinstance(images, np.ndarray)
    found = f"{images.dtype} {images.shape}" if is_array else f"a {type(images).__name__}"
    if not (is_array and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3):
        raise DataError(
            f"{path}: image_data must be a uint8 array (N, H, W, 3) of RGB images, got {found}; "
            f"it is not mini-imagenet-cache-*.pkl"
        )
    if not isinstance(blob["class_dict"], dict):
        raise DataError(
            f"{path}: class_dict must be a dict of class -> image indices, got a "
            f"{type(blob['class_dict']).__name__}; it is not mini-imagenet-cache-*.pkl"
        )
    return blob


def _stack(per_class: list[list[np.ndarray]], where: str) -> torch.Tensor:
    """Equal-sized classes of (H, W, 3) images -> uint8 (C, E, 3, H, W)."""
    sizes = {len(images) for images in per_class}
    if len(sizes) != 1:
        raise DataError(
            f"{where}: classes have different numbers of images {sorted(sizes)}, but every "
            f"miniImageNet class has 600; the source is incomplete, replace it"
        )
    array = np.stack([np.stack(images) for images in per_class])  # (C, E, H, W, 3)
    return torch.from_numpy(array).permute(0, 1, 4, 2, 3).contiguous()


def _resized(array: np.ndarray, size: int) -> np.ndarray:
    if array.shape[:2] == (size, size):
        return array
    return image_array(Image.fromarray(array), **PREPROCESS, size=size)


def _check_indices(path: Path, class_dict: dict, count: int) -> None:
    """Every class has images, each an index into image_data's `count` images."""
    for wnid, indices in class_dict.items():
        indices = np.asarray(indices)
        if indices.size == 0:
            raise DataError(f"{path}: class {wnid} has no images in class_dict; replace the file")
        if indices.dtype.kind not in "iu" or indices.min() < 0 or indices.max() >= count:
            raise DataError(
                f"{path}: class_dict lists images of class {wnid} outside the {count} of "
                f"image_data; the file is corrupt, replace it"
            )


def decode_pickles(folder: Path, size: int) -> dict[str, tuple[torch.Tensor, list[str]]]:
    out, lists, files = {}, {}, {}
    for split, name in SPLITS.items():  # one pickle in memory at a time
        path = folder / f"mini-imagenet-cache-{name}.pkl"
        blob = read_pickle(path)
        lists[split], files[split] = list(blob["class_dict"]), str(path)
        check_disjoint(lists, files)  # against the splits read so far
        data, classes = blob["image_data"], sorted(blob["class_dict"])
        _check_indices(path, blob["class_dict"], len(data))
        per_class = [
            [_resized(data[i], size) for i in blob["class_dict"][c]]
            for c in tqdm(classes, desc=f"decode {path.name}", leave=False)
        ]
        out[split] = (_stack(per_class, str(path)), classes)
    return out


def _open(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return image_array(image, **PREPROCESS, size=size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode the image {path} ({error}); replace the file") from error


def decode_folder(images: Path, lists: dict, size: int) -> dict[str, tuple[torch.Tensor, list]]:
    """Images named as in the CSVs, loose in `images/` or in one sub-folder per class."""
    out = {}
    for split, classes in lists.items():
        per_class = []
        for wnid in tqdm(sorted(classes), desc=f"decode {split} images", leave=False):
            paths = []
            for filename in classes[wnid]:
                path = images / filename
                paths.append(path if path.is_file() else images / wnid / filename)
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(
                    f"{len(missing)} images of class {wnid} listed in the Ravi {split} split are "
                    f"not in {images} (e.g. {missing[0].name}); the folder is incomplete"
                )
            per_class.append([_open(p, size) for p in paths])
        out[split] = (_stack(per_class, str(images)), sorted(classes))
    return out


def _number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[-1])


def decode_imagenet(train: Path, lists: dict, size: int) -> dict[str, tuple[torch.Tensor, list]]:
    """The CSV's `<wnid><8-digit k>.jpg` is the k-th (from 1) of the class's ImageNet files
    sorted by number; each is resized once to size x size."""
    out = {}
    for split, classes in lists.items():
        per_class = []
        for wnid in tqdm(sorted(classes), desc=f"resize {split} ImageNet images", leave=False):
            files = sorted((train / wnid).glob(f"{wnid}_*.JPEG"), key=_number)
            chosen = [int(name[len(wnid) : -len(".jpg")]) for name in classes[wnid]]
            if not files or max(chosen) > len(files):
                raise DataError(
                    f"{train / wnid} holds {len(files)} images but the Ravi {split} split needs "
                    f"image {max(chosen)} of class {wnid}; point data.imagenet at the ImageNet "
                    f"(ILSVRC2012) train folder"
                )
            per_class.append([_open(files[k - 1], size) for k in chosen])
        out[split] = (_stack(per_class, str(train)), sorted(classes))
    return out


def find_source(folder: Path, imagenet: Path) -> tuple[str, Path] | None:
    """The first source present: ('pickle', folder), ('folder', images) or ('imagenet', train)."""
    if all((folder / f"mini-imagenet-cache-{n}.pkl").is_file() for n in SPLITS.values()):
        return "pickle", folder
    if (folder / "images").is_dir():
        return "folder", folder / "images"
    if imagenet.is_dir():
        return "imagenet", imagenet
    return None


def _missing(folder: Path, imagenet: Path) -> str:
    return (
        f"miniImageNet was not found. Put one of these under {folder}: the pickles "
        f"mini-imagenet-cache-{{train,validation,test}}.pkl (from {PICKLE_URL.format('train')} "
        f"and its siblings), or an images/ folder named as in the Ravi CSVs; or point "
        f"data.imagenet at the ImageNet train folder (looked for at {imagenet}). Set "
        f"data.root=/path/to/data or METALEARN_DATA to the folder holding miniimagenet/."
    )


def load_miniimagenet(cfg: MiniImageNetConfig) -> dict[str, torch.Tensor]:
    """split -> uint8 (C, 600, 3, S, S), memory-mapped from the cache (decoded on first use)."""
    folder = resolve_root(cfg.root) / "miniimagenet"
    imagenet = Path(cfg.imagenet) if cfg.imagenet else folder.parent / "imagenet" / "train"
    source = find_source(folder, imagenet)
    if source is None and cfg.download:
        for name in SPLITS.values():  # no published checksums exist for these files
            download(PICKLE_URL.format(name), folder / f"mini-imagenet-cache-{name}.pkl")
        source = find_source(folder, imagenet)
    if source is None:
        raise DataError(_missing(folder, imagenet))
    kind, path = source
    # a cache key from the source's file statistics (for raw ImageNet, 1.3M files: its path)
    stats = (
        str(path) if kind == "imagenet" else fingerprint(path, "*.pkl" if kind == "pickle" else "*")
    )
    cache = cache_path(f"miniimagenet-{cfg.image_size}", CACHE_FORMAT, kind, path, stats)

    def build() -> dict:
        if kind == "pickle":
            return splits_blob(decode_pickles(path, cfg.image_size))
        decode = decode_folder if kind == "folder" else decode_imagenet
        return splits_blob(decode(path, ravi_lists(folder), cfg.image_size))

    blob = cached(cache, build)
    return {split: blob[split] for split in SPLITS}


def miniimagenet_tasks(cfg: MiniImageNetConfig, device: torch.device) -> ClassTasks:
    return ClassTasks(load_miniimagenet(cfg), device)
