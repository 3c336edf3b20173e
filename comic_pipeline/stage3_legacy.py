"""The legacy Stage 3 layout: what the original Stage 3 scripts write. The pipeline only reads it;
write_legacy_store writes one the way those scripts do, for the demo corpus and the tests.

A flat Zarr (v2) group with ``panel_embeddings (N_pages, P, D)`` and ``panel_masks (N_pages, P)``
plus a JSON list of ``{"sequence_index", "canonical_id", "num_panels", ...}`` per row. The comic is
the parent folder of canonical_id (its *name*, which may hold "/"), pages follow the natural sort
of the file name, rows may be shuffled and padded slots hold junk (the mask and num_panels are
trusted, never the values).

Grouping never fails because of one comic: a problem that belongs to a comic (a duplicate or out
of range row, a bad record) is that comic's error; only an unreadable metadata file is the store's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import zarr

from comic_pipeline import fileio
from comic_pipeline.comic_names import comic_key
from comic_pipeline.stage3_checks import Stage3StoreError, comic_error

LEGACY_EMBEDDINGS = "panel_embeddings"
LEGACY_MASKS = "panel_masks"
LEGACY_JUNK = 77.0  # what write_legacy_store leaves in padded slots (about, plus noise): never read


def natural_key(name: str) -> tuple:
    """page_2 < page_10: digit runs compare as numbers."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)) + (name,)


@dataclass(frozen=True)
class LegacyComic:
    name: str  # the comic's folder, as in canonical_id
    rows: np.ndarray  # (pages,) int64, reading order
    page_ids: list[str]  # canonical ids, reading order
    num_panels: np.ndarray  # (pages,) int64


@dataclass
class LegacyIndex:
    """The metadata grouped into comics, keyed by comic key."""

    comics: dict[str, LegacyComic] = field(default_factory=dict)
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (name, error)
    orphan_records: list[str] = field(default_factory=list)  # records that name no comic


def _folder_of(canonical: object) -> str | None:
    if not isinstance(canonical, str):
        return None
    folder, _, name = canonical.strip("/").rpartition("/")
    return folder if folder and name else None


def read_legacy_metadata(metadata_url: str, n_rows: int) -> LegacyIndex:
    """Group the legacy metadata rows into comics, pages in natural order (metadata only)."""
    where = f"legacy metadata {metadata_url!r}"
    try:
        with fileio.open_binary(metadata_url) as handle:
            entries = json.load(handle)
    except FileNotFoundError as exc:
        raise Stage3StoreError(f"{where}: file not found") from exc
    except json.JSONDecodeError as exc:
        raise Stage3StoreError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(entries, list) or not entries:
        raise Stage3StoreError(f"{where}: expected a non-empty JSON list of page records")

    index = LegacyIndex()
    members: dict[str, list[tuple[int, str, int]]] = {}  # folder -> (row, canonical id, panels)
    bad: dict[str, str] = {}  # folder -> first problem
    for position, entry in enumerate(entries):
        folder = _folder_of(entry.get("canonical_id") if isinstance(entry, dict) else None)
        if folder is None:
            canonical = entry.get("canonical_id") if isinstance(entry, dict) else entry
            index.orphan_records.append(
                f"record {position}: canonical_id {canonical!r} has no parent folder, so it "
                "belongs to no comic")
            continue
        row, panels = entry.get("sequence_index"), entry.get("num_panels")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (row, panels)):
            bad.setdefault(folder, f"page {entry['canonical_id']!r} (record {position}): "
                                   f"sequence_index={row!r} and num_panels={panels!r} must be "
                                   "integers")
            continue
        if not 0 <= row < n_rows:
            bad.setdefault(folder, f"page {entry['canonical_id']!r} (record {position}): "
                                   f"sequence_index {row} is outside the {n_rows} rows of "
                                   f"{LEGACY_EMBEDDINGS!r}")
            continue
        members.setdefault(folder, []).append((row, entry["canonical_id"], panels))

    owners: dict[int, list[str]] = {}  # row -> folders whose pages claim it
    for folder, pages in members.items():
        for row, canonical, _ in pages:
            owners.setdefault(row, []).append(folder)
    for row, folders in owners.items():
        if len(folders) > 1:
            for folder in folders:
                bad.setdefault(folder, f"duplicate sequence_index {row}: rows claimed by pages of "
                                       f"{sorted(set(folders))}")
    for folder, pages in members.items():
        canonical_ids = [canonical for _, canonical, _ in pages]
        if len(set(canonical_ids)) != len(canonical_ids):
            duplicates = sorted({c for c in canonical_ids if canonical_ids.count(c) > 1})[:5]
            bad.setdefault(folder, f"duplicate canonical_id {duplicates}")

    by_key: dict[str, list[str]] = {}
    for folder in set(members) | set(bad):
        by_key.setdefault(comic_key(folder), []).append(folder)
    for key, folders in sorted(by_key.items()):
        if len(folders) > 1:  # a 64-bit hash collision: never mix two comics under one key
            for folder in folders:
                bad[folder] = f"comic names {sorted(folders)} share the partition key {key!r}"
            index.problems[key] = (sorted(folders)[0], bad[folders[0]])
            continue
        (folder,) = folders
        if folder in bad:
            index.problems[key] = (folder, str(comic_error(folder, None, bad[folder])))
            continue
        pages = sorted(members[folder], key=lambda page: natural_key(page[1].rstrip("/").rpartition("/")[2]))
        index.comics[key] = LegacyComic(
            name=folder,
            rows=np.asarray([row for row, _, _ in pages], dtype=np.int64),
            page_ids=[canonical for _, canonical, _ in pages],
            num_panels=np.asarray([panels for _, _, panels in pages], dtype=np.int64),
        )
    return index


class LegacyArrays:
    """One comic's rows of the flat legacy arrays, presented in reading order."""

    def __init__(self, embeddings: zarr.Array, masks: zarr.Array, comic: LegacyComic):
        self._embeddings = embeddings
        self._masks = masks
        self._rows = comic.rows  # (pages,) int64 row of each page, reading order
        self._num_panels = comic.num_panels  # (pages,) int64 from the metadata
        n_pages = len(comic.rows)
        self.specs = {
            "panel_embeddings": ((n_pages, *embeddings.shape[1:]), np.dtype(embeddings.dtype)),
            "panel_mask": ((n_pages, *masks.shape[1:]), np.dtype(bool)),
        }

    def _rows_of(self, array: zarr.Array) -> np.ndarray:
        # Orthogonal selection wants sorted rows; read them sorted, then put pages in order.
        sorted_rows = np.sort(self._rows)
        block = array.get_orthogonal_selection((sorted_rows,))
        return block[np.searchsorted(sorted_rows, self._rows)]

    def read(self, name: str) -> np.ndarray:
        if name == "panel_embeddings":
            return self._rows_of(self._embeddings)
        if name == "panel_mask":
            return self._rows_of(self._masks) != 0
        raise KeyError(name)

    def check_panel_mask(self, comic: str, page_ids: Sequence[str], mask: np.ndarray) -> None:
        slots = mask.shape[1]
        too_many = self._num_panels > slots
        if too_many.any():
            page = int(np.flatnonzero(too_many)[0])
            raise comic_error(comic, LEGACY_MASKS, f"page {page_ids[page]!r} (row {self._rows[page]}) "
                                                   f"has num_panels={self._num_panels[page]} but only "
                                                   f"{slots} slots")
        expected = np.arange(slots)[None, :] < self._num_panels[:, None]  # (pages, P)
        disagree = (mask != expected).any(axis=1)
        if disagree.any():
            page = int(np.flatnonzero(disagree)[0])
            raise comic_error(comic, LEGACY_MASKS,
                              f"mask disagrees with num_panels on {int(disagree.sum())} page(s), "
                              f"first {page_ids[page]!r} (row {self._rows[page]}): the mask marks "
                              f"{int(mask[page].sum())} panels, the metadata says "
                              f"num_panels={self._num_panels[page]}")


def write_legacy_store(url: str, metadata_url: str,
                       comics: Iterable[tuple[Sequence[str], np.ndarray, np.ndarray]], *,
                       seed: int = 0, extra_rows: int = 0, chunk_rows: int = 16) -> dict[str, int]:
    """Write a legacy store as the original Stage 3 scripts leave one (replacing `url`).

    `comics`: (canonical page ids in reading order, panel_embeddings (pages, P, D), panel_mask
    (pages, P) prefix) per comic; the comic is the folder of its canonical ids. As in real stores,
    rows are shuffled across comics, padded slots and `extra_rows` rows that no record names hold
    junk, and the JSON records are shuffled too. Returns {canonical id: row}.
    """
    pages = [(page_id, fused, mask) for page_ids, embeddings, masks in comics
             for page_id, fused, mask in zip(page_ids, embeddings, masks, strict=True)]
    if not pages:
        raise ValueError(f"legacy store {url!r}: no pages to write")
    slots, dim = pages[0][1].shape
    rng = np.random.default_rng(seed)
    n_rows = len(pages) + extra_rows
    embeddings = (LEGACY_JUNK + rng.normal(size=(n_rows, slots, dim))).astype(np.float32)
    masks = np.zeros((n_rows, slots), np.uint8)
    rows = rng.permutation(n_rows)[: len(pages)]  # reading order != row order
    records = []
    for (page_id, fused, mask), row in zip(pages, rows):
        mask = np.asarray(mask, bool)
        embeddings[row][mask] = np.asarray(fused)[mask]
        masks[row] = mask
        records.append({"sequence_index": int(row), "canonical_id": page_id, "num_panels": int(mask.sum())})
    root = zarr.open_group(url, mode="w", zarr_format=2)
    root.create_array(LEGACY_EMBEDDINGS, data=embeddings, chunks=(chunk_rows, slots, dim))
    root.create_array(LEGACY_MASKS, data=masks, chunks=(chunk_rows, slots))
    shuffled = [records[i] for i in rng.permutation(len(records))]
    fileio.atomic_write_bytes(metadata_url, json.dumps(shuffled).encode())
    return {record["canonical_id"]: record["sequence_index"] for record in records}
