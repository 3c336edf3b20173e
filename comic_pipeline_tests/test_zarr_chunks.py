"""comic_pipeline.zarr_chunks: every encoding it reads gives what zarr-python gives; everything
else is left to zarr-python; broken chunks name themselves."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, TransposeCodec, ZstdCodec

from comic_pipeline.zarr_chunks import ChunkedArray, ChunkError


def metadata(path: str) -> dict:
    with open(os.path.join(path, "zarr.json")) as handle:
        return json.load(handle)


def direct(path: str) -> ChunkedArray:
    array = ChunkedArray.from_metadata(path, metadata(path))
    assert array is not None, f"zarr_chunks should read {metadata(path)}"
    return array


def write(path, data, *, chunks, compressors=None, endian="little", fill_value=0,
          chunk_key_encoding=None, written=None) -> np.ndarray:
    """An array written by zarr-python; only the chunks of region `written` (default: all)."""
    array = zarr.create_array(store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype,
                              compressors=compressors, serializer=BytesCodec(endian=endian),
                              fill_value=fill_value, chunk_key_encoding=chunk_key_encoding,
                              zarr_format=3)
    array[written if written is not None else ...] = data[written if written is not None else ...]
    return np.asarray(zarr.open_array(str(path), mode="r")[...])


COMPRESSORS = {
    "none": None,
    "zstd": ZstdCodec(level=3, checksum=True),
    "gzip": GzipCodec(level=5),
    "blosc": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4),
}


@pytest.mark.parametrize("compressor", list(COMPRESSORS))
@pytest.mark.parametrize("dtype,endian", [("float32", "little"), ("float32", "big"), ("float16", "little"),
                                          ("float64", "big"), ("int64", "little"), ("uint16", "big"),
                                          ("int8", "little"), ("bool", "little")])
def test_each_supported_encoding_reads_as_zarr_python_reads_it(tmp_path, compressor, dtype, endian):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(7, 5, 3)) * 40).astype(dtype) if dtype != "bool" else rng.random((7, 5, 3)) > 0.5
    # several chunks, with edge chunks on the first two axes
    expected = write(tmp_path / "a", data, chunks=(3, 2, 3), compressors=COMPRESSORS[compressor],
                     endian=endian, fill_value=False if dtype == "bool" else 0)
    got = direct(str(tmp_path / "a")).read()
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == expected.dtype and got.dtype.isnative and got.flags.writeable


@pytest.mark.parametrize("encoding", [{"name": "default", "separator": "/"}, {"name": "default", "separator": "."},
                                      {"name": "v2", "separator": "."}, {"name": "v2", "separator": "/"}])
def test_every_chunk_key_encoding(tmp_path, encoding):
    data = np.arange(4 * 6, dtype="float32").reshape(4, 6)
    expected = write(tmp_path / "a", data, chunks=(3, 4), compressors=ZstdCodec(), chunk_key_encoding=encoding)
    np.testing.assert_array_equal(direct(str(tmp_path / "a")).read(), expected)


@pytest.mark.parametrize("fill_value", [0.0, 7.5, float("nan"), float("inf"), -float("inf")])
def test_chunks_never_written_read_as_the_fill_value(tmp_path, fill_value):
    data = np.ones((6, 4), dtype="float32")
    expected = write(tmp_path / "a", data, chunks=(2, 4), fill_value=fill_value, written=slice(0, 2))
    assert sorted(os.listdir(tmp_path / "a" / "c")) == ["0"]  # one chunk of three on disk
    got = direct(str(tmp_path / "a")).read()
    np.testing.assert_array_equal(got, expected)  # NaN == NaN here
    assert (got[:2] == 1).all()


def test_a_zero_dimensional_array(tmp_path):
    data = np.array(3.25, dtype="float64")
    expected = write(tmp_path / "a", data, chunks=(), compressors=ZstdCodec())
    np.testing.assert_array_equal(direct(str(tmp_path / "a")).read(), expected)


@pytest.mark.parametrize("case", ["sharding", "transpose", "crc32c", "hex fill value", "string dtype",
                                  "storage transformer", "zarr v2", "group", "not a regular grid"])
def test_what_it_does_not_read_is_left_to_zarr_python(tmp_path, case):
    path = tmp_path / "a"
    data = np.arange(16, dtype="float32").reshape(4, 4)
    if case == "sharding":
        zarr.create_array(store=str(path), shape=(4, 4), dtype="float32", chunks=(2, 2), shards=(4, 4))
    elif case == "transpose":
        zarr.create_array(store=str(path), shape=(4, 4), dtype="float32", chunks=(4, 4),
                          filters=[TransposeCodec(order=(1, 0))], compressors=None)
    elif case == "zarr v2":
        zarr.create_array(store=str(path), shape=(4, 4), dtype="float32", chunks=(4, 4), zarr_format=2)
        assert ChunkedArray.from_metadata(str(path), {"zarr_format": 2, "shape": [4, 4]}) is None
        return
    elif case == "group":
        zarr.open_group(str(path), mode="w", zarr_format=3)
    else:
        write(path, data, chunks=(4, 4))
    document = metadata(str(path))
    if case == "crc32c":
        document["codecs"].append({"name": "crc32c"})
    elif case == "hex fill value":
        document["fill_value"] = "0x7fc00000"
    elif case == "string dtype":
        document["data_type"] = "string"
    elif case == "storage transformer":
        document["storage_transformers"] = [{"name": "some-transformer"}]
    elif case == "not a regular grid":
        document["chunk_grid"] = {"name": "rectilinear", "configuration": {}}
    if case == "sharding":
        assert any(codec["name"] == "sharding_indexed" for codec in document["codecs"])
    assert ChunkedArray.from_metadata(str(path), document) is None


def test_malformed_metadata_is_left_to_zarr_python(tmp_path):
    write(tmp_path / "a", np.zeros((2, 2), dtype="float32"), chunks=(2, 2))
    document = metadata(str(tmp_path / "a"))
    for broken in ({**document, "shape": "2x2"}, {**document, "shape": [2, -1]},
                   {key: value for key, value in document.items() if key != "codecs"},
                   {**document, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [0, 2]}}}):
        assert ChunkedArray.from_metadata(str(tmp_path / "a"), broken) is None


def test_a_chunk_that_does_not_decode_names_its_file(tmp_path):
    write(tmp_path / "a", np.ones((4, 4), dtype="float32"), chunks=(2, 4), compressors=ZstdCodec())
    chunk = tmp_path / "a" / "c" / "1" / "0"
    chunk.write_bytes(b"not a zstd frame")
    with pytest.raises(ChunkError, match=r"chunk file .*c.1.0 cannot be decoded as zstd"):
        direct(str(tmp_path / "a")).read()


def test_a_chunk_of_the_wrong_size_names_its_file(tmp_path):
    write(tmp_path / "a", np.ones((4, 4), dtype="float32"), chunks=(2, 4))
    chunk = tmp_path / "a" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4])  # a truncated uncompressed chunk
    with pytest.raises(ChunkError, match=r"chunk file .*c.0.0 holds 28 bytes .*expected 32"):
        direct(str(tmp_path / "a")).read()
