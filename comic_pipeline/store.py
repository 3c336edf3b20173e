"""The Stage 3 store: the input contract of Stage 4 (DESIGN §3).

Native layout (Zarr v3; read and written here), one group per comic so a comic is a partition::

    <store>.zarr/            attrs {"format": "comic-stage3", "version": 1, "dim": D, "max_panels": P}
      comics/<comic name>/   attrs {"page_ids": [...] in reading order, "title": ... (optional)}
        panel_embeddings (pages, P, D)     float16|float32   REQUIRED
        panel_mask       (pages, P)        bool (a prefix)   REQUIRED
        visual, caption  (pages, P, D)     float16|float32   optional
        text             (pages, P, B, D)  float16|float32   optional, with text_mask
        text_mask        (pages, P, B)     bool (a prefix)

Only those four root attrs are required; B is read from the `text` array. A comic whose name
cannot be a folder name (a "/", a leading dot, 200+ bytes) is stored under its key with its name
in the group attr ``name``. The legacy layout (read only) is described in stage3_legacy.

Comics are identified by their *key* (comic_names.comic_key of the name: the Dagster partition
key); the name is kept for people (ComicReader.name, summaries, errors).

Reading is lazy: opening a store and listing comics reads attributes and metadata only; a comic
reads only its own group (native; on a local disk straight from its chunk files when their
encoding allows, stage3_native) or its own rows (legacy). Everything read is validated and comes
back float32 with padded slots zeroed. One bad comic never stops the store from opening or listing:
its problem is raised by ``comic(key)`` and reported by ``quarantined()``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import zarr

from comic_pipeline import fileio
from comic_pipeline.comic_groups import COMICS, list_children, page_chunks, read_json, root_format_problem
from comic_pipeline.comic_names import HASH_SEPARATOR, ComicNameError, check_comic_name, comic_key, \
    is_comic_key, is_group_name
from comic_pipeline.schema import MODALITY_ARRAYS, PageFeatures, join_pages
from comic_pipeline.stage3_checks import Stage3Changed, Stage3StoreError, check_finite, check_layout, \
    check_masks, check_pins, check_page_ids, check_prefix, comic_error, validate_comic_arrays, zero_padding
from comic_pipeline.stage3_legacy import LEGACY_EMBEDDINGS, LEGACY_MASKS, LegacyArrays, LegacyIndex, \
    read_legacy_metadata
from comic_pipeline.stage3_native import DirectComicArrays, ZarrComicArrays, open_comic_group

FORMAT = "comic-stage3"
VERSION = 1
COMICS_GROUP = COMICS
METADATA_ENV = "COMIC_STAGE3_METADATA"  # where deployments keep the legacy metadata URL

__all__ = [
    "FORMAT", "VERSION", "COMICS_GROUP", "METADATA_ENV", "Stage3StoreError", "ComicSummary",
    "ComicReader", "QuarantinedComic", "Stage3Store", "Stage3Changed", "check_pins",
    "create_native_store", "write_native_comic", "validate_comic_arrays",
]


@dataclass(frozen=True)
class ComicSummary:
    comic_id: str  # the key
    name: str  # the comic's name in the store
    n_pages: int
    n_panels: int
    panels_per_page_min: int
    panels_per_page_max: int
    modalities: tuple[str, ...]
    dim: int
    dtype: str  # stored dtype of panel_embeddings
    content_hash: str  # sha256 hex of page ids, masks and valid (padding zeroed) float32 content


@dataclass(frozen=True)
class QuarantinedComic:
    comic_id: str  # the key
    name: str
    error: str


# --- one comic ---------------------------------------------------------------------------------
class ComicReader:
    """Validated, lazy access to one comic. Arrays are read when asked for, never at creation."""

    def __init__(self, comic_id: str, name: str, title: str, page_ids: list[str],
                 source: ZarrComicArrays | DirectComicArrays | LegacyArrays, *, dim: int, max_panels: int,
                 strict_dtypes: bool = True):
        self.comic_id = comic_id  # the key: partition key, output group name
        self.name = name  # what the collection calls it
        self.title = title
        self.page_ids = page_ids
        self.n_pages = len(page_ids)
        self._source = source
        self._dim = dim
        self.max_boxes = check_layout(name, self.n_pages, source.specs, dim=dim,
                                      max_panels=max_panels, strict_dtypes=strict_dtypes)
        self.modalities = frozenset(m for m, array in MODALITY_ARRAYS.items() if array in source.specs)
        self._panel_mask: np.ndarray | None = None
        self._text_mask: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"ComicReader({self.name!r}, key={self.comic_id!r}, pages={self.n_pages}, "
                f"modalities={sorted(self.modalities)})")

    def panel_mask(self) -> np.ndarray:
        """(pages, P) bool, valid panels (a prefix on every page)."""
        if self._panel_mask is None:
            mask = self._source.read("panel_mask")
            check_masks(self.name, self.page_ids, mask)
            self._source.check_panel_mask(self.name, self.page_ids, mask)
            self._panel_mask = mask
        return self._panel_mask.copy()

    def text_mask(self) -> np.ndarray:
        """(pages, P, B) bool, valid text boxes; boxes of padded panels count as padding."""
        if "text" not in self.modalities:
            raise comic_error(self.name, "text_mask", "this comic stores no text")
        if self._text_mask is None:
            text_mask = self._source.read("text_mask")
            check_prefix(self.name, "text_mask", self.page_ids, text_mask)
            self._text_mask = text_mask & self.panel_mask()[:, :, None]
        return self._text_mask.copy()

    def read(self, modality: str) -> np.ndarray:
        """float32 embeddings of `modality` ((pages, P, D); text (pages, P, B, D)), padding zeroed."""
        if modality not in MODALITY_ARRAYS:
            raise comic_error(self.name, None, f"unknown modality {modality!r}; "
                                               f"modalities are {list(MODALITY_ARRAYS)}")
        array = MODALITY_ARRAYS[modality]
        if modality not in self.modalities:
            raise comic_error(self.name, array, f"modality {modality!r} is not stored for this "
                                                f"comic (it has {sorted(self.modalities)})")
        valid = self.text_mask() if modality == "text" else self.panel_mask()
        values = self._source.read(array)
        check_finite(self.name, array, self.page_ids, values, valid)
        return zero_padding(values, valid)

    def features(self, modalities: Iterable[str] | None = None) -> PageFeatures:
        """The comic's pages as PageFeatures (all its modalities unless given); rows carry the key."""
        wanted = self.modalities if modalities is None else frozenset(modalities)
        fetch = getattr(self._source, "fetch", None)
        if fetch is not None:  # every array this needs, in one read (native layout)
            names = [MODALITY_ARRAYS[m] for m in sorted(wanted) if m in self.modalities]
            names += [] if self._panel_mask is not None else ["panel_mask"]
            names += ["text_mask"] if "text" in wanted and "text" in self.modalities and self._text_mask is None else []
            fetch(names)
        try:
            arrays = {modality: self.read(modality) for modality in sorted(wanted)}
            return PageFeatures(
                comic_ids=np.full(self.n_pages, self.comic_id),
                page_numbers=np.arange(self.n_pages, dtype=np.int32),
                page_ids=np.asarray(self.page_ids, dtype=str),
                panel_mask=self.panel_mask(),
                text_mask=self.text_mask() if "text" in wanted else None,
                **arrays,
            )
        finally:
            if fetch is not None:
                self._source.drop_fetched()  # a reader lives as long as its run: hold nothing

    def validate(self) -> ComicSummary:
        """Read and check everything; a summary with a content hash that ignores padding."""
        return self.validated_features()[1]

    def validated_features(self) -> tuple[PageFeatures, ComicSummary]:
        """Every modality read and checked once, with the summary of exactly what was read."""
        features = self.features()
        mask = features.panel_mask
        digest = hashlib.sha256()
        digest.update(json.dumps(self.page_ids).encode())
        # hashlib reads the arrays' buffers in place (the same bytes as .tobytes(), no copy)
        digest.update(np.ascontiguousarray(mask))
        for modality in sorted(self.modalities):
            values = getattr(features, modality)
            digest.update(f"{modality}{values.shape}".encode())
            if modality == "text":
                digest.update(np.ascontiguousarray(features.text_mask))
            digest.update(np.ascontiguousarray(values, dtype="<f4"))
        n_panels = mask.sum(axis=1)
        summary = ComicSummary(
            comic_id=self.comic_id, name=self.name, n_pages=self.n_pages,
            n_panels=int(n_panels.sum()),
            panels_per_page_min=int(n_panels.min()), panels_per_page_max=int(n_panels.max()),
            modalities=tuple(sorted(self.modalities)), dim=self._dim,
            dtype=str(self._source.specs["panel_embeddings"][1]), content_hash=digest.hexdigest(),
        )
        return features, summary


# --- the store ---------------------------------------------------------------------------------
def _open_root(url: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError,
            zarr.errors.NodeTypeValidationError) as exc:
        raise Stage3StoreError(f"Stage 3 store {url!r}: no Zarr group there ({exc})") from None


def _native_root_attrs(url: str, root: zarr.Group) -> tuple[int, int]:
    """(dim, max_panels) from a native root, or Stage3StoreError saying what is wrong."""
    attrs = dict(root.attrs)
    problem = root_format_problem(attrs, FORMAT, VERSION)
    if problem:
        raise Stage3StoreError(f"Stage 3 store {url!r}: {problem}")
    if root.metadata.zarr_format != 3:
        raise Stage3StoreError(f"Stage 3 store {url!r}: the native layout is Zarr v3, this is "
                               f"Zarr v{root.metadata.zarr_format}")
    values = []
    for key in ("dim", "max_panels"):
        value = attrs.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise Stage3StoreError(f"Stage 3 store {url!r}: root attr {key!r}={value!r}, expected "
                                   "an integer >= 1")
        values.append(value)
    if COMICS_GROUP not in root:
        raise Stage3StoreError(f"Stage 3 store {url!r}: the {COMICS_GROUP!r} group is missing")
    return values[0], values[1]


def _native_folders(url: str) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """({key: (name, folder)}, {key: (name, problem)}) of the comic groups of a native store.

    A folder is the comic's name, except a folder shaped like a hashed key, whose group attr
    ``name`` (written by write_native_comic for names that cannot be folders) gives the name.
    """
    found: dict[str, list[tuple[str, str]]] = {}
    problems: dict[str, tuple[str, str]] = {}
    for folder in list_children(fileio.join(url, COMICS_GROUP)):
        name = folder
        if HASH_SEPARATOR in folder and is_comic_key(folder):
            document = read_json(fileio.join(url, COMICS_GROUP, folder, "zarr.json")) or {}
            name = (document.get("attributes") or {}).get("name", folder)
        try:
            key = comic_key(check_comic_name(name))
        except ComicNameError as exc:
            problems[comic_key(folder)] = (folder, f"group {COMICS_GROUP}/{folder}: {exc}")
            continue
        found.setdefault(key, []).append((name, folder))
    comics = {}
    for key, groups in found.items():
        if len(groups) == 1:
            comics[key] = groups[0]
        else:
            names = sorted(name for name, _ in groups)
            problems[key] = (names[0], f"comic names {names} share the partition key {key!r}")
    return comics, problems


class Stage3Store:
    """A Stage 3 store, native or legacy; use Stage3Store.open(url)."""

    def __init__(self, url: str, layout: str, root: zarr.Group, *, dim: int, max_panels: int,
                 comics: Mapping[str, object], problems: Mapping[str, tuple[str, str]],
                 max_boxes: int = 0, warnings: Sequence[str] = (), metadata_url: str | None = None):
        self.url = url
        self.metadata_url = metadata_url  # a legacy store's page list (open() reads it)
        self.layout = layout  # "native" | "legacy"
        self.dim = dim
        self.max_panels = max_panels
        self.max_boxes = max_boxes  # root attr when given (informative); B is read per comic
        self.warnings = list(warnings)  # store-level oddities that block no comic
        self._root = root
        self._comics = dict(comics)  # key -> (name, folder) native | LegacyComic
        self._problems = dict(problems)  # key -> (name, error) found while listing

    def __repr__(self) -> str:
        return (f"Stage3Store({self.url!r}, layout={self.layout!r}, dim={self.dim}, "
                f"max_panels={self.max_panels}, comics={len(self._comics) + len(self._problems)})")

    @classmethod
    def open(cls, url: str, metadata_url: str | None = None) -> "Stage3Store":
        """Open `url`, detecting the layout. A legacy store needs `metadata_url` (its JSON list).
        Raises only for problems of the whole store, never for one comic."""
        root = _open_root(url)
        attrs = dict(root.attrs)
        if "format" in attrs:
            dim, max_panels = _native_root_attrs(url, root)
            comics, problems = _native_folders(url)
            max_boxes = attrs.get("max_boxes", 0)
            return cls(url, "native", root, dim=dim, max_panels=max_panels, comics=comics,
                       problems=problems, max_boxes=max_boxes if isinstance(max_boxes, int) else 0)
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
        index: LegacyIndex = read_legacy_metadata(metadata_url, n_rows=embeddings.shape[0])
        return cls(url, "legacy", root, dim=int(embeddings.shape[2]),
                   max_panels=int(embeddings.shape[1]), comics=index.comics,
                   problems=index.problems, warnings=index.orphan_records, metadata_url=metadata_url)

    def _relist(self) -> None:
        self._comics, self._problems = _native_folders(self.url)

    def _unknown(self, comic_id: str):
        raise comic_error(comic_id, None, f"unknown comic in Stage 3 store {self.url!r} (no comic "
                                          "has this key)")

    def comic_ids(self) -> list[str]:
        """Sorted keys of every comic in the store now, the ones with a known problem included
        (their problem is raised by comic(key); quarantined() lists them)."""
        if self.layout == "native":
            self._relist()
        return sorted(set(self._comics) | set(self._problems))

    def name_of(self, comic_id: str) -> str:
        """The name of the comic with key `comic_id`."""
        if comic_id in self._problems:
            return self._problems[comic_id][0]
        if comic_id not in self._comics and self.layout == "native":
            self._relist()
        if comic_id not in self._comics:
            self._unknown(comic_id)
        entry = self._comics[comic_id]
        return entry[0] if isinstance(entry, tuple) else entry.name

    def names(self) -> dict[str, str]:
        """{key: name} of every comic."""
        return {comic_id: self.name_of(comic_id) for comic_id in self.comic_ids()}

    def comic(self, comic_id: str) -> ComicReader:
        """The comic with key `comic_id` (layout checked, nothing big read); its error otherwise."""
        if comic_id in self._problems:
            name, problem = self._problems[comic_id]
            raise Stage3StoreError(problem if problem.startswith("comic ") else
                                   str(comic_error(name, None, problem)))
        entry = self._comics.get(comic_id)
        if entry is None and self.layout == "native":
            self._relist()  # a comic written since the last listing
            return self.comic(comic_id) if comic_id in self._comics or comic_id in self._problems \
                else self._unknown(comic_id)
        if entry is None:
            self._unknown(comic_id)
        if self.layout == "legacy":
            source = LegacyArrays(self._root[LEGACY_EMBEDDINGS], self._root[LEGACY_MASKS], entry)
            return ComicReader(comic_id, entry.name, entry.name, list(entry.page_ids), source,
                               dim=self.dim, max_panels=self.max_panels, strict_dtypes=False)
        name, folder = entry
        attrs, arrays = open_comic_group(self._root, self.url, f"{COMICS_GROUP}/{folder}", name)
        page_ids = check_page_ids(name, attrs.get("page_ids"))
        return ComicReader(comic_id, name, str(attrs.get("title", name)), page_ids, arrays,
                           dim=self.dim, max_panels=self.max_panels)

    def quarantined(self) -> dict[str, QuarantinedComic]:
        """Comics whose listing or layout (metadata only: groups, attrs, shapes, dtypes) is bad,
        by key. Values (NaN, masks) are checked by validation, not here."""
        bad = {}
        for comic_id in self.comic_ids():
            try:
                self.comic(comic_id)
            except Stage3StoreError as exc:
                bad[comic_id] = QuarantinedComic(comic_id, self.name_of(comic_id), str(exc))
        return bad

    def modalities(self) -> frozenset[str]:
        """Stage-4 modality names stored for EVERY readable comic (metadata only)."""
        common: frozenset[str] | None = None
        for comic_id in self.comic_ids():
            try:
                have = self.comic(comic_id).modalities
            except Stage3StoreError:
                continue  # a quarantined comic says nothing about the others
            common = have if common is None else common & have
        return common or frozenset()

    def load_features(self, comic_ids: Sequence[str],
                      modalities: Iterable[str] | None = None) -> PageFeatures:
        """Validated features of `comic_ids`, rows = comics in the given order, pages in order.

        Without `modalities`, the modalities all the given comics share are loaded. Comics with
        fewer text boxes per panel are padded to the largest B among them.
        """
        readers, wanted = self._readers(comic_ids, modalities)
        return join_pages([reader.features(wanted) for reader in readers])

    def load_pinned(self, comic_ids: Sequence[str], pinned: Mapping[str, str] | None = None
                    ) -> tuple[PageFeatures, dict[str, str]]:
        """The features of `comic_ids` (modalities they all share) and each comic's content hash
        (ComicSummary.content_hash) of exactly what was read. With `pinned` ({key: hash} recorded
        when the comics were validated or tasks generated), a comic whose content differs raises
        Stage3Changed naming every such comic: Stage 3 rewrote it since."""
        readers, _ = self._readers(comic_ids, None)
        parts, hashes = [], {}
        for reader in readers:
            features, summary = reader.validated_features()
            parts.append(features)
            hashes[reader.comic_id] = summary.content_hash
        if pinned is not None:
            check_pins(pinned, hashes, {reader.comic_id: reader.name for reader in readers})
        return join_pages(parts), hashes

    def _readers(self, comic_ids: Sequence[str], modalities: Iterable[str] | None
                 ) -> tuple[list[ComicReader], frozenset[str]]:
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
                    raise comic_error(reader.name, MODALITY_ARRAYS[missing[0]],
                                      f"modality {missing[0]!r} was asked for but is not stored")
        if not wanted:
            raise Stage3StoreError(f"Stage 3 store {self.url!r}: no modality to load")
        return readers, wanted


# --- writing the native layout -----------------------------------------------------------------
def create_native_store(url: str, *, dim: int, max_panels: int, max_boxes: int = 0,
                        overwrite: bool = False) -> None:
    """An empty native store (root attrs + an empty `comics` group), written aside and moved in.
    max_boxes > 0 is recorded as an informative root attr; readers take B from the arrays."""
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


def write_native_comic(url: str, comic_id: str, *, page_ids: Sequence[str], title: str,
                       arrays: Mapping[str, np.ndarray]) -> str:
    """Validate one comic, write it aside under comics/ and move it into place complete.

    `comic_id` is the comic's name, any name (comic_names); returns its key. The group is
    comics/<name>, or comics/<key> with attr ``name`` when the name cannot be a folder name.
    `arrays` is keyed by native array names (panel_embeddings and panel_mask required).
    Writing a comic that exists replaces it.
    """
    name = comic_id
    try:
        key = comic_key(check_comic_name(name))
    except ComicNameError as exc:
        raise Stage3StoreError(f"Stage 3 store {url!r}: cannot write comic: {exc}") from None
    root = _open_root(url)
    if "format" not in root.attrs and LEGACY_EMBEDDINGS in root:
        raise comic_error(name, None, f"cannot write into the read-only legacy store {url!r}")
    dim, max_panels = _native_root_attrs(url, root)
    if not isinstance(title, str):
        raise comic_error(name, None, f"title must be a string, got {type(title).__name__}")
    page_ids = list(page_ids)
    arrays = {array: np.asarray(values) for array, values in arrays.items()}
    validate_comic_arrays(name, page_ids, arrays, dim=dim, max_panels=max_panels)
    folder = name if is_group_name(name) and not (HASH_SEPARATOR in name and is_comic_key(name)) else key
    attrs = {"page_ids": page_ids, "title": title}
    if folder != name:
        attrs["name"] = name
    with fileio.publish_directory(fileio.join(url, COMICS_GROUP, folder)) as tmp_url:
        group = zarr.open_group(tmp_url, mode="w", zarr_format=3, attributes=attrs)
        for array, values in arrays.items():
            group.create_array(array, data=values, chunks=page_chunks(values.shape, values.itemsize))
    return key
