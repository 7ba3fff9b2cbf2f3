"""Download one file with a progress bar, verify its checksum, and move it into place atomically."""

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from metalearn.errors import DataError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


def _manual_hint(url: str, dest: Path) -> str:
    return f"To get it manually, download {url} and save it as {dest}."


def _fetch(url: str, fileobj: BinaryIO, hashers: list["hashlib._Hash"]) -> None:
    """Stream `url` into `fileobj`, feeding every chunk to each hasher."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        length = response.headers.get("Content-Length") if response.headers else None
        total = int(length) if length and length.isdigit() else None
        name = url.rsplit("/", 1)[-1]
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar:
            while chunk := response.read(CHUNK_BYTES):
                fileobj.write(chunk)
                for hasher in hashers:
                    hasher.update(chunk)
                bar.update(len(chunk))


def _verify(url: str, dest: Path, expected: dict[str, str], hashers: list["hashlib._Hash"]) -> None:
    """Raise DataError if any computed digest differs from the expected one."""
    for (algo, want), hasher in zip(expected.items(), hashers, strict=True):
        got = hasher.hexdigest()
        if got.lower() != want.lower():
            raise DataError(
                f"Checksum mismatch for {dest.name} downloaded from {url}: expected {algo} "
                f"{want}, got {got}. The download was discarded (nothing was written to {dest}); "
                f"the file may have changed upstream or the transfer was corrupted. "
                + _manual_hint(url, dest)
            )


def download(url: str, dest: Path, *, md5: str | None = None, sha256: str | None = None) -> Path:
    """Download `url` to `dest`, verifying `md5` and/or `sha256` when given; return `dest`.

    The bytes go to a temporary file next to `dest`, which is renamed onto `dest` only after the
    checksums match, so an interrupted or corrupt download never leaves a half-written `dest`.
    Network failures and checksum mismatches raise DataError saying how to get the file manually.
    """
    dest = Path(dest)
    expected = {algo: digest for algo, digest in (("md5", md5), ("sha256", sha256)) if digest}
    hashers = [hashlib.new(algo) for algo in expected]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as err:
        raise DataError(
            f"Cannot write {dest.name} to {dest.parent}: {err}. Choose a writable data root. "
            + _manual_hint(url, dest)
        ) from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fileobj:
            _fetch(url, fileobj, hashers)
        _verify(url, dest, expected, hashers)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as err:
        # URLError covers DNS/connection/HTTP errors; OSError timeouts and disk errors;
        # ValueError a malformed URL.
        raise DataError(
            f"Could not download {dest.name} from {url} to {dest}: {err}. "
            + _manual_hint(url, dest)
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest
