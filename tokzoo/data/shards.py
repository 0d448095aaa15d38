"""Where shard bytes come from: URL expansion, the opener per scheme, the build-time check, and the end-of-archive
check of a shard's stream (tokzoo/data/webdataset.py reads the shards through these)."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

from braceexpand import braceexpand
from webdataset.gopen import gopen

from tokzoo.data.common import log
from tokzoo.errors import DataError

LIBRARY_SCHEMES = ("", "file", "pipe")  # opened by webdataset.gopen itself


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern ("shards/{00000..00009}.tar") or a list of URLs / patterns; local paths
    get ~ expanded."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = [u for pattern in patterns for u in braceexpand(str(pattern))]
    return [str(Path(u).expanduser()) if urlparse(u).scheme == "" else u for u in out]


def scheme(url: str) -> str:
    found = urlparse(url).scheme
    return "" if len(found) == 1 else found  # a Windows drive letter is a local path


def open_url(url: str, storage_options: dict | None = None) -> IO[bytes]:
    """A readable binary stream of one shard (see the module docstring for which opener takes which URL)."""
    if scheme(url) in LIBRARY_SCHEMES:
        return gopen(url, "rb")
    import fsspec

    options = dict(storage_options or {})
    if scheme(url) in ("http", "https"):
        options.setdefault("block_size", 0)  # one streamed GET: no range requests, which plain servers lack
    return fsspec.open(url, "rb", **options).open()


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bz2, xz, zstd


class EndOfArchiveCheck:
    """A shard's stream that raises at its end when an uncompressed tar lacks the end-of-archive zero blocks.

    Needed because tarfile ends quietly when a shard is cut inside or right before a member header (it raises
    only for a cut inside member data), so a truncated shard would pass for a shorter one. Compressed shards raise
    on truncation by themselves. A complete tar is never read to its end (tarfile stops at the first zero block),
    so the check costs nothing there."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.size, self.tail, self.compressed = stream, 0, b"", None

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            if self.compressed is None:
                self.compressed = data.startswith(_COMPRESSED_MAGIC)
            self.size += len(data)
            self.tail = (self.tail + data)[-1024:]
        elif n and not self.compressed and (self.size % 512 or self.tail != bytes(1024)):
            raise tarfile.ReadError(f"truncated: the stream ends after {self.size} bytes without end-of-archive blocks")
        return data

    def close(self) -> None:
        self.stream.close()


def check_shards(shards: list[str], storage_options: dict | None) -> None:
    """Fail before training on what can be checked cheaply: every local shard exists; the first remote one opens
    (a wrong bucket, missing credentials, an unreachable host or a missing fsspec backend). pipe: is not run."""
    local = [s for s in shards if scheme(s) in ("", "file")]
    missing = [s for s in local if not Path(urlparse(s).path if scheme(s) == "file" else s).is_file()]
    if missing:
        raise DataError(
            f"webdataset shard(s) not found: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
            + "; check data.kwargs.urls / val_urls"
        )  # fmt: skip
    remote = next((s for s in shards if scheme(s) not in LIBRARY_SCHEMES), None)
    if remote is None:
        return
    try:
        with open_url(remote, storage_options) as f:
            f.read(1)
    except Exception as exn:  # fsspec backends raise their own types (ClientError, aiohttp errors, ImportError...)
        raise DataError(
            f"webdataset shard {remote} cannot be opened ({type(exn).__name__}: {exn}); check the URL, the network "
            f"and the credentials, and that fsspec's backend for {scheme(remote)}:// is installed (s3fs, gcsfs, ...); "
            "options for it go in data.kwargs.storage_options"
        ) from None


def warn_shard(url: str, exn: BaseException) -> None:
    what = exn.args[0] if exn.args else ""
    log.warning("shard %s is corrupt, truncated or unreachable (%s: %s); going on with the next shard",
                url, type(exn).__name__, what)  # fmt: skip


def warn_and_go_on(exn: Exception) -> bool:
    """The library's error handler (it appends the URL to exn.args): a broken shard costs that shard's rest, never
    the run."""
    warn_shard(next((a for a in reversed(exn.args) if isinstance(a, str) and a), "?"), exn)
    return True
