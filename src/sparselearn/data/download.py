"""Downloads that are verified by checksum and never leave a partial file behind."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from .._io import atomic_file


class DownloadError(RuntimeError):
    """A file could not be fetched, or did not match its checksum."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # the published checksums are MD5 (integrity)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str | None, *, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` (atomically), check its MD5, and return ``dest``.

    A file already at ``dest`` with the right checksum is kept as it is.
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest

    def check(tmp: Path) -> None:
        got = md5sum(tmp)
        if got != md5:
            raise DownloadError(f"{url}: MD5 {got} does not match the published {md5}")

    try:
        with (
            atomic_file(dest, verify=None if md5 is None else check) as out,
            urllib.request.urlopen(url, timeout=timeout) as response,
        ):
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DownloadError(f"could not download {url}: {err}") from err
    return dest


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack a tar archive into ``dest``, refusing members that would land outside it."""
    dest = Path(dest).resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not target.is_relative_to(dest) or member.issym() or member.islnk():
                raise DownloadError(f"{archive}: refusing to extract {member.name!r}")
        tar.extractall(dest, filter="data")
