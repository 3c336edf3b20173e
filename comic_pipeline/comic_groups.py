"""The comic-group layer both Zarr stores stand on: a root group whose attrs say its format, a
`comics` group with one child per comic, and the few primitives that make that safe and fast.

- locations: what zarr should be given for a path or fsspec URL; JSON documents read whole;
- listing: the children of a folder, temporary (dot-prefixed) entries skipped;
- checks: root attrs (format, version), prefix masks;
- chunking: chunks of whole pages, a few MiB each;
- raw Zarr v3 encoding: a group / an uncompressed one-chunk array as {relative path: bytes}, so a
  writer can put a whole comic with one batch of plain object writes instead of zarr's per-node
  machinery (readers still open it with zarr). Single objects are replaced whole with
  fileio.atomic_write_bytes (the commit primitive of the output store).

Which comic a group is, is decided by comic_pipeline.comic_names: the one naming rule.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from fsspec.core import url_to_fs

from comic_pipeline import fileio
from comic_pipeline.fileio import local_path

COMICS = "comics"  # the group holding one child per comic, in both stores
CHUNK_TARGET_BYTES = 4 << 20  # a few MiB per chunk: few files, reads not much bigger than asked


# --- locations and documents -------------------------------------------------------------------
def zarr_location(url: str) -> str:
    """What zarr.open_group should get: a plain path for local files (zarr's LocalStore makes
    parent folders; its fsspec store on file:// does not), the URL itself otherwise."""
    if fileio.is_local(url):
        _, path = url_to_fs(url)
        return path
    return url


def read_json(url: str) -> dict | None:
    """Parsed JSON object at `url`, or None when there is no such file."""
    path = local_path(url)
    if path is not None:
        try:
            with open(path, "rb") as handle:
                return json.loads(handle.read())
        except (FileNotFoundError, NotADirectoryError):
            return None
    fs, path = url_to_fs(url)
    try:
        # cat_file: one whole GET, never sized from a cached listing (a pointer changes size)
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def list_children(url: str) -> list[str]:
    """Sorted names of the folders directly under `url` (empty when `url` does not exist).
    Dot-prefixed names are writers' temporary entries and are skipped."""
    fs, path = url_to_fs(url)
    try:
        entries = fs.ls(path, detail=True, refresh=True)  # never a cached listing
    except FileNotFoundError:
        return []
    names = (entry["name"].rstrip("/").rpartition("/")[2] for entry in entries
             if entry["type"] == "directory")
    return sorted(name for name in names if not name.startswith("."))


# --- checks ------------------------------------------------------------------------------------
def root_format_problem(attrs: Mapping, fmt: str, version: int) -> str | None:
    """None when root `attrs` say format `fmt` at `version`, else what is wrong."""
    if attrs.get("format") != fmt:
        return f"root attrs format={attrs.get('format')!r}, expected {fmt!r}"
    if attrs.get("version") != version:
        return f"unsupported version {attrs.get('version')!r} (this code knows version {version})"
    return None


def prefix_gap(mask: np.ndarray) -> tuple[int, ...] | None:
    """Index (all axes but the last) of the first row whose valid entries are not a prefix along
    the last axis (a True after a False), or None when every row is a prefix."""
    gap = mask[..., 1:] & ~mask[..., :-1]
    if not gap.any():
        return None
    return tuple(int(i) for i in np.argwhere(gap)[0][:-1])


def page_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of whole pages (first axis), CHUNK_TARGET_BYTES each at most (one page at least)."""
    page_bytes = itemsize
    for size in shape[1:]:
        page_bytes *= int(size)
    pages = min(max(1, CHUNK_TARGET_BYTES // max(1, page_bytes)), max(1, int(shape[0])))
    return (pages, *(int(size) for size in shape[1:]))


# --- raw Zarr v3 -------------------------------------------------------------------------------
def group_document(attributes: Mapping) -> bytes:
    """The zarr.json of a Zarr v3 group with these attributes."""
    return json.dumps({"attributes": dict(attributes), "zarr_format": 3, "node_type": "group"},
                      separators=(",", ":")).encode()


def array_files(name: str, data: np.ndarray) -> dict[str, bytes]:
    """{path relative to the group: bytes} of a Zarr v3 array holding `data` in chunks of whole
    pages, uncompressed (embeddings barely compress; the bytes codec alone is storage speed)."""
    data = np.ascontiguousarray(data)
    if data.dtype == np.bool_:
        codecs, fill = [{"name": "bytes"}], False
    else:
        data = data.astype(data.dtype.newbyteorder("<"), copy=False)
        codecs, fill = [{"name": "bytes", "configuration": {"endian": "little"}}], 0.0
    chunks = page_chunks(data.shape, data.itemsize)
    metadata = {
        "shape": list(data.shape), "data_type": data.dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        # "v2" keys ("0.0.0") keep every chunk beside the array's zarr.json: no nested folders
        "chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}},
        "fill_value": fill, "codecs": codecs, "attributes": {}, "zarr_format": 3,
        "node_type": "array", "storage_transformers": [],
    }
    files = {f"{name}/zarr.json": json.dumps(metadata).encode()}
    rest = ".".join("0" for _ in data.shape[1:])
    for index, start in enumerate(range(0, data.shape[0], chunks[0])):
        block = data[start:start + chunks[0]]
        if block.shape[0] < chunks[0]:  # zarr stores edge chunks at full chunk size
            padded = np.zeros(chunks, dtype=data.dtype)
            padded[: block.shape[0]] = block
            block = padded
        key = f"{name}/{index}" + (f".{rest}" if rest else "")
        files[key] = memoryview(np.ascontiguousarray(block)).cast("B")  # no copy of whole chunks
    return files


def put_files(url: str, files: Mapping[str, bytes | memoryview], *, durable: bool = False) -> None:
    """Write `files` ({path relative to url: bytes}) under `url`; remote writes go out together.

    durable (local disks): every file and folder is on the disk (fsync) when this returns, so a
    commit that names them afterwards cannot, after a power loss, name files the disk never got.
    An object store's PUT is durable once acknowledged."""
    base = local_path(url)
    if base is not None:
        targets = {relative: os.path.join(base, relative) for relative in files}
        folders = sorted({os.path.dirname(target) for target in targets.values()}, key=len)  # parents first
        created: list[str] = []
        for folder in folders:
            try:
                os.mkdir(folder)
                created.append(folder)
            except FileExistsError:
                pass
            except FileNotFoundError:  # its parents are missing too
                created.extend(reversed(fileio.missing_folders(folder)))
                os.makedirs(folder, exist_ok=True)
        for relative, target in targets.items():
            fileio.write_local_file(target, files[relative], durable=durable)
        if durable:
            # folders that gained an entry: each holding a file, each new one's parent
            changed = set(folders) | set(created) | {os.path.dirname(folder) for folder in created}
            for folder in sorted(changed, key=len, reverse=True):  # deepest first
                fileio.fsync_folder(folder)
        return
    fs, path = url_to_fs(url)
    fs.pipe({f"{path.rstrip('/')}/{relative}": bytes(data) for relative, data in files.items()})  # concurrent on s3fs
