"""Reading data set archives member by member, never extracting: member paths and links that
would point outside the data set are refused, and a .tar.gz's gzip checksum is verified."""

import gzip
import posixpath
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from metalearn.errors import DataError

CHUNK_BYTES = 1 << 20


def _outside(name: str) -> bool:
    """Absolute paths, `..` and backslashes (Windows separators) could reach outside a folder."""
    path = PurePosixPath(name)
    return path.is_absolute() or ".." in path.parts or "\\" in name


def inside(name: str, where: str, fix: str) -> PurePosixPath:
    """`name` as a path inside the data set, or a DataError naming `where` (the archive or list
    it came from), the path and `fix`: a crafted archive or list could reach other files."""
    if _outside(name):
        raise DataError(
            f"{where}: refusing the path {name!r}, which points outside the data set; {fix}"
        )
    return PurePosixPath(name)


def tar_member(member: tarfile.TarInfo, where: str, fix: str) -> PurePosixPath:
    """The member's path inside the data set (see `inside`); a link must point inside it too
    (a symlink's target is relative to the link's folder, a hard link's to the archive's top)."""
    path = inside(member.name, where, fix)
    if member.issym() or member.islnk():
        folder = path.parent.as_posix() if member.issym() else ""
        target = posixpath.normpath(posixpath.join(folder, member.linkname))
        if _outside(target):
            raise DataError(
                f"{where}: refusing the link {member.name!r} -> {member.linkname!r}, which points "
                f"outside the data set; {fix}"
            )
    return path


@contextmanager
def open_tgz(path: Path) -> Iterator[tarfile.TarFile]:
    """The .tar.gz at `path` as a streaming TarFile whose gzip CRC-32 and length are checked once
    its members have been read: tarfile's own "r|gz" never checks them, so a flipped byte or a
    cut-off end would go unnoticed. Raises gzip.BadGzipFile (an OSError) or EOFError."""
    with gzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        yield tar
        while stream.read(CHUNK_BYTES):  # the rest after the tar's end; EOF checks the trailer
            pass
