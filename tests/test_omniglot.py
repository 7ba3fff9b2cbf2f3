"""Omniglot data layer: finding, downloading, decoding, caching and splitting the archives."""

import hashlib
import io
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metalearn.data.files.classes import gather_classes, with_rotations
from metalearn.data.files.download import download
from metalearn.data.files.root import cache_dir, resolve_root
from metalearn.data.images import omniglot
from metalearn.data.images.omniglot import Archive, load_characters, load_omniglot
from metalearn.errors import ConfigError, DataError

# A tiny Omniglot in the official layout: alphabet -> number of characters.
TINY = {
    "background": {"Alpha": 3, "Beta": 3, "Gamma": 2},
    "evaluation": {"Delta": 4, "Epsilon": 3},
}
N_TINY = sum(n for alphabets in TINY.values() for n in alphabets.values())
BITS = 10  # barcode width: official ID * 32 + drawer < 2**10


def tiny_png(official_id: int, drawer: int) -> bytes:
    """A 105x105 1-bit PNG, white background, black ink: a filled top-left block, plus a
    barcode of (official_id, drawer) in the bottom row so decoded order can be checked."""
    image = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 51, 51), fill=0)
    code = official_id * 32 + drawer
    for bit in range(BITS):
        if code >> bit & 1:
            image.putpixel((2 + 3 * bit, 104), 0)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def read_barcode(image: torch.Tensor) -> int:
    """Inverse of tiny_png's barcode, on a decoded 105x105 image (ink = 255)."""
    return sum(1 << bit for bit in range(BITS) if image[104, 2 + 3 * bit] == 255)


def tiny_members() -> tuple[dict[str, dict[str, bytes]], dict[str, int]]:
    """Member name -> PNG bytes for each part, and character name -> official ID."""
    members: dict[str, dict[str, bytes]] = {}
    ids: dict[str, int] = {}
    for part, alphabets in TINY.items():
        members[part] = {}
        for alphabet, count in alphabets.items():
            for k in range(1, count + 1):
                ids[f"{alphabet}/character{k:02d}"] = official_id = len(ids) + 1
                for drawer in range(1, 21):
                    name = (
                        f"images_{part}/{alphabet}/character{k:02d}/{official_id:04d}_{drawer:02d}"
                    )
                    members[part][f"{name}.png"] = tiny_png(official_id, drawer)
    return members, ids


MEMBERS, IDS = tiny_members()


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED):
    """Write members in a shuffled order, so the loader must sort them itself."""
    names = sorted(members)
    random.Random(0).shuffle(names)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name in names:
            archive.writestr(name, members[name])
    return path


def write_tiny(root: Path, layout: str = "omniglot/{name}.zip") -> Path:
    """Both tiny archives under `root` in `layout` ("extracted" = torchvision's folders)."""
    for part, members in MEMBERS.items():
        if layout == "extracted":
            for name, data in members.items():
                (root / "omniglot-py" / name).parent.mkdir(parents=True, exist_ok=True)
                (root / "omniglot-py" / name).write_bytes(data)
        else:
            write_zip(root / layout.format(name=f"images_{part}"), members)
    return root


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache folder and no data root from the environment."""
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METALEARN_DATA", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def tiny_root(tmp_path: Path, env: Path) -> Path:
    return write_tiny(tmp_path / "data")


def test_resolve_root_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METALEARN_DATA", raising=False)
    monkeypatch.delenv("METALEARN_CACHE", raising=False)
    home = Path.home()
    assert resolve_root(None) == home / ".cache" / "metalearn"
    assert cache_dir() == home / ".cache" / "metalearn" / "cache"
    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("METALEARN_CACHE", str(tmp_path / "c"))
    assert resolve_root(None) == resolve_root("") == tmp_path / "env"
    assert cache_dir() == tmp_path / "c"
    assert resolve_root(tmp_path / "given") == tmp_path / "given"  # the argument wins
    assert resolve_root("~/x") == home / "x"
    monkeypatch.chdir(tmp_path)
    assert resolve_root("a/../b") == tmp_path / "b"


def test_decode_shapes_ink_and_names(tiny_root: Path) -> None:
    chars = load_characters(tiny_root, download=False)
    assert chars.images.shape == (N_TINY, 20, 28, 28) and chars.images.dtype == torch.uint8
    assert chars.names == sorted(IDS)
    assert chars.background == [name.split("/")[0] in TINY["background"] for name in chars.names]
    # The PNGs' black top-left block becomes ink = 255; the white background becomes 0.
    assert (chars.images[:, :, :10, :10] == 255).all()
    assert (chars.images[:, :, 17:, 17:] == 0).all()


def test_characters_and_drawers_in_order_at_full_size(tiny_root: Path) -> None:
    chars = load_characters(tiny_root, image_size=105, download=False)
    assert chars.images.shape == (N_TINY, 20, 105, 105)
    assert set(chars.images.unique().tolist()) == {0, 255}  # no resize: the exact pixels
    for i, name in enumerate(chars.names):
        codes = [read_barcode(chars.images[i, d]) for d in range(20)]
        assert codes == [IDS[name] * 32 + drawer for drawer in range(1, 21)]


def test_cache_is_reused_and_keyed_by_archive_and_size(
    tiny_root: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_characters(tiny_root, download=False)
    cached = list(env.glob("omniglot-28-*.pt"))
    assert len(cached) == 1

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(omniglot, "decode_archives", no_decode)
    again = load_characters(tiny_root, download=False)
    assert torch.equal(again.images, first.images) and again.names == first.names
    assert list(env.glob("omniglot-28-*.pt")) == cached

    archive = tiny_root / "omniglot" / "images_evaluation.zip"
    mtime = archive.stat().st_mtime_ns + 10**9
    os.utime(archive, ns=(mtime, mtime))  # a replaced archive must be decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_characters(tiny_root, download=False)
    with pytest.raises(AssertionError, match="decoded again"):
        load_characters(tiny_root, image_size=14, download=False)


def test_unreadable_cache_is_rebuilt(tiny_root: Path, env: Path) -> None:
    first = load_characters(tiny_root, download=False)
    (path,) = env.glob("omniglot-28-*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = load_characters(tiny_root, download=False)
    assert torch.equal(again.images, first.images)


def test_rotation_is_counter_clockwise(tiny_root: Path) -> None:
    chars = load_characters(tiny_root, download=False)
    name = chars.names[4]
    classes = gather_classes(chars.images, chars.names, with_rotations([name]))
    assert classes.names == [f"{name}/rot{d:03d}" for d in (0, 90, 180, 270)]
    assert classes.images.shape == (4, 20, 1, 28, 28)
    upright = chars.images[4]
    for k in range(4):
        assert torch.equal(classes.images[k, :, 0], torch.rot90(upright, k, dims=(-2, -1)))
        # Same as PIL's Image.rotate, which turns counter-clockwise.
        pil = Image.fromarray(upright[0].numpy()).rotate(90 * k)
        assert np.array_equal(classes.images[k, 0, 0].numpy(), np.asarray(pil))
    # rot090: the top-left ink block is now bottom-left.
    assert (classes.images[1, :, 0, 18:, :10] == 255).all()
    assert (classes.images[1, :, 0, :10, :10] == 0).all()


def test_custom_class_lists(tiny_root: Path) -> None:
    chars = load_characters(tiny_root, download=False)
    lists = {"train": ["Alpha/character01/rot000", "Beta/character02/rot180"]}
    lists |= {"val": ["Gamma/character01/rot090"], "test": ["Delta/character04/rot270"]}
    splits = omniglot.vinyals_split(chars, lists=lists)
    assert {part: len(s) for part, s in splits.items()} == {"train": 2, "val": 1, "test": 1}
    assert splits["train"].names == lists["train"]
    with pytest.raises(DataError, match="Zeta/character01"):
        omniglot.vinyals_split(chars, lists={"train": ["Zeta/character01/rot000"]})


def base_characters(names: list[str]) -> set[str]:
    return {name.rsplit("/", 1)[0] for name in names}


def test_maml_split_is_seeded_and_disjoint(tiny_root: Path) -> None:
    chars = load_characters(tiny_root, download=False)
    splits = omniglot.maml_split(chars, seed=0, n_train=8, n_val=3)
    sizes = {part: s.images.shape[0] for part, s in splits.items()}
    assert sizes == {"train": 8 * 4, "val": 3 * 4, "test": 4 * 4}  # 4 rotations each
    bases = {part: base_characters(s.names) for part, s in splits.items()}
    assert not bases["train"] & bases["val"] and not bases["train"] & bases["test"]
    assert not bases["val"] & bases["test"]
    assert bases["train"] | bases["val"] | bases["test"] == set(chars.names)
    same = omniglot.maml_split(chars, seed=0, n_train=8, n_val=3)
    other = omniglot.maml_split(chars, seed=1, n_train=8, n_val=3)
    assert same["test"].names == splits["test"].names
    assert other["test"].names != splits["test"].names
    with pytest.raises(DataError, match="1200"):  # the tiny set is too small for 1100/100
        load_omniglot(tiny_root, "maml", download=False)


def test_background_split(tiny_root: Path) -> None:
    splits = load_omniglot(tiny_root, "background", seed=3, download=False)
    train, val, test = (base_characters(splits[p].names) for p in ("train", "val", "test"))
    assert all(name.endswith("/rot000") for s in splits.values() for name in s.names)
    assert {c.split("/")[0] for c in train} == set(TINY["background"]) and len(train) == 8
    assert not val & test and len(val | test) == 7
    assert {c.split("/")[0] for c in val | test} == set(TINY["evaluation"])
    # Halved within each alphabet: Delta 4 -> 2 + 2, Epsilon 3 -> 1 + 2.
    per_alphabet = sorted(c.split("/")[0] for c in val)
    assert per_alphabet == ["Delta", "Delta", "Epsilon"]


def test_unknown_split(tiny_root: Path) -> None:
    with pytest.raises(ConfigError, match="vinyals, maml, background"):
        load_omniglot(tiny_root, "ravi", download=False)


@pytest.mark.parametrize(
    "layout", ["{name}.zip", "omniglot-py/{name}.zip", "extracted"], ids=["bare", "tv-zip", "tv"]
)
def test_other_layouts(tmp_path: Path, env: Path, layout: str) -> None:
    reference = load_characters(write_tiny(tmp_path / "ref"), download=False)
    chars = load_characters(write_tiny(tmp_path / "data", layout), download=False)
    assert chars.names == reference.names and torch.equal(chars.images, reference.images)


def test_truncated_zip(tiny_root: Path) -> None:
    archive = tiny_root / "omniglot" / "images_background.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="delete it") as error:
        load_characters(tiny_root, download=False)
    assert str(archive) in str(error.value)


def test_bad_crc(tiny_root: Path) -> None:
    archive = tiny_root / "omniglot" / "images_evaluation.zip"
    members = MEMBERS["evaluation"]
    write_zip(archive, members, compression=zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    png = members["images_evaluation/Delta/character02/0010_07.png"]
    raw[raw.index(png) + len(png) // 2] ^= 0xFF  # stored uncompressed: flip one image byte
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="0010_07.png") as error:
        load_characters(tiny_root, download=False)
    assert str(archive) in str(error.value) and "delete it" in str(error.value)


@pytest.mark.parametrize("damage", ["undecodable", "missing"])
def test_broken_member(tiny_root: Path, damage: str) -> None:
    members = dict(MEMBERS["background"])
    name = "images_background/Beta/character02/0005_13.png"
    if damage == "undecodable":
        members[name] = members[name][:40]  # a truncated PNG
    else:
        del members[name]
    archive = write_zip(tiny_root / "omniglot" / "images_background.zip", members)
    match = "0005_13.png" if damage == "undecodable" else "Beta/character02"
    with pytest.raises(DataError, match=match) as error:
        load_characters(tiny_root, download=False)
    assert str(archive) in str(error.value)


def test_broken_png_in_extracted_folder(tmp_path: Path, env: Path) -> None:
    root = write_tiny(tmp_path / "data", "extracted")
    png = root / "omniglot-py" / "images_evaluation" / "Epsilon" / "character01" / "0013_02.png"
    png.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="delete it") as error:
        load_characters(root, download=False)
    assert str(png) in str(error.value)


def assert_names_expected_files(message: str, root: Path, parts: list[str]) -> None:
    for part in parts:
        assert f"images_{part}.zip" in message
        for path in omniglot.candidates(root, part):
            assert str(path) in message
    assert "data.root=" in message and "METALEARN_DATA" in message


def test_missing_data_without_download(tmp_path: Path, env: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(DataError) as error:
        load_omniglot(root, download=False)
    assert_names_expected_files(str(error.value), root, ["background", "evaluation"])
    # With one archive present only the other is reported missing.
    write_zip(root / "omniglot" / "images_background.zip", MEMBERS["background"])
    with pytest.raises(DataError) as error:
        load_omniglot(root, download=False)
    assert "images_background.zip" not in str(error.value)
    assert_names_expected_files(str(error.value), root, ["evaluation"])


def test_missing_data_download_fails(
    tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for part in omniglot.ARCHIVES:  # an unreachable source that fails at once, offline
        url = (tmp_path / "nowhere" / f"images_{part}.zip").as_uri()
        monkeypatch.setitem(omniglot.ARCHIVES, part, Archive(url, "0" * 32))
    root = tmp_path / "data"
    with pytest.raises(DataError, match="The download failed") as error:
        load_omniglot(root, download=True)
    assert_names_expected_files(str(error.value), root, ["background", "evaluation"])
    assert not list((root / "omniglot").glob("*"))  # no partial files left behind


def test_download_when_missing(tmp_path: Path, env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_tiny(tmp_path / "mirror")
    for part in omniglot.ARCHIVES:
        archive = source / "omniglot" / f"images_{part}.zip"
        md5 = hashlib.md5(archive.read_bytes()).hexdigest()
        monkeypatch.setitem(omniglot.ARCHIVES, part, Archive(archive.as_uri(), md5))
    root = tmp_path / "data"
    splits = load_omniglot(root, "background", download=True)
    downloaded = sorted(p.name for p in (root / "omniglot").iterdir())
    assert downloaded == ["images_background.zip", "images_evaluation.zip"]
    assert len(splits["train"]) == 8


def test_download_checks_checksums(tmp_path: Path) -> None:
    source = tmp_path / "file.bin"
    source.write_bytes(b"omniglot" * 1000)
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "file.bin"
    assert download(source.as_uri(), dest, sha256=sha256) == dest
    assert dest.read_bytes() == source.read_bytes()
    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(DataError, match="Checksum mismatch") as error:
        download(source.as_uri(), bad, md5="0" * 32)
    assert str(bad) in str(error.value) and source.as_uri() in str(error.value)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]  # no temp files left


# The real data set: decoded once per session (and cached across sessions in cache_dir()).
def real_data_root() -> Path:
    return Path(os.environ.get("METALEARN_DATA") or Path(__file__).parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def real_root() -> Path:
    root = resolve_root(real_data_root())
    if None in omniglot.find_archives(root).values():
        pytest.skip(f"the real Omniglot archives are not under {root} (set METALEARN_DATA)")
    load_characters(root, download=False)  # decode (or load the cache) once for the session
    return root


def test_real_vinyals(real_root: Path) -> None:
    splits = load_omniglot(real_root, "vinyals", download=False)
    sizes = {part: tuple(s.images.shape) for part, s in splits.items()}
    assert sizes == {
        p: (n, 20, 1, 28, 28) for p, n in [("train", 4112), ("val", 688), ("test", 1692)]
    }
    names = [set(s.names) for s in splits.values()]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    ink = splits["test"].images.float().mean() / 255
    assert 0.02 < ink < 0.2  # mostly background (0), sparse ink (255)


def test_real_maml_and_background(real_root: Path) -> None:
    maml = load_omniglot(real_root, "maml", download=False)
    assert [len(maml[p]) for p in ("train", "val", "test")] == [4400, 400, 1692]
    bases = [base_characters(maml[p].names) for p in ("train", "val", "test")]
    assert sum(map(len, bases)) == len(set.union(*bases)) == 1623
    background = load_omniglot(real_root, "background", download=False)
    assert len(background["train"]) == 964
    assert len(background["val"]) + len(background["test"]) == 659
    assert not set(background["val"].names) & set(background["test"].names)
