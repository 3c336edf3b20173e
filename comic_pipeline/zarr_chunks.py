"""Zarr v3 arrays of a local disk read straight from their chunk files, without zarr-python.

Why: a Stage 3 comic is a handful of small arrays of one chunk each, and zarr-python spends about
25 ms of Python on such a comic (metadata objects, its event loop, its codec pipeline) against
about 4 ms to parse the same JSON and decode the same chunk files here, most of it in the
decompressor, which releases the GIL (so reader threads overlap). On a GPU that difference is
the whole gap between an idle and a busy device during an embedding backfill.

Only what this module understands completely is read here (`ChunkedArray.from_metadata` returns
None for anything else, and the caller reads that array with zarr-python instead):

- Zarr v3 array metadata, no storage transformers, a regular chunk grid;
- chunk keys of the "default" ("c/0/0") or "v2" ("0.0") encoding, either separator;
- data types bool, int8..int64, uint8..uint64, float16/32/64;
- codecs: "bytes" (either endian), then at most one of "zstd", "gzip", "blosc";
- a fill value that is a number, a bool, or "NaN" / "Infinity" / "-Infinity".

A missing chunk reads as the fill value (Zarr's rule). Edge chunks are stored at full chunk size
and cropped. A chunk that cannot be decoded, or decodes to the wrong size, raises ChunkError
naming the array and the chunk file. `comic_pipeline_tests/test_zarr_chunks.py` compares every
supported encoding with zarr-python's reading of the same array.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import numcodecs
import numpy as np

DATA_TYPES = {
    "bool": "?", "int8": "i1", "int16": "i2", "int32": "i4", "int64": "i8",
    "uint8": "u1", "uint16": "u2", "uint32": "u4", "uint64": "u8",
    "float16": "f2", "float32": "f4", "float64": "f8",
}
NAMED_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Decoders of the compression codecs read here; each frame / header says how it was written
# (level, shuffle, checksum), so one decoder per codec reads them all.
DECOMPRESSORS: dict[str, Callable[[], numcodecs.abc.Codec]] = {
    "zstd": numcodecs.Zstd,
    "gzip": numcodecs.GZip,
    "blosc": numcodecs.Blosc,
}


class ChunkError(ValueError):
    """A chunk file that does not hold what its array's metadata says."""


@dataclass(frozen=True)
class ChunkedArray:
    """One Zarr v3 array on a local disk whose encoding this module reads (see the module doc)."""

    path: str  # the array's folder
    shape: tuple[int, ...]
    dtype: np.dtype  # native byte order, as read back
    stored_dtype: np.dtype  # the byte order of the chunk bytes
    chunk_shape: tuple[int, ...]
    chunk_key: Callable[[tuple[int, ...]], str]
    fill_value: object
    compressor: str | None

    @classmethod
    def from_metadata(cls, path: str, metadata: Mapping) -> "ChunkedArray | None":
        """The array at `path` described by its parsed zarr.json, or None when anything in it is
        outside what this module reads (the caller then uses zarr-python)."""
        try:
            return cls._parse(path, metadata)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None  # malformed for us: zarr-python reads it, or says what is wrong

    @classmethod
    def _parse(cls, path: str, metadata: Mapping) -> "ChunkedArray | None":
        if metadata.get("zarr_format") != 3 or metadata.get("node_type") != "array":
            return None
        if metadata.get("storage_transformers") or metadata.get("data_type") not in DATA_TYPES:
            return None
        shape = tuple(metadata["shape"])
        grid = metadata["chunk_grid"]
        if grid.get("name") != "regular":
            return None
        chunk_shape = tuple(grid["configuration"]["chunk_shape"])
        if len(chunk_shape) != len(shape) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape + chunk_shape):
            return None
        if any(c < 1 for c in chunk_shape):
            return None
        chunk_key = _chunk_key_encoding(metadata["chunk_key_encoding"])
        if chunk_key is None:
            return None
        codecs = list(metadata["codecs"])
        if not codecs or codecs[0].get("name") != "bytes" or len(codecs) > 2:
            return None
        dtype = np.dtype(DATA_TYPES[metadata["data_type"]])
        endian = (codecs[0].get("configuration") or {}).get("endian", "little")
        if endian not in ("little", "big"):
            return None
        stored_dtype = dtype.newbyteorder("<" if endian == "little" else ">") if dtype.itemsize > 1 else dtype
        compressor = codecs[1].get("name") if len(codecs) == 2 else None
        if compressor is not None and compressor not in DECOMPRESSORS:
            return None
        fill_value = _fill_value(metadata["fill_value"], dtype)
        if fill_value is None:
            return None
        return cls(path, shape, dtype, stored_dtype, chunk_shape, chunk_key, fill_value, compressor)

    @property
    def grid(self) -> tuple[int, ...]:
        """Chunks along each axis."""
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunk_shape))

    def read(self) -> np.ndarray:
        """The whole array (a fresh, writable array in native byte order)."""
        if all(n == c for n, c in zip(self.shape, self.chunk_shape)):  # one chunk is the array
            return self._chunk(tuple(0 for _ in self.shape))
        out = np.empty(self.shape, dtype=self.dtype)
        for index in np.ndindex(*self.grid):
            starts = [i * c for i, c in zip(index, self.chunk_shape)]
            region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, self.chunk_shape, self.shape))
            chunk = self._chunk(index)
            out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]  # edge chunks cropped
        return out

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray:
        key = self.chunk_key(index)
        data = read_chunk_file(os.path.join(self.path, key))
        if data is None:
            return np.full(self.chunk_shape, self.fill_value, dtype=self.dtype)
        expected = self.stored_dtype.itemsize * math.prod(self.chunk_shape)
        if self.compressor is not None:
            try:
                decoded = DECOMPRESSORS[self.compressor]().decode(data)
            except Exception as exc:  # the decoders raise RuntimeError, ValueError, ... on bad bytes
                raise ChunkError(f"chunk file {os.path.join(self.path, key)} cannot be decoded as "
                                 f"{self.compressor} ({type(exc).__name__}: {exc})") from None
            data = memoryview(decoded).cast("B")
        if len(data) != expected:
            raise ChunkError(f"chunk file {os.path.join(self.path, key)} holds {len(data)} bytes "
                             f"(decoded), expected {expected}: {self.chunk_shape} of {self.stored_dtype}")
        chunk = np.frombuffer(data, dtype=self.stored_dtype).reshape(self.chunk_shape)
        # a copy in native order: writable, and owning its memory rather than the file's bytes
        return chunk.astype(self.dtype, copy=True)


def read_chunk_file(path: str) -> bytes | None:
    """The bytes of one chunk file, None when there is none (a chunk never written)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _chunk_key_encoding(encoding: Mapping) -> Callable[[tuple[int, ...]], str] | None:
    name = encoding.get("name")
    separator = (encoding.get("configuration") or {}).get("separator", "/" if name == "default" else ".")
    if separator not in ("/", "."):
        return None
    path_separator = separator.replace("/", os.sep)
    if name == "default":
        return lambda index: path_separator.join(("c",) + tuple(str(i) for i in index))
    if name == "v2":
        return lambda index: path_separator.join(str(i) for i in index) if index else "0"
    return None


def _fill_value(value, dtype: np.dtype):
    """The fill value as a numpy scalar of `dtype`, or None when it is written in a form this
    module does not read (hex floats, complex, ...)."""
    if dtype == np.bool_:
        return np.bool_(value) if isinstance(value, bool) else None
    if dtype.kind == "f":
        if isinstance(value, str):
            return dtype.type(NAMED_FLOATS[value]) if value in NAMED_FLOATS else None
        return dtype.type(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(value, int) and not isinstance(value, bool):
        info = np.iinfo(dtype)
        return dtype.type(value) if info.min <= value <= info.max else None
    return None
