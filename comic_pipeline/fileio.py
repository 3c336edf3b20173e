"""Atomic writes and reads for paths and fsspec URLs.

Writers put their output in a temporary sibling and move it into place only once complete, so a
crash never leaves a half-written file or folder that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import IO, Iterator

import fsspec
from fsspec.core import url_to_fs


def is_local(url: str) -> bool:
    fs, _ = url_to_fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def temporary_sibling(url: str) -> str:
    """A name beside `url` that readers of `url`'s parent skip (leading dot)."""
    parent, _, name = url.rstrip("/").rpartition("/")
    return f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:12]}" if parent else f".tmp-{name}-{uuid.uuid4().hex[:12]}"


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def open_binary(url: str) -> IO[bytes]:
    return fsspec.open(url, "rb").open()


def atomic_write_bytes(url: str, data: bytes) -> None:
    fs, path = url_to_fs(url)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    _, tmp_path = url_to_fs(temporary_sibling(url))
    with fs.open(tmp_path, "wb") as handle:
        handle.write(data)
    if is_local(url):
        os.replace(tmp_path, path)  # atomic on one filesystem
    else:
        fs.mv(tmp_path, path)


def replace_directory(tmp_url: str, final_url: str) -> None:
    """Move a completely written folder `tmp_url` to `final_url`, replacing what was there.

    Locally the old folder is first renamed aside, then the new one renamed in (two renames,
    each atomic), then the old one deleted: readers see the old complete group or the new one.
    """
    fs, final_path = url_to_fs(final_url)
    _, tmp_path = url_to_fs(tmp_url)
    if is_local(final_url):
        old_path = None
        if os.path.exists(final_path):
            old_path = temporary_sibling(final_path) + "-old"
            os.rename(final_path, old_path)
        os.rename(tmp_path, final_path)
        if old_path:
            fs.rm(old_path, recursive=True)
    else:
        if fs.exists(final_path):
            fs.rm(final_path, recursive=True)
        fs.mv(tmp_path, final_path, recursive=True)


@contextlib.contextmanager
def atomic_directory(final_url: str) -> Iterator[str]:
    """Yield a temporary folder URL to write into; on success it replaces `final_url`."""
    tmp_url = temporary_sibling(final_url)
    fs, tmp_path = url_to_fs(tmp_url)
    fs.makedirs(tmp_path, exist_ok=True)
    try:
        yield tmp_url
    except BaseException:
        fs.rm(tmp_path, recursive=True)
        raise
    replace_directory(tmp_url, final_url)
