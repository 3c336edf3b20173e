"""Figure (d) of bench_embeddings.py: output-store candidates writing the same contextualized
arrays, one comic after another: this store's commit layout (raw Zarr v3 version group fsynced,
then the pointer), the same without fsync, zarr-python groups renamed into place (the previous
store), Icechunk (a commit per comic, and per 64 comics) when installed, beside plain numpy files
(not fsynced)."""

from __future__ import annotations

import os
import time

import numpy as np


def _outputs(stage3_url: str, limit: int, encode) -> list[tuple[str, dict[str, np.ndarray], list[str]]]:
    """(key, contextualized arrays, page ids) per comic, made by `encode` (setup, not timed)."""
    from comic_pipeline.store import Stage3Store

    store = Stage3Store.open(stage3_url)
    outputs = []
    for key in store.comic_ids()[:limit]:
        comic = store.comic(key)
        features = comic.features(["fused"])
        panels, strips = encode(features)
        outputs.append((key, {"panel_embeddings": panels, "strip_embeddings": strips,
                              "panel_mask": features.panel_mask}, comic.page_ids))
    return outputs


def _write_commit_layout(url: str, outputs, durable: bool = True) -> None:
    from comic_pipeline import embedding_store

    for key, arrays, page_ids in outputs:
        embedding_store.write_comic(url, key, panel_embeddings=arrays["panel_embeddings"],
                                    strip_embeddings=arrays["strip_embeddings"],
                                    panel_mask=arrays["panel_mask"], page_ids=page_ids,
                                    model_name="bench", model_version="0", mlflow_run_id=None,
                                    stage3_content_hash="h", durable=durable)


def _write_renamed_zarr_groups(url: str, outputs) -> None:
    """The previous store: each comic a zarr-python group (async array writes, attrs last)
    written aside and renamed into place."""
    import asyncio

    from zarr.api import asynchronous as zarr_async
    from zarr.core.sync import sync as zarr_sync

    from comic_pipeline import fileio

    async def write_group(location: str, arrays: dict) -> None:
        group = await zarr_async.open_group(location, mode="w", zarr_format=3)

        async def write_array(name, data):
            array = await group.create_array(name, shape=data.shape, dtype=data.dtype,
                                             chunks=(min(64, data.shape[0]),) + data.shape[1:])
            await array.setitem(slice(None), data)

        await asyncio.gather(*(write_array(name, data) for name, data in arrays.items()))
        await group.update_attributes({"complete": True})

    for key, arrays, _ in outputs:
        with fileio.atomic_directory(os.path.join(url, "comics", key)) as tmp_url:
            zarr_sync(write_group(tmp_url, arrays))


def _write_icechunk(url: str, outputs, comics_per_commit: int) -> None:
    import icechunk
    import zarr

    # its warning that local-filesystem storage is unsafe for concurrent commits (true, and said in
    # the README) would land on stdout, in the middle of this table
    icechunk.set_logs_filter("error")
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(url))
    for start in range(0, len(outputs), comics_per_commit):
        session = repo.writable_session("main")
        for key, arrays, _ in outputs[start:start + comics_per_commit]:
            group = zarr.open_group(session.store, path=f"comics/{key}", mode="w", zarr_format=3)
            for name, data in arrays.items():
                group.create_array(name, data=data, chunks=data.shape, compressors=None)
        session.commit(f"comics {start}..{start + comics_per_commit}")


def _write_numpy_files(url: str, outputs) -> None:
    for key, arrays, _ in outputs:
        os.makedirs(os.path.join(url, key))
        for name, data in arrays.items():
            np.save(os.path.join(url, key, f"{name}.npy"), data)


def measure_store_candidates(stage3_url: str, folder: str, encode, limit: int) -> list[tuple[str, float, float]]:
    """(candidate, comics/s, MB/s) writing the same outputs (`limit` comics of the store, made by
    `encode`, fused features in); best of 2 rounds each."""
    import importlib.util

    outputs = _outputs(stage3_url, limit, encode)
    megabytes = sum(a.nbytes for _, arrays, _ in outputs for a in arrays.values()) / 2**20
    candidates = [
        ("plain numpy files (limit)", _write_numpy_files),
        ("commit layout (this store: versions fsynced before the pointer)", _write_commit_layout),
        ("commit layout without fsync (what durability costs)",
         lambda url, out: _write_commit_layout(url, out, durable=False)),
        ("zarr-python groups + rename (previous store)", _write_renamed_zarr_groups),
    ]
    if importlib.util.find_spec("icechunk") is not None:
        candidates += [
            ("icechunk, a commit per comic", lambda url, out: _write_icechunk(url, out, 1)),
            ("icechunk, a commit per 64 comics", lambda url, out: _write_icechunk(url, out, 64)),
        ]
    figures = []
    for index, (label, write) in enumerate(candidates):
        best = float("inf")
        for round_index in range(2):
            t0 = time.perf_counter()
            write(os.path.join(folder, f"candidate{index}-{round_index}"), outputs)
            best = min(best, time.perf_counter() - t0)
        figures.append((label, len(outputs) / best, megabytes / best))
    return figures
