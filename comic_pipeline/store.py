"""The Stage 3 store: the input contract of Stage 4 (DESIGN §3).

Native layout (Zarr v3; read and written here), one group per comic so a comic is a partition::

    <store>.zarr/            attrs {"format": "comic-stage3", "version": 1, "dim": D, "max_panels": P
                                    (, "max_boxes": B when text is stored)}
      comics/<comic_id>/     attrs {"page_ids": [...] in reading order, "title": ...}
        panel_embeddings (pages, P, D)     float16|float32   REQUIRED
        panel_mask       (pages, P)        bool (a prefix)   REQUIRED
        visual, caption  (pages, P, D)     float16|float32   optional
        text             (pages, P, B, D)  float16|float32   optional, with text_mask
        text_mask        (pages, P, B)     bool (a prefix)

Legacy layout (read only): what the original Stage 3 scripts write — a flat Zarr v2 group with
``panel_embeddings (N_pages, P, D)`` and ``panel_masks (N_pages, P)`` plus a JSON list (its own
path or URL, COMIC_STAGE3_METADATA) of ``{"sequence_index", "canonical_id", "num_panels"}`` per
row. The comic is the parent folder of canonical_id, pages follow the natural sort of the file
name, rows may be shuffled and padded slots hold junk.

Reading is lazy: opening a store and listing comics reads attributes and metadata only; a comic
reads only its own group (native) or its own rows (legacy). Everything read is validated and comes
back float32 with padded slots zeroed. Bad input raises Stage3StoreError naming comic, array and
problem.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import zarr
from fsspec.core import url_to_fs

from comic_pipeline import fileio
from comic_pipeline.schema import MODALITY_ARRAYS, PageFeatures

FORMAT = "comic-stage3"
VERSION = 1
COMICS_GROUP = "comics"
METADATA_ENV = "COMIC_STAGE3_METADATA"  # where deployments keep the legacy metadata URL

# A comic id is a Dagster partition key and a Zarr group name: exactly one path component.
COMIC_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

REQUIRED_ARRAYS = ("panel_embeddings", "panel_mask")
OPTIONAL_ARRAYS = ("visual", "text", "text_mask", "caption")
NATIVE_ARRAYS = REQUIRED_ARRAYS + OPTIONAL_ARRAYS
MASK_ARRAYS = ("panel_mask", "text_mask")
EMBEDDING_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))

LEGACY_EMBEDDINGS = "panel_embeddings"
LEGACY_MASKS = "panel_masks"

CHUNK_TARGET_BYTES = 4 << 20  # a few MiB per chunk: few files, reads not much bigger than asked


class Stage3StoreError(ValueError):
    """Bad Stage 3 input. The message names the store or comic, the array and the problem."""


def _error(comic_id: str | None, array: str | None, problem: str) -> Stage3StoreError:
    where = f"comic {comic_id!r}" if comic_id is not None else "Stage 3 store"
    if array is not None:
        where += f", array {array!r}"
    return Stage3StoreError(f"{where}: {problem}")


def check_comic_id(comic_id: object) -> str:
    """`comic_id` itself when it is a valid comic id, else Stage3StoreError."""
    if not isinstance(comic_id, str) or COMIC_ID_PATTERN.fullmatch(comic_id) is None:
        raise Stage3StoreError(
            f"invalid comic id {comic_id!r}: a comic id names a Zarr group and a Dagster partition, "
            "so it must be one path component matching [A-Za-z0-9][A-Za-z0-9._-]*"
        )
    return comic_id


def _check_page_ids(comic_id: str, page_ids: object) -> list[str]:
    if not isinstance(page_ids, (list, tuple)) or not all(isinstance(p, str) for p in page_ids):
        raise _error(comic_id, None, "attribute 'page_ids' must be a list of strings "
                                     f"(got {type(page_ids).__name__})")
    page_ids = list(page_ids)
    unique, counts = np.unique(np.asarray(page_ids, dtype=str), return_counts=True)
    if (counts > 1).any():
        duplicates = unique[counts > 1][:5].tolist()
        raise _error(comic_id, None, f"duplicate page ids {duplicates}")
    return page_ids


# --- validation shared by readers and writers --------------------------------------------------
def _check_layout(
    comic_id: str,
    n_page_ids: int,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    *,
    dim: int,
    max_panels: int,
    max_boxes: int,
    strict_dtypes: bool = True,
) -> None:
    """Names, shapes and dtypes of a comic's arrays (metadata only, nothing big is read)."""
    unknown = sorted(set(specs) - set(NATIVE_ARRAYS))
    if unknown:
        raise _error(comic_id, unknown[0], f"unknown array; a comic holds only {list(NATIVE_ARRAYS)}")
    for name in REQUIRED_ARRAYS:
        if name not in specs:
            raise _error(comic_id, name, "required array is missing")
    if "text" in specs and "text_mask" not in specs:
        raise _error(comic_id, "text_mask", "missing: 'text' needs 'text_mask' (valid boxes per panel)")
    if "text_mask" in specs and "text" not in specs:
        raise _error(comic_id, "text", "missing: 'text_mask' is stored without 'text'")
    if "text" in specs and max_boxes <= 0:
        raise _error(comic_id, "text", "the store's root attrs have no 'max_boxes', so it cannot "
                                       "hold text (create the store with max_boxes > 0)")

    mask_shape = tuple(specs["panel_mask"][0])
    if len(mask_shape) != 2:
        raise _error(comic_id, "panel_mask", f"expected 2 axes (pages, P), got shape {mask_shape}")
    n_pages = mask_shape[0]
    if n_pages == 0:
        raise _error(comic_id, "panel_mask", "empty comic: it has no pages")
    if n_pages != n_page_ids:
        raise _error(comic_id, "panel_mask", f"{n_pages} pages but 'page_ids' lists {n_page_ids}")

    expected_shapes = {
        "panel_mask": ((n_pages, max_panels), "(pages, P)"),
        "text_mask": ((n_pages, max_panels, max_boxes), "(pages, P, B)"),
        "text": ((n_pages, max_panels, max_boxes, dim), "(pages, P, B, D)"),
    }
    for name, (shape, dtype) in specs.items():
        expected, axes = expected_shapes.get(name, ((n_pages, max_panels, dim), "(pages, P, D)"))
        shape = tuple(shape)
        stated = f"expected {axes} = {expected}, got {shape}"
        if name in MASK_ARRAYS:
            if shape != expected:
                raise _error(comic_id, name, f"mis-shaped: {stated}")
            if strict_dtypes and np.dtype(dtype) != np.bool_:
                raise _error(comic_id, name, f"dtype {np.dtype(dtype)}, expected bool")
            continue
        # Pages / P / B first, so that a wrong last axis alone reads as a dimension mismatch.
        if len(shape) != len(expected) or shape[:-1] != expected[:-1]:
            raise _error(comic_id, name, f"mis-shaped: {stated} (pages, P and B must agree "
                                         "across arrays and with the root attrs)")
        if shape[-1] != dim:
            raise _error(comic_id, name, f"dimension mismatch: last axis {shape[-1]}, the store's "
                                         f"root attrs say dim={dim}")
        dtype = np.dtype(dtype)
        if strict_dtypes and dtype not in EMBEDDING_DTYPES:
            raise _error(comic_id, name, f"dtype {dtype}, expected float16 or float32")
        if not strict_dtypes and dtype.kind != "f":
            raise _error(comic_id, name, f"dtype {dtype}, expected a floating point type")


def _check_prefix(comic_id: str, name: str, page_ids: Sequence[str], mask: np.ndarray) -> None:
    """Valid entries must come first along the last axis: no True after a False."""
    # mask: (pages, P) or (pages, P, B)
    gap = mask[..., 1:] & ~mask[..., :-1]
    if gap.any():
        where = np.argwhere(gap)[0]
        page = int(where[0])
        at = ", panel " + str(int(where[1])) if mask.ndim == 3 else ""
        raise _error(comic_id, name, f"not a prefix on page {page_ids[page]!r} (row {page}{at}): "
                                     "valid entries must come first, with padding only after them")


def _check_masks(comic_id: str, page_ids: Sequence[str], panel_mask: np.ndarray) -> None:
    _check_prefix(comic_id, "panel_mask", page_ids, panel_mask)
    n_panels = panel_mask.sum(axis=1)  # (pages,)
    if (n_panels == 0).any():
        page = int(np.flatnonzero(n_panels == 0)[0])
        raise _error(comic_id, "panel_mask", f"empty comic page {page_ids[page]!r} (row {page}) "
                                             "has no panels")


def _check_finite(comic_id: str, name: str, page_ids: Sequence[str], values: np.ndarray,
                  valid: np.ndarray) -> None:
    """NaN/Inf in a valid slot is an error; padded slots may hold anything (they are zeroed)."""
    # values: (pages, P[, B], D)   valid: (pages, P[, B])
    bad = ~np.isfinite(values).all(axis=-1) & valid
    if bad.any():
        where = np.argwhere(bad)[0]
        page = int(where[0])
        raise _error(comic_id, name, f"{int(bad.sum())} valid slot(s) hold NaN or Inf, first on "
                                     f"page {page_ids[page]!r} (row {page}), panel {int(where[1])}")


def _zero_padding(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """float32 copy of `values` with every slot outside `valid` set to 0."""
    out = np.array(values, dtype=np.float32)  # always a fresh array: callers may mutate it
    out[~valid] = 0.0
    return out


# --- summary -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComicSummary:
    comic_id: str
    n_pages: int
    n_panels: int
    panels_per_page_min: int
    panels_per_page_max: int
    modalities: tuple[str, ...]
    dim: int
    dtype: str  # stored dtype of panel_embeddings
    content_hash: str  # sha256 hex of page ids, masks and valid (padding zeroed) float32 content


# --- array sources: where a comic's raw arrays come from ---------------------------------------
class _NativeArrays:
    """A comic group of the native layout."""

    def __init__(self, group: zarr.Group):
        self._arrays = dict(group.arrays())  # array handles: metadata only, read once
        self.specs = {name: (tuple(array.shape), np.dtype(array.dtype))
                      for name, array in self._arrays.items()}

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._arrays[name][...])

    def check_panel_mask(self, comic_id: str, page_ids: Sequence[str], mask: np.ndarray) -> None:
        pass  # the prefix and emptiness checks say everything for the native layout


class _LegacyArrays:
    """One comic's rows of the flat legacy arrays, presented in reading order."""

    def __init__(self, embeddings: zarr.Array, masks: zarr.Array, rows: np.ndarray,
                 num_panels: np.ndarray):
        self._embeddings = embeddings
        self._masks = masks
        self._rows = rows  # (pages,) int64 row of each page, reading order
        self._num_panels = num_panels  # (pages,) int64 from the metadata
        n_pages = len(rows)
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

    def check_panel_mask(self, comic_id: str, page_ids: Sequence[str], mask: np.ndarray) -> None:
        slots = mask.shape[1]
        too_many = self._num_panels > slots
        if too_many.any():
            page = int(np.flatnonzero(too_many)[0])
            raise _error(comic_id, LEGACY_MASKS, f"page {page_ids[page]!r} (row {self._rows[page]}) "
                                                 f"has num_panels={self._num_panels[page]} but only "
                                                 f"{slots} slots")
        expected = np.arange(slots)[None, :] < self._num_panels[:, None]  # (pages, P)
        disagree = (mask != expected).any(axis=1)
        if disagree.any():
            page = int(np.flatnonzero(disagree)[0])
            raise _error(comic_id, LEGACY_MASKS,
                         f"mask disagrees with num_panels on {int(disagree.sum())} page(s), first "
                         f"{page_ids[page]!r} (row {self._rows[page]}): the mask marks "
                         f"{int(mask[page].sum())} panels, the metadata says "
                         f"num_panels={self._num_panels[page]}")


# --- one comic ---------------------------------------------------------------------------------
class ComicReader:
    """Validated, lazy access to one comic. Arrays are read when asked for, never at creation."""

    def __init__(self, comic_id: str, title: str, page_ids: list[str],
                 source: _NativeArrays | _LegacyArrays, *, dim: int, max_panels: int,
                 max_boxes: int, strict_dtypes: bool = True):
        self.comic_id = comic_id
        self.title = title
        self.page_ids = page_ids
        self.n_pages = len(page_ids)
        self._source = source
        self._dim = dim
        _check_layout(comic_id, self.n_pages, source.specs, dim=dim, max_panels=max_panels,
                      max_boxes=max_boxes, strict_dtypes=strict_dtypes)
        self.modalities = frozenset(m for m, array in MODALITY_ARRAYS.items() if array in source.specs)
        self._panel_mask: np.ndarray | None = None
        self._text_mask: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"ComicReader({self.comic_id!r}, pages={self.n_pages}, "
                f"modalities={sorted(self.modalities)})")

    def panel_mask(self) -> np.ndarray:
        """(pages, P) bool, valid panels (a prefix on every page)."""
        if self._panel_mask is None:
            mask = self._source.read("panel_mask")
            _check_masks(self.comic_id, self.page_ids, mask)
            self._source.check_panel_mask(self.comic_id, self.page_ids, mask)
            self._panel_mask = mask
        return self._panel_mask.copy()

    def text_mask(self) -> np.ndarray:
        """(pages, P, B) bool, valid text boxes; boxes of padded panels count as padding."""
        if "text" not in self.modalities:
            raise _error(self.comic_id, "text_mask", "this comic stores no text")
        if self._text_mask is None:
            text_mask = self._source.read("text_mask")
            _check_prefix(self.comic_id, "text_mask", self.page_ids, text_mask)
            self._text_mask = text_mask & self.panel_mask()[:, :, None]
        return self._text_mask.copy()

    def read(self, modality: str) -> np.ndarray:
        """float32 embeddings of `modality` ((pages, P, D); text (pages, P, B, D)), padding zeroed."""
        if modality not in MODALITY_ARRAYS:
            raise _error(self.comic_id, None, f"unknown modality {modality!r}; "
                                              f"modalities are {list(MODALITY_ARRAYS)}")
        name = MODALITY_ARRAYS[modality]
        if modality not in self.modalities:
            raise _error(self.comic_id, name, f"modality {modality!r} is not stored for this comic "
                                              f"(it has {sorted(self.modalities)})")
        valid = self.text_mask() if modality == "text" else self.panel_mask()
        values = self._source.read(name)
        _check_finite(self.comic_id, name, self.page_ids, values, valid)
        return _zero_padding(values, valid)

    def features(self, modalities: Iterable[str] | None = None) -> PageFeatures:
        """The comic's pages as PageFeatures (all its modalities unless given)."""
        wanted = self.modalities if modalities is None else frozenset(modalities)
        arrays = {modality: self.read(modality) for modality in sorted(wanted)}
        return PageFeatures(
            comic_ids=np.full(self.n_pages, self.comic_id),
            page_numbers=np.arange(self.n_pages, dtype=np.int32),
            page_ids=np.asarray(self.page_ids, dtype=str),
            panel_mask=self.panel_mask(),
            text_mask=self.text_mask() if "text" in wanted else None,
            **arrays,
        )

    def validate(self) -> ComicSummary:
        """Read and check everything; a summary with a content hash that ignores padding."""
        return self.validated_features()[1]

    def validated_features(self) -> tuple[PageFeatures, ComicSummary]:
        """Every modality read and checked once, with the summary of exactly what was read."""
        features = self.features()
        mask = features.panel_mask
        digest = hashlib.sha256()
        digest.update(json.dumps(self.page_ids).encode())
        digest.update(np.ascontiguousarray(mask).tobytes())
        for modality in sorted(self.modalities):
            values = getattr(features, modality)
            digest.update(f"{modality}{values.shape}".encode())
            if modality == "text":
                digest.update(np.ascontiguousarray(features.text_mask).tobytes())
            digest.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
        n_panels = mask.sum(axis=1)
        summary = ComicSummary(
            comic_id=self.comic_id,
            n_pages=self.n_pages,
            n_panels=int(n_panels.sum()),
            panels_per_page_min=int(n_panels.min()),
            panels_per_page_max=int(n_panels.max()),
            modalities=tuple(sorted(self.modalities)),
            dim=self._dim,
            dtype=str(self._source.specs["panel_embeddings"][1]),
            content_hash=digest.hexdigest(),
        )
        return features, summary


# --- legacy metadata ---------------------------------------------------------------------------
def _natural_key(name: str) -> tuple:
    """page_2 < page_10: digit runs compare as numbers."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)) + (name,)


@dataclass(frozen=True)
class _LegacyComic:
    title: str  # the comic's folder, as in canonical_id
    rows: np.ndarray  # (pages,) int64, reading order
    page_ids: list[str]  # canonical ids, reading order
    num_panels: np.ndarray  # (pages,) int64


def _read_legacy_metadata(metadata_url: str, n_rows: int) -> dict[str, _LegacyComic]:
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

    sequence_index, canonical_ids, num_panels = [], [], []
    for position, entry in enumerate(entries):
        try:
            index, canonical, panels = entry["sequence_index"], entry["canonical_id"], entry["num_panels"]
        except (TypeError, KeyError) as exc:
            raise Stage3StoreError(f"{where}: record {position} lacks {exc} (every record needs "
                                   "sequence_index, canonical_id, num_panels)") from None
        if not (isinstance(index, int) and isinstance(panels, int) and isinstance(canonical, str)):
            raise Stage3StoreError(f"{where}: record {position} has wrong types (sequence_index and "
                                   "num_panels must be integers, canonical_id a string)")
        sequence_index.append(index)
        canonical_ids.append(canonical)
        num_panels.append(panels)
    rows = np.asarray(sequence_index, dtype=np.int64)
    panels = np.asarray(num_panels, dtype=np.int64)

    for label, values in (("sequence_index", rows), ("canonical_id", np.asarray(canonical_ids))):
        unique, counts = np.unique(values, return_counts=True)
        if (counts > 1).any():
            raise Stage3StoreError(f"{where}: duplicate {label} {unique[counts > 1][:5].tolist()}")
    out_of_range = (rows < 0) | (rows >= n_rows)
    if out_of_range.any():
        raise Stage3StoreError(f"{where}: sequence_index {rows[out_of_range][:5].tolist()} outside "
                               f"the {n_rows} rows of {LEGACY_EMBEDDINGS!r}")

    # comic = parent folder of canonical_id; "/" -> "__" keeps it one path component.
    folders, names = [], []
    for canonical in canonical_ids:
        folder, _, name = canonical.strip("/").rpartition("/")
        if not folder:
            raise Stage3StoreError(f"{where}: canonical_id {canonical!r} has no parent folder, "
                                   "so it belongs to no comic")
        folders.append(folder)
        names.append(name)
    order = sorted(range(len(entries)), key=lambda i: (folders[i], _natural_key(names[i])))

    comics: dict[str, _LegacyComic] = {}
    start = 0
    while start < len(order):  # walk the sorted records one comic (folder) at a time
        folder = folders[order[start]]
        stop = start
        while stop < len(order) and folders[order[stop]] == folder:
            stop += 1
        members = np.asarray(order[start:stop], dtype=np.int64)
        comic_id = folder.replace("/", "__")
        try:
            check_comic_id(comic_id)
        except Stage3StoreError as exc:
            raise Stage3StoreError(f"{where}: folder {folder!r} gives {exc}") from None
        if comic_id in comics:
            raise Stage3StoreError(f"{where}: folders {comics[comic_id].title!r} and {folder!r} "
                                   f"both map to comic id {comic_id!r}")
        comics[comic_id] = _LegacyComic(
            title=folder,
            rows=rows[members],
            page_ids=[canonical_ids[i] for i in members],
            num_panels=panels[members],
        )
        start = stop
    return comics


# --- the store ---------------------------------------------------------------------------------
def _open_root(url: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError,
            zarr.errors.NodeTypeValidationError) as exc:
        raise Stage3StoreError(f"Stage 3 store {url!r}: no Zarr group there ({exc})") from None


def _native_root_attrs(url: str, root: zarr.Group) -> tuple[int, int, int]:
    """(dim, max_panels, max_boxes) from a native root, or Stage3StoreError saying what is wrong."""
    attrs = dict(root.attrs)
    if attrs.get("format") != FORMAT:
        raise Stage3StoreError(f"Stage 3 store {url!r}: root attrs format={attrs.get('format')!r}, "
                               f"expected {FORMAT!r}")
    if attrs.get("version") != VERSION:
        raise Stage3StoreError(f"Stage 3 store {url!r}: unsupported version "
                               f"{attrs.get('version')!r} (this reader knows version {VERSION})")
    if root.metadata.zarr_format != 3:
        raise Stage3StoreError(f"Stage 3 store {url!r}: the native layout is Zarr v3, this is "
                               f"Zarr v{root.metadata.zarr_format}")
    values = []
    for key, minimum in (("dim", 1), ("max_panels", 1), ("max_boxes", 0)):
        value = attrs.get(key, 0 if key == "max_boxes" else None)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise Stage3StoreError(f"Stage 3 store {url!r}: root attr {key!r}={value!r}, expected "
                                   f"an integer >= {minimum}")
        values.append(value)
    if COMICS_GROUP not in root:
        raise Stage3StoreError(f"Stage 3 store {url!r}: the {COMICS_GROUP!r} group is missing")
    return values[0], values[1], values[2]


class Stage3Store:
    """A Stage 3 store, native or legacy; use Stage3Store.open(url)."""

    def __init__(self, url: str, layout: str, root: zarr.Group, *, dim: int, max_panels: int,
                 max_boxes: int, legacy_comics: dict[str, _LegacyComic] | None = None):
        self.url = url
        self.layout = layout  # "native" | "legacy"
        self.dim = dim
        self.max_panels = max_panels
        self.max_boxes = max_boxes  # 0 when the store holds no text
        self._root = root
        self._legacy_comics = legacy_comics

    def __repr__(self) -> str:
        return (f"Stage3Store({self.url!r}, layout={self.layout!r}, dim={self.dim}, "
                f"max_panels={self.max_panels}, max_boxes={self.max_boxes})")

    @classmethod
    def open(cls, url: str, metadata_url: str | None = None) -> "Stage3Store":
        """Open `url`, detecting the layout. A legacy store needs `metadata_url` (its JSON list)."""
        root = _open_root(url)
        attrs = dict(root.attrs)
        if "format" in attrs:
            dim, max_panels, max_boxes = _native_root_attrs(url, root)
            return cls(url, "native", root, dim=dim, max_panels=max_panels, max_boxes=max_boxes)
        if LEGACY_EMBEDDINGS not in root or LEGACY_MASKS not in root:
            raise Stage3StoreError(
                f"Stage 3 store {url!r}: unknown format; root attrs carry no "
                f"format={FORMAT!r} and there are no legacy arrays {LEGACY_EMBEDDINGS!r} + "
                f"{LEGACY_MASKS!r}"
            )
        embeddings, masks = root[LEGACY_EMBEDDINGS], root[LEGACY_MASKS]
        if embeddings.ndim != 3 or masks.ndim != 2 or embeddings.shape[:2] != masks.shape:
            raise Stage3StoreError(f"legacy Stage 3 store {url!r}: {LEGACY_EMBEDDINGS!r} "
                                   f"{embeddings.shape} and {LEGACY_MASKS!r} {masks.shape} must be "
                                   "(N_pages, P, D) and (N_pages, P)")
        if metadata_url is None:
            raise Stage3StoreError(f"legacy Stage 3 store {url!r}: its page metadata JSON is "
                                   f"required; pass metadata_url (set {METADATA_ENV})")
        comics = _read_legacy_metadata(metadata_url, n_rows=embeddings.shape[0])
        return cls(url, "legacy", root, dim=int(embeddings.shape[2]),
                   max_panels=int(embeddings.shape[1]), max_boxes=0, legacy_comics=comics)

    def comic_ids(self) -> list[str]:
        """Sorted ids of the complete comics (temporary dot-prefixed groups are skipped)."""
        if self._legacy_comics is not None:
            return sorted(self._legacy_comics)
        fs, path = url_to_fs(fileio.join(self.url, COMICS_GROUP))
        names = [entry["name"].rstrip("/").rpartition("/")[2]
                 for entry in fs.ls(path, detail=True) if entry["type"] == "directory"]
        comic_ids = sorted(name for name in names if not name.startswith("."))
        for comic_id in comic_ids:
            try:
                check_comic_id(comic_id)
            except Stage3StoreError as exc:
                raise Stage3StoreError(f"Stage 3 store {self.url!r}: group "
                                       f"{COMICS_GROUP}/{comic_id} is not a comic: {exc}") from None
        return comic_ids

    def comic(self, comic_id: str) -> ComicReader:
        check_comic_id(comic_id)
        if self._legacy_comics is not None:
            if comic_id not in self._legacy_comics:
                raise _error(comic_id, None, f"unknown comic in legacy store {self.url!r}")
            legacy = self._legacy_comics[comic_id]
            source = _LegacyArrays(self._root[LEGACY_EMBEDDINGS], self._root[LEGACY_MASKS],
                                   legacy.rows, legacy.num_panels)
            return ComicReader(comic_id, legacy.title, list(legacy.page_ids), source, dim=self.dim,
                               max_panels=self.max_panels, max_boxes=0, strict_dtypes=False)
        try:
            group = self._root[f"{COMICS_GROUP}/{comic_id}"]
        except KeyError:
            raise _error(comic_id, None, f"unknown comic in store {self.url!r}") from None
        if not isinstance(group, zarr.Group):
            raise _error(comic_id, None, "is an array, expected a comic group")
        attrs = dict(group.attrs)
        page_ids = _check_page_ids(comic_id, attrs.get("page_ids"))
        title = attrs.get("title", comic_id)
        return ComicReader(comic_id, str(title), page_ids, _NativeArrays(group), dim=self.dim,
                           max_panels=self.max_panels, max_boxes=self.max_boxes)

    def modalities(self) -> frozenset[str]:
        """Stage-4 modality names stored for EVERY comic (metadata only)."""
        common: frozenset[str] | None = None
        for comic_id in self.comic_ids():
            have = self.comic(comic_id).modalities
            common = have if common is None else common & have
        return common or frozenset()

    def load_features(self, comic_ids: Sequence[str],
                      modalities: Iterable[str] | None = None) -> PageFeatures:
        """Validated features of `comic_ids`, rows = comics in the given order, pages in order.

        Without `modalities`, the modalities all the given comics share are loaded.
        """
        comic_ids = list(comic_ids)
        if not comic_ids:
            raise Stage3StoreError(f"Stage 3 store {self.url!r}: load_features needs at least one comic")
        if len(set(comic_ids)) != len(comic_ids):
            duplicates = sorted({c for c in comic_ids if comic_ids.count(c) > 1})
            raise Stage3StoreError(f"Stage 3 store {self.url!r}: comics asked for twice: {duplicates}")
        readers = [self.comic(comic_id) for comic_id in comic_ids]
        if modalities is None:
            wanted = frozenset.intersection(*(reader.modalities for reader in readers))
        else:
            wanted = frozenset(modalities)
            unknown = sorted(wanted - set(MODALITY_ARRAYS))
            if unknown:
                raise Stage3StoreError(f"unknown modalities {unknown}; modalities are "
                                       f"{list(MODALITY_ARRAYS)}")
            for reader in readers:
                missing = sorted(wanted - reader.modalities)
                if missing:
                    raise _error(reader.comic_id, MODALITY_ARRAYS[missing[0]],
                                 f"modality {missing[0]!r} was asked for but is not stored")
        if not wanted:
            raise Stage3StoreError(f"Stage 3 store {self.url!r}: no modality to load")
        return PageFeatures.concatenate([reader.features(wanted) for reader in readers])


# --- writing the native layout -----------------------------------------------------------------
def create_native_store(url: str, *, dim: int, max_panels: int, max_boxes: int = 0,
                        overwrite: bool = False) -> None:
    """An empty native store (root attrs + an empty `comics` group), written aside and moved in."""
    for key, value, minimum in (("dim", dim, 1), ("max_panels", max_panels, 1),
                                ("max_boxes", max_boxes, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise Stage3StoreError(f"Stage 3 store {url!r}: {key}={value!r}, expected an integer "
                                   f">= {minimum}")
    if fileio.exists(url) and not overwrite:
        raise Stage3StoreError(f"Stage 3 store {url!r} already exists; pass overwrite=True to replace it")
    attrs = {"format": FORMAT, "version": VERSION, "dim": int(dim), "max_panels": int(max_panels)}
    if max_boxes:
        attrs["max_boxes"] = int(max_boxes)
    with fileio.publish_directory(url) as tmp_url:
        root = zarr.open_group(tmp_url, mode="w", zarr_format=3, attributes=attrs)
        root.create_group(COMICS_GROUP)


def _page_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of whole pages, a few MiB each."""
    page_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    pages = int(np.clip(CHUNK_TARGET_BYTES // page_bytes, 1, max(1, shape[0])))
    return (pages, *shape[1:])


def validate_comic_arrays(comic_id: str, page_ids: Sequence[str], arrays: Mapping[str, np.ndarray],
                          *, dim: int, max_panels: int, max_boxes: int) -> None:
    """Every check a reader makes, on in-memory arrays (used before writing)."""
    check_comic_id(comic_id)
    page_ids = _check_page_ids(comic_id, list(page_ids))
    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    _check_layout(comic_id, len(page_ids), {n: (a.shape, a.dtype) for n, a in arrays.items()},
                  dim=dim, max_panels=max_panels, max_boxes=max_boxes)
    panel_mask = arrays["panel_mask"]
    _check_masks(comic_id, page_ids, panel_mask)
    text_mask = None
    if "text_mask" in arrays:
        _check_prefix(comic_id, "text_mask", page_ids, arrays["text_mask"])
        text_mask = arrays["text_mask"] & panel_mask[:, :, None]
    for name, values in arrays.items():
        if name not in MASK_ARRAYS:
            valid = text_mask if name == "text" else panel_mask
            _check_finite(comic_id, name, page_ids, values, valid)


def write_native_comic(url: str, comic_id: str, *, page_ids: Sequence[str], title: str,
                       arrays: Mapping[str, np.ndarray]) -> None:
    """Validate one comic, write it aside under comics/ and move it into place complete.

    `arrays` is keyed by native array names (panel_embeddings and panel_mask required). Writing a
    comic that exists replaces it.
    """
    check_comic_id(comic_id)
    root = _open_root(url)
    if "format" not in root.attrs and LEGACY_EMBEDDINGS in root:
        raise _error(comic_id, None, f"cannot write into the read-only legacy store {url!r}")
    dim, max_panels, max_boxes = _native_root_attrs(url, root)
    if not isinstance(title, str):
        raise _error(comic_id, None, f"title must be a string, got {type(title).__name__}")
    page_ids = list(page_ids)
    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    validate_comic_arrays(comic_id, page_ids, arrays, dim=dim, max_panels=max_panels,
                          max_boxes=max_boxes)
    with fileio.publish_directory(fileio.join(url, COMICS_GROUP, comic_id)) as tmp_url:
        group = zarr.open_group(tmp_url, mode="w", zarr_format=3,
                                attributes={"page_ids": page_ids, "title": title})
        for name, array in arrays.items():
            group.create_array(name, data=array, chunks=_page_chunks(array.shape, array.itemsize))
