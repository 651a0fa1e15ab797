"""The one way raw dataset files are reached, local or in object storage: `data.root` may be a folder or any
fsspec URL (s3://bucket/prefix, with the usual AWS_* variables and AWS_ENDPOINT_URL for S3-compatible stores).

Readers and preprocessing call these with full paths or URLs. A file's state (what a re-run compares to reuse a
shard) is [size, mtime in ns] for local files, as before, and [size, ETag or modification time] for remote ones,
taken from one listing per folder rather than one request per file (COCO has 118k images).
"""

from __future__ import annotations

import functools
import os

import fsspec


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fs(path: str):
    return fsspec.core.url_to_fs(path)


def is_file(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, location = _fs(path)
    return fs.isfile(location)


def is_dir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, location = _fs(path)
    return fs.isdir(location)


def list_names(folder: str) -> list[str]:
    """The names of the entries of a folder."""
    if not is_remote(folder):
        return os.listdir(folder)
    fs, location = _fs(folder)
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(location, detail=False)]


def read_bytes(path: str) -> bytes:
    """The file's bytes; OSError (FileNotFoundError included) when it cannot be read."""
    if not is_remote(path):
        with open(path, "rb") as handle:
            return handle.read()
    fs, location = _fs(path)
    return fs.cat_file(location)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def file_state(path: str) -> list | None:
    """What identifies the file's content for a re-run; None when it is absent (bad input later)."""
    if not path:
        return None
    if not is_remote(path):
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return [stat.st_size, stat.st_mtime_ns]
    folder, _, name = path.rstrip("/").rpartition("/")
    return _listing(folder).get(name)


@functools.lru_cache(maxsize=4096)
def _listing(folder: str) -> dict[str, list]:
    fs, location = _fs(folder)
    try:
        entries = fs.ls(location, detail=True, refresh=True)  # past fsspec's own listing cache: this one is ours
    except OSError:
        return {}
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]:
            [entry.get("size"), str(entry.get("ETag") or entry.get("LastModified") or entry.get("mtime"))]
            for entry in entries if entry.get("type") == "file"}


def forget_listings() -> None:
    """Drop the cached folder listings (a new preprocessing run must see files changed since)."""
    _listing.cache_clear()


@functools.cache
def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a file can raise: OS errors, and the transport errors of the object-store clients, which
    are not OSErrors (aiohttp's ClientPayloadError for a response cut short, botocore's errors)."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import botocore.exceptions

        errors.append(botocore.exceptions.BotoCoreError)
    except ImportError:
        pass
    return tuple(errors)
