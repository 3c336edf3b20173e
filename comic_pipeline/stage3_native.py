"""The arrays of one comic group of the native Stage 3 layout (store.py describes the layout).

Two readers of the same group, chosen per comic when it is opened (`open_comic_group`):

- on a local disk, when every array's encoding is one zarr_chunks reads (what Stage 3 and our
  writers produce), `DirectComicArrays` reads the JSON metadata and the chunk files itself:
  about six times less Python per comic than zarr-python, which is what the embedding backfill's
  reader threads spend their time on;
- otherwise (object stores, or an encoding zarr_chunks leaves alone) `ZarrComicArrays` opens the
  group with zarr-python, which also reports what is wrong with a malformed group.

Both hand out arrays exactly as stored; store.ComicReader checks them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
from typing import Iterable

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from comic_pipeline.comic_groups import read_json
from comic_pipeline.fileio import local_path
from comic_pipeline.stage3_checks import comic_error
from comic_pipeline.zarr_chunks import ChunkedArray, ChunkError


# What zarr-python raises for a chunk that does not decode to its array (numcodecs' decoders raise
# RuntimeError, a wrong size ValueError): the comic's problem. Anything else, OSError included (an
# object store that did not answer), is not the comic's and propagates as it is.
CORRUPT_CHUNK_ERRORS = (RuntimeError, ValueError, zarr.errors.BaseZarrError)


class ZarrComicArrays:
    """A comic group read through zarr-python. A chunk that does not decode is the comic's
    problem (Stage3StoreError naming it and the array), as with the direct reader."""

    def __init__(self, group: zarr.Group, comic: str):
        self._arrays = dict(group.arrays())  # array handles: metadata only, read once
        self._comic = comic  # its name, for errors
        self.specs = {name: (tuple(array.shape), np.dtype(array.dtype))
                      for name, array in self._arrays.items()}
        self._fetched: dict[str, np.ndarray | BaseException] = {}

    def fetch(self, names: Iterable[str]) -> None:
        """Read the arrays `names` together: one trip to zarr's event loop, their chunks fetched
        and decoded concurrently (instead of one blocking trip per array: most of the cost of a
        small comic). Each is handed out, or its read error raised, by the next read(name);
        drop_fetched() forgets what was not asked for."""
        names = [name for name in dict.fromkeys(names) if name in self._arrays and name not in self._fetched]
        if len(names) < 2:
            return  # nothing to share a trip with

        async def read_all():
            return await asyncio.gather(*(self._arrays[name].async_array.getitem(...) for name in names),
                                        return_exceptions=True)

        for name, value in zip(names, zarr_sync(read_all())):
            # errors are kept for read(name), so a comic's first problem is still the first one met
            if isinstance(value, BaseException) and not isinstance(value, Exception):
                raise value  # KeyboardInterrupt, cancellation: not a problem of this comic
            self._fetched[name] = (self._comic_problem(name, value) if isinstance(value, Exception)
                                   else np.asarray(value))

    def drop_fetched(self) -> None:
        self._fetched.clear()

    def read(self, name: str) -> np.ndarray:
        fetched = self._fetched.pop(name, None)
        if isinstance(fetched, Exception):
            raise fetched
        if fetched is not None:
            return fetched
        try:
            return np.asarray(self._arrays[name][...])
        except Exception as exc:  # noqa: BLE001 - _comic_problem sorts what is the comic's
            raise self._comic_problem(name, exc) from None

    def _comic_problem(self, name: str, error: Exception) -> Exception:
        """The comic's Stage3StoreError for a chunk that does not decode; other errors as they are."""
        if not isinstance(error, CORRUPT_CHUNK_ERRORS):
            return error
        return comic_error(self._comic, name, f"a chunk cannot be decoded ({type(error).__name__}: {error})")

    def check_panel_mask(self, comic: str, page_ids, mask: np.ndarray) -> None:
        pass  # the prefix and emptiness checks say everything for the native layout


class DirectComicArrays:
    """A comic group on a local disk whose every array zarr_chunks reads: each read(name) reads
    that array's chunk files (nothing is kept between reads). A chunk that does not decode is
    the comic's problem (Stage3StoreError naming it), so validation quarantines that comic."""

    def __init__(self, arrays: dict[str, ChunkedArray], comic: str):
        self._arrays = arrays
        self._comic = comic  # its name, for errors
        self.specs = {name: (array.shape, array.dtype) for name, array in arrays.items()}

    def read(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name].read()
        except ChunkError as exc:
            raise comic_error(self._comic, name, str(exc)) from None

    def check_panel_mask(self, comic: str, page_ids, mask: np.ndarray) -> None:
        pass


def open_comic_group(root: zarr.Group, url: str, group_path: str, name: str
                     ) -> tuple[dict, ZarrComicArrays | DirectComicArrays]:
    """(group attrs, arrays) of the comic group at `group_path` (relative to the store `url`,
    whose zarr root group is `root`); the comic's error when the group cannot be opened."""
    base = local_path(url)
    if base is not None:
        direct = _direct_group(os.path.join(base, *group_path.split("/")), name)
        if direct is not None:
            return direct
    try:
        group = root[group_path]
    except (KeyError, FileNotFoundError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise comic_error(name, None, f"group {group_path} cannot be opened "
                                      f"({type(exc).__name__}: {exc})") from None
    if not isinstance(group, zarr.Group):
        raise comic_error(name, None, "is an array, expected a comic group")
    return dict(group.attrs), ZarrComicArrays(group, name)


def _direct_group(path: str, name: str) -> tuple[dict, DirectComicArrays] | None:
    """The group at `path` read without zarr-python, or None when anything about it is unusual
    (no group document, a stray file, an array zarr_chunks does not read): zarr-python then opens
    it, and says what is wrong if something is."""
    document = _json_document(os.path.join(path, "zarr.json"))
    if document is None or document.get("zarr_format") != 3 or document.get("node_type") != "group":
        return None
    attrs = document.get("attributes", {})
    if not isinstance(attrs, dict):
        return None
    arrays: dict[str, ChunkedArray] = {}
    try:
        entries = sorted(os.scandir(path), key=lambda entry: entry.name)
    except OSError:
        return None
    for entry in entries:
        if entry.name == "zarr.json":
            continue
        if not entry.is_dir():
            return None
        try:
            with open(os.path.join(entry.path, "zarr.json"), "rb") as handle:
                template = _array_template(handle.read())
        except OSError:
            return None
        if template is None:
            return None
        arrays[entry.name] = dataclasses.replace(template, path=entry.path)
    return attrs, DirectComicArrays(arrays, name)


@functools.lru_cache(maxsize=1024)
def _array_template(document: bytes) -> ChunkedArray | None:
    """The array an array's zarr.json describes (its path left empty), parsed once per distinct
    document: a store's comics share a handful of them (the same arrays, a few page counts), and
    parsing is most of the Python cost of opening a comic. None: zarr-python's case."""
    try:
        metadata = json.loads(document)
    except ValueError:
        return None
    return ChunkedArray.from_metadata("", metadata) if isinstance(metadata, dict) else None


def _json_document(path: str) -> dict | None:
    try:
        document = read_json(path)
    except (OSError, ValueError):  # unreadable, not JSON: zarr-python's case (missing: None)
        return None
    return document if isinstance(document, dict) else None
