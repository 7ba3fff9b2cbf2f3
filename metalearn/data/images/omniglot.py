"""Omniglot (Lake et al. 2015): its config, the archives found or downloaded, decoded once to a
cache, split, and held on the device as a task sampler.

Over 300 lines because it is one data set's whole path from the official archives to the
sampler, as each module beside it; the archive reading is Omniglot's own (two zip files of
PNGs by alphabet and character).
"""

import hashlib
import io
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from metalearn.config import check_seed
from metalearn.data.files.archives import inside
from metalearn.data.files.classes import (
    ClassSet,
    check_disjoint,
    gather_classes,
    read_split_lists,
    with_rotations,
)
from metalearn.data.files.download import download as download_file
from metalearn.data.files.preprocess import image_array
from metalearn.data.files.root import cache_dir, fingerprint, load_cache, resolve_root, save_cache
from metalearn.data.images.base import ImageTaskConfig
from metalearn.data.tasks import ClassTasks
from metalearn.errors import ConfigError, DataError


@dataclass(frozen=True)
class Archive:
    """One official archive: where it is published and its md5 there."""

    url: str
    md5: str


_OFFICIAL = "https://github.com/brendenlake/omniglot/raw/master/python"
# Black ink on white, 105x105 -> grey ink = 255 at the cache's size; user images get the same.
PREPROCESS = {"mode": "L", "invert": True}
ARCHIVES = {
    "background": Archive(f"{_OFFICIAL}/images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "evaluation": Archive(f"{_OFFICIAL}/images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
}
DRAWERS = 20  # every character is drawn once by each of 20 people
CACHE_FORMAT = 1  # bump when the decoded layout changes, so old caches are ignored
SPLIT_PARTS = ("train", "val", "test")
# Official member names: images_background/<Alphabet>/characterKK/<ID>_<DD>.png (DD = drawer).
_MEMBER = re.compile(
    r"(?:^|/)images_(?P<part>background|evaluation)/(?P<alphabet>[^/]+)/"
    r"(?P<character>character\d+)/\d+_(?P<drawer>\d+)\.png$"
)
# A character's folder: a zip's folder entry, or a sub-folder of an extracted copy.
_FOLDER = re.compile(
    r"(?:^|/)images_(?P<part>background|evaluation)/(?P<alphabet>[^/]+)/"
    r"(?P<character>character\d+)/$"
)
# What a truncated zip, a bad CRC, a broken PNG or one claiming a huge size raises while we read.
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, SyntaxError, ValueError)
_READ_ERRORS += (Image.DecompressionBombError,)


@dataclass
class OmniglotCharacters:
    """All characters, decoded: images[i, d] is drawer d + 1's drawing of character names[i]."""

    images: torch.Tensor  # uint8 [N, 20, H, W]; ink = 255, background = 0
    names: list[str]  # "<Alphabet>/characterKK", sorted
    background: list[bool]  # True where the character is from images_background


def candidates(root: Path, part: str) -> list[Path]:
    """Where images_<part> may be under `root`: our layout, a bare zip, torchvision's layout."""
    name = f"images_{part}"
    return [
        root / "omniglot" / f"{name}.zip",
        root / f"{name}.zip",
        root / "omniglot-py" / f"{name}.zip",
        root / "omniglot-py" / name,  # torchvision's extracted folder
    ]


def find_archives(root: Path) -> dict[str, Path | None]:
    """The first existing candidate for each part ("background", "evaluation"), or None."""
    found: dict[str, Path | None] = {}
    for part in ARCHIVES:
        exists = [p for p in candidates(root, part) if (p.is_file() if p.suffix else p.is_dir())]
        found[part] = exists[0] if exists else None
    return found


def _missing_message(root: Path, missing: list[str], reason: str) -> str:
    files = ", ".join(f"images_{part}.zip" for part in missing)
    searched = "\n".join(f"  {p}" for part in missing for p in candidates(root, part))
    urls = "\n".join(f"  {ARCHIVES[part].url}  (md5 {ARCHIVES[part].md5})" for part in missing)
    return (
        f"Omniglot not found: expected {files} under the data root {root}.\n{reason}\n"
        f"Searched:\n{searched}\n"
        f"Download the official archives:\n{urls}\n"
        f"into {root / 'omniglot'}/, or point the data root at a folder that has them with "
        f"data.root=/path/to/data or METALEARN_DATA=/path/to/data."
    )


def ensure_archives(root: Path, *, download: bool = True) -> dict[str, Path]:
    """Find both archives under `root`, downloading missing ones into `root/omniglot/`."""
    found = find_archives(root)
    missing = [part for part, path in found.items() if path is None]
    reason = "Not downloaded: download is disabled."
    if missing and download:
        try:
            for part in missing:
                dest = root / "omniglot" / f"images_{part}.zip"
                found[part] = download_file(ARCHIVES[part].url, dest, md5=ARCHIVES[part].md5)
            missing = []
        except DataError as err:
            reason = f"The download failed: {err}"
            missing = [part for part, path in found.items() if path is None]
    if missing:
        raise DataError(_missing_message(root, missing, reason))
    return {part: path for part, path in found.items() if path is not None}


def _corrupt(path: Path, detail: str) -> DataError:
    what = "folder" if path.is_dir() else "file"
    return DataError(
        f"The Omniglot {what} {path} is unreadable: {detail}. It is truncated or corrupt: "
        f"delete it and download it again (metalearn downloads it when it is missing)."
    )


class _Source:
    """Read members of a zip archive or of an extracted folder by their archive names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        try:
            if path.is_dir():
                # Names relative to the folder's parent match the zip's ("images_background/...");
                # the character folders come too, with a trailing "/" as a zip's folder entries.
                files = path.rglob("*.png")
                self.names = [f.relative_to(path.parent).as_posix() for f in files]
                folders = [f for f in path.glob("*/*") if f.is_dir()]
                self.names += [f"{f.relative_to(path.parent).as_posix()}/" for f in folders]
            else:
                self.zip = zipfile.ZipFile(path)
                self.names = self.zip.namelist()
        except _READ_ERRORS as err:
            raise _corrupt(path, f"{type(err).__name__}: {err}") from err
        if self.zip is not None:
            # Members are read in memory, never extracted, but no official one points outside.
            fix = "it is not the official archive: delete it and download it again"
            try:
                for name in self.names:
                    inside(name, f"The Omniglot file {path}", fix)
            except DataError:
                self.close()
                raise

    def decode(self, name: str, size: int) -> np.ndarray:
        """Decode one PNG to uint8 [size, size], ink = 255 (the PNGs draw black ink on white)."""
        try:
            data = self.zip.read(name) if self.zip else (self.path.parent / name).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                return image_array(image, **PREPROCESS, size=size)
        except _READ_ERRORS as err:
            if self.zip is None:  # in a folder the broken PNG is itself the file to replace
                raise _corrupt(self.path.parent / name, f"{type(err).__name__}: {err}") from err
            raise _corrupt(self.path, f"member {name}: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _index_members(source: _Source, part: str) -> dict[str, list[str]]:
    """Map "<Alphabet>/characterKK" to its member names, ordered by drawer 01..20."""
    drawers: dict[str, dict[int, str]] = {}
    folders: set[str] = set()
    for name in source.names:
        match = _MEMBER.search(name)
        if match and match["part"] == part:
            character = f"{match['alphabet']}/{match['character']}"
            drawers.setdefault(character, {})[int(match["drawer"])] = name
        folder = _FOLDER.search(name)
        if folder and folder["part"] == part:
            folders.add(f"{folder['alphabet']}/{folder['character']}")
    if not drawers:
        raise _corrupt(source.path, f"no images_{part}/<Alphabet>/characterKK/<ID>_<DD>.png")
    empty = sorted(folders - set(drawers))
    if empty:
        shown = ", ".join(f"images_{part}/{c}/" for c in empty[:3])
        detail = f"{len(empty)} character folder(s) hold no images ({shown})"
        raise _corrupt(source.path, f"{detail}; each should hold drawers 01..20")
    expected = set(range(1, DRAWERS + 1))
    for character, found in drawers.items():
        if set(found) != expected:
            missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
            detail = f"character {character} should have drawers 01..20"
            raise _corrupt(source.path, f"{detail}; missing {missing}, unexpected {extra}")
    return {c: [found[d] for d in sorted(found)] for c, found in drawers.items()}


def decode_archives(sources: dict[str, Path], image_size: int) -> OmniglotCharacters:
    """Decode every PNG of the archives into one uint8 [N, 20, S, S] tensor, characters sorted."""
    opened: dict[str, _Source] = {}
    try:
        members: dict[str, tuple[str, list[str]]] = {}
        for part, path in sources.items():
            opened[part] = _Source(path)
            for character, names in _index_members(opened[part], part).items():
                members[character] = (part, names)
        characters = sorted(members)
        images = torch.empty((len(characters), DRAWERS, image_size, image_size), dtype=torch.uint8)
        pixels = images.numpy()  # shares memory: filled in place below
        desc = f"decode Omniglot {image_size}x{image_size}"
        with tqdm(total=len(characters) * DRAWERS, desc=desc, unit="img") as bar:
            for i, character in enumerate(characters):
                part, names = members[character]
                for d, name in enumerate(names):
                    pixels[i, d] = opened[part].decode(name, image_size)
                bar.update(DRAWERS)
    finally:
        for source in opened.values():
            source.close()
    background = [members[c][0] == "background" for c in characters]
    return OmniglotCharacters(images=images, names=characters, background=background)


def cache_path(sources: dict[str, Path], image_size: int) -> Path:
    """`cache_dir()/omniglot-<size>-<key>.pt`, the key hashing the format and archive stats."""
    key = f"format={CACHE_FORMAT};size={image_size}"
    for part in sorted(sources):
        key += f";{part}={sources[part].name}:{fingerprint(sources[part], '*.png')}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"omniglot-{image_size}-{digest}.pt"


def _from_cache(path: Path, image_size: int) -> OmniglotCharacters | None:
    """The cached characters, or None when absent, unreadable or of another layout."""
    blob = load_cache(path)
    if blob is None:
        return None
    try:
        characters = OmniglotCharacters(blob["images"], blob["names"], blob["background"])
    except KeyError:
        return None
    n = len(characters.names)
    if characters.images.shape != (n, DRAWERS, image_size, image_size):
        return None
    return characters


def load_characters(
    root: Path | str | None, *, image_size: int = 28, download: bool = True
) -> OmniglotCharacters:
    """All 1623 characters at `image_size`, from the cache or decoded (and cached) once."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ConfigError(f"Omniglot image_size must be a positive integer, got {image_size!r}.")
    sources = ensure_archives(resolve_root(root), download=download)
    path = cache_path(sources, image_size)
    characters = _from_cache(path, image_size)
    if characters is None:
        characters = decode_archives(sources, image_size)
        blob = {"images": characters.images, "names": characters.names}
        save_cache(path, blob | {"background": characters.background})
    return characters


def _split(characters: OmniglotCharacters, lists: dict[str, list[str]]) -> dict[str, ClassSet]:
    images, names = characters.images, characters.names
    return {part: gather_classes(images, names, classes) for part, classes in lists.items()}


def vinyals_split(
    characters: OmniglotCharacters, seed: int = 0, lists: dict[str, list[str]] | None = None
) -> dict[str, ClassSet]:
    """Vinyals et al. 2016 as in Snell et al. 2017: fixed class lists, each a rotated character.

    The lists are packaged (train 4112, val 688, test 1692 classes); `seed` is unused. Tests pass
    their own `lists` ({"train": [...], "val": [...], "test": [...]}).
    """
    if lists is None:
        lists = read_split_lists("omniglot", "vinyals", SPLIT_PARTS)
    else:
        check_disjoint(lists, {part: f"the {part} list" for part in lists})
    return _split(characters, lists)


def maml_split(
    characters: OmniglotCharacters, seed: int = 0, n_train: int = 1100, n_val: int = 100
) -> dict[str, ClassSet]:
    """Finn et al. 2017: shuffled characters, 1100 train / 100 val / rest test, 4 rotations each."""
    n = len(characters.names)
    if n_train + n_val >= n:
        raise DataError(f"The MAML split needs over {n_train + n_val} characters, found {n}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
    chosen["test"] = order[n_train + n_val :]
    names = {part: [characters.names[i] for i in sorted(idx)] for part, idx in chosen.items()}
    return _split(characters, {part: with_rotations(names[part]) for part in SPLIT_PARTS})


def background_split(characters: OmniglotCharacters, seed: int = 0) -> dict[str, ClassSet]:
    """Lake et al. 2015: train on the background alphabets, no rotations; the evaluation
    alphabets' characters are shuffled and halved within each alphabet into val and test."""
    train = [c for c, bg in zip(characters.names, characters.background, strict=True) if bg]
    alphabets: dict[str, list[str]] = {}
    for name, bg in zip(characters.names, characters.background, strict=True):
        if not bg:
            alphabets.setdefault(name.split("/")[0], []).append(name)
    generator = torch.Generator().manual_seed(seed)
    val: list[str] = []
    test: list[str] = []
    for alphabet in sorted(alphabets):
        members = alphabets[alphabet]
        order = torch.randperm(len(members), generator=generator).tolist()
        half = len(members) // 2
        val += sorted(members[i] for i in order[:half])
        test += sorted(members[i] for i in order[half:])
    lists = {"train": train, "val": val, "test": test}
    return _split(characters, {part: with_rotations(lists[part], (0,)) for part in SPLIT_PARTS})


SPLITS: dict[str, Callable[..., dict[str, ClassSet]]] = {
    "vinyals": vinyals_split,
    "maml": maml_split,
    "background": background_split,
}


def load_omniglot(
    root: Path | str | None,
    split: str = "vinyals",
    *,
    image_size: int = 28,
    seed: int = 0,
    download: bool = True,
) -> dict[str, ClassSet]:
    """Omniglot as {"train", "val", "test"} ClassSets of uint8 [C, 20, 1, S, S], ink = 255.

    `root` None means `$METALEARN_DATA` or `~/.cache/metalearn` (see `resolve_root`).
    `split` is one of SPLITS; `seed` shuffles the maml and background splits.
    """
    if split not in SPLITS:
        raise ConfigError(f"Unknown Omniglot split {split!r}; valid splits: {', '.join(SPLITS)}.")
    characters = load_characters(root, image_size=image_size, download=download)
    return SPLITS[split](characters, seed=seed)


OMNIGLOT_SPLITS = ("vinyals", "maml", "background")


@dataclass
class OmniglotConfig(ImageTaskConfig):
    """Omniglot (Lake et al. 2015), read from the official archives under the data root."""

    name: str = "omniglot"
    split: str = (
        "vinyals"  # 'vinyals' (with rotations), 'maml' (1200/423 + rotations), 'background'
    )
    image_size: int = 28  # images are resized once to image_size x image_size (ink = 1)
    split_seed: int = 0  # seed of the 'maml' and 'background' splits
    # 'all', or 'alphabet': each validation and test episode's N classes from one alphabet (Lake
    # et al. 2015; Koch et al. 2015, section 4.1); training episodes are unchanged
    episode_scope: str = "all"

    EPISODE_SCOPES: ClassVar[tuple[str, ...]] = ("all", "alphabet")

    def __post_init__(self) -> None:
        if self.split not in OMNIGLOT_SPLITS:
            raise ConfigError(
                f"data.split={self.split!r} is not an Omniglot split; "
                f"valid: {', '.join(OMNIGLOT_SPLITS)}"
            )
        super().__post_init__()
        check_seed(self.split_seed, "data.split_seed")


def omniglot_tasks(cfg: OmniglotConfig, device: torch.device) -> ClassTasks:
    """Load (decoding once, then from the cache) and hold every split's images on the device."""
    sets = load_omniglot(
        resolve_root(cfg.root),
        cfg.split,
        image_size=cfg.image_size,
        seed=cfg.split_seed,
        download=cfg.download,
    )
    groups = {}
    if cfg.episode_scope == "alphabet":  # evaluation episodes only (the protocol)
        groups = {split: alphabet_index(sets[split].names) for split in ("val", "test")}
    return ClassTasks({split: s.images for split, s in sets.items()}, device, groups=groups)


def alphabet_index(names: list[str]) -> torch.Tensor:
    """Each class's alphabet as an index (C,): "<Alphabet>/characterKK/rotDDD" -> Alphabet's
    position among the sorted alphabets. A rotated character stays in its own alphabet."""
    alphabets = [name.split("/")[0] for name in names]
    index = {alphabet: i for i, alphabet in enumerate(sorted(set(alphabets)))}
    return torch.tensor([index[alphabet] for alphabet in alphabets], dtype=torch.long)
