"""The contextualized-embedding store: Stage 4's Zarr output for Stage 5 (search), DESIGN §1, §7.

Layout (Zarr v3; `url` is a path or an fsspec URL):

    <url>/                          attrs {"format": "comic-stage4-contextualized", "version": 1}
      comics/<comic_id>/            attrs: model_name, model_version, mlflow_run_id,
                                           stage3_content_hash, page_ids, dtype, created_at,
                                           n_pages, n_panels, complete=True, + extra attrs
        panel_embeddings  (pages, P, D)  float32|float16  contextualized panels, padded slots 0
        strip_embeddings  (pages, D)     float32|float16  one per page
        panel_mask        (pages, P)     bool             valid panels (a prefix)

A comic group is written into a dot-prefixed temporary sibling and moved into place only once
complete; readers skip dot-prefixed names and groups without ``complete: true``, so a crash
mid-write never shows up as a finished comic. The root group is created atomically with its
full attrs, so several writers may create the same new store at once.

``embed_and_write`` streams many comics through a model: pages of several comics share one
batch, each comic is written as soon as its last page is embedded (by a helper thread while the
next batch is encoded), the next comic is read while this one is encoded, and memory stays at one
batch plus a few comics however many comics go through.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import zarr
from fsspec.core import url_to_fs
from zarr.api import asynchronous as zarr_async
from zarr.core.sync import sync as zarr_sync  # runs a coroutine on zarr's event loop

from comic_pipeline import fileio
from comic_pipeline.schema import PageFeatures

FORMAT = "comic-stage4-contextualized"
VERSION = 1
COMICS = "comics"
STORAGE_DTYPES = ("float32", "float16")
# Attrs this module owns; extra_attrs may not overwrite them.
RESERVED_ATTRS = frozenset({
    "model_name", "model_version", "mlflow_run_id", "stage3_content_hash", "page_ids", "dtype",
    "created_at", "n_pages", "n_panels", "complete",
})
ROOT_ATTRS = {"format": FORMAT, "version": VERSION}


# --- locations --------------------------------------------------------------------------------
def _zarr_location(url: str) -> str:
    """What zarr.open_group should get: a plain path for local files (zarr's LocalStore makes
    parent folders; its fsspec store on file:// does not), the URL itself otherwise."""
    if fileio.is_local(url):
        _, path = url_to_fs(url)
        return path
    return url


def _group_metadata_bytes(attributes: dict) -> bytes:
    """The zarr.json of a Zarr v3 group with these attributes (the v3 spec's group metadata)."""
    return json.dumps({"attributes": attributes, "zarr_format": 3, "node_type": "group"}, indent=2).encode()


def _read_json(url: str) -> dict | None:
    """Parsed JSON at `url`, or None when there is no such file."""
    fs, path = url_to_fs(url)
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def _check_comic_id(comic_id: str) -> None:
    if not isinstance(comic_id, str) or not comic_id or "/" in comic_id or comic_id.startswith("."):
        raise ValueError(f"comic id {comic_id!r} is not usable as a group name "
                         "(must be a non-empty string without '/' that does not start with '.')")


def ensure_root(url: str) -> None:
    """Create the store's root (and its `comics` group) when missing; check the format otherwise.

    Each zarr.json is written whole and moved into place (fileio.atomic_write_bytes), so two
    processes creating the same new store both succeed and leave identical metadata.
    """
    root = _read_json(fileio.join(url, "zarr.json"))
    if root is None:
        fileio.atomic_write_bytes(fileio.join(url, "zarr.json"), _group_metadata_bytes(ROOT_ATTRS))
    else:
        _check_root(url, root)
    if _read_json(fileio.join(url, COMICS, "zarr.json")) is None:
        fileio.atomic_write_bytes(fileio.join(url, COMICS, "zarr.json"), _group_metadata_bytes({}))


def _check_root(url: str, root: dict | None) -> None:
    if root is None:
        raise FileNotFoundError(f"no contextualized-embedding store at {url} (no zarr.json)")
    attrs = root.get("attributes") or {}
    if root.get("zarr_format") != 3 or root.get("node_type") != "group" or attrs.get("format") != FORMAT:
        raise ValueError(f"{url} is not a contextualized-embedding store: expected a Zarr v3 group "
                         f"with format {FORMAT!r}, found format {attrs.get('format')!r} "
                         f"(zarr_format {root.get('zarr_format')!r})")
    if attrs.get("version") != VERSION:
        raise ValueError(f"contextualized-embedding store {url} has version {attrs.get('version')!r}; "
                         f"this code reads version {VERSION}")


# --- writing ----------------------------------------------------------------------------------
def _validated(comic_id: str, panel_embeddings, strip_embeddings, panel_mask, page_ids) -> tuple:
    """Arrays as float32 / bool with shapes checked and padded slots zeroed."""
    panels = np.asarray(panel_embeddings)
    strips = np.asarray(strip_embeddings)
    mask = np.asarray(panel_mask)
    page_ids = [str(p) for p in page_ids]
    where = f"comic {comic_id!r}"
    if panels.ndim != 3:
        raise ValueError(f"{where}: panel_embeddings must be (pages, P, D), got shape {panels.shape}")
    n_pages, max_panels, dim = panels.shape
    if n_pages == 0:
        raise ValueError(f"{where}: no pages to write")
    if strips.shape != (n_pages, dim):
        raise ValueError(f"{where}: strip_embeddings must be (pages, D) = {(n_pages, dim)}, got {strips.shape}")
    if mask.shape != (n_pages, max_panels):
        raise ValueError(f"{where}: panel_mask must be (pages, P) = {(n_pages, max_panels)}, got {mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"{where}: panel_mask must be bool, got {mask.dtype}")
    if len(page_ids) != n_pages:
        raise ValueError(f"{where}: {len(page_ids)} page_ids for {n_pages} pages")
    if len(set(page_ids)) != n_pages:
        raise ValueError(f"{where}: duplicate page_ids")
    # a valid-panel mask is a prefix: no True after the first False
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"{where}: panel_mask is not a prefix on some page")
    for name, array in (("panel_embeddings", panels), ("strip_embeddings", strips)):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{where}: {name} must be floating point, got {array.dtype}")
    panels = np.where(mask[:, :, None], panels, 0).astype(np.float32, copy=False)  # (pages, P, D)
    strips = strips.astype(np.float32, copy=False)
    for name, array in (("panel_embeddings", panels), ("strip_embeddings", strips)):
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: {name} holds NaN or Inf")
    return panels, strips, mask, page_ids


def write_comic(url: str, comic_id: str, *, panel_embeddings, strip_embeddings, panel_mask, page_ids,
                model_name: str, model_version: str, mlflow_run_id: str | None,
                stage3_content_hash: str, extra_attrs: dict | None = None,
                dtype: str = "float32") -> str:
    """Write one comic's contextualized embeddings; returns the comic group's URL.

    panel_embeddings (pages, P, D), strip_embeddings (pages, D), panel_mask (pages, P) bool.
    Padded slots are stored as zeros. dtype: storage dtype, "float32" or "float16" (read back
    as float32). Re-writing a comic replaces its group whole.
    """
    _check_comic_id(comic_id)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"comic {comic_id!r}: storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    extra_attrs = dict(extra_attrs or {})
    clashes = RESERVED_ATTRS & set(extra_attrs)
    if clashes:
        raise ValueError(f"comic {comic_id!r}: extra_attrs may not set {sorted(clashes)}")
    panels, strips, mask, page_ids = _validated(comic_id, panel_embeddings, strip_embeddings,
                                                panel_mask, page_ids)
    n_pages, max_panels, dim = panels.shape
    ensure_root(url)
    comic_url = fileio.join(url, COMICS, comic_id)
    page_chunk = min(n_pages, 64)
    arrays = {  # name -> (data as stored, chunks)
        "panel_embeddings": (panels.astype(dtype), (page_chunk, max_panels, dim)),
        "strip_embeddings": (strips.astype(dtype), (page_chunk, dim)),
        "panel_mask": (mask, (page_chunk, max_panels)),
    }
    attrs = {
        **extra_attrs,
        "model_name": str(model_name),
        "model_version": str(model_version),
        "mlflow_run_id": None if mlflow_run_id is None else str(mlflow_run_id),
        "stage3_content_hash": str(stage3_content_hash),
        "page_ids": page_ids,
        "dtype": dtype,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_pages": int(n_pages),
        "n_panels": int(mask.sum()),
        "complete": True,
    }
    json.dumps(attrs)  # fail on unserializable extra attrs before anything is written
    with fileio.atomic_directory(comic_url) as tmp_url:
        # zarr's own event loop runs the three array writes concurrently (half the time of
        # writing them one after the other through the synchronous API)
        zarr_sync(_write_group(_zarr_location(tmp_url), arrays, attrs))
    return comic_url


async def _write_group(location: str, arrays: dict[str, tuple[np.ndarray, tuple[int, ...]]], attrs: dict) -> None:
    group = await zarr_async.open_group(location, mode="w", zarr_format=3)

    async def write_array(name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
        array = await group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
        await array.setitem(slice(None), data)

    await asyncio.gather(*(write_array(name, data, chunks) for name, (data, chunks) in arrays.items()))
    # attrs last, in one metadata write: `complete` only appears once every array is stored
    await group.update_attributes(attrs)


# --- reading ----------------------------------------------------------------------------------
@dataclass
class ComicEmbeddings:
    comic_id: str
    panel_embeddings: np.ndarray  # (pages, P, D) float32, padded slots 0
    strip_embeddings: np.ndarray  # (pages, D) float32
    panel_mask: np.ndarray  # (pages, P) bool
    page_ids: list[str]
    attrs: dict


class ContextualizedStore:
    """Reader (and search) over a contextualized-embedding store.

    comic_ids()/attrs()/read() always look at storage. Search (strip_matrix without arguments,
    nearest_pages) keeps the strip matrix it built; refresh() drops it to see new comics.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._search_index: tuple[np.ndarray, pd.DataFrame] | None = None

    @classmethod
    def open(cls, url: str) -> "ContextualizedStore":
        _check_root(url, _read_json(fileio.join(url, "zarr.json")))
        return cls(url)

    def refresh(self) -> None:
        self._search_index = None

    # -- listing --
    def _group_url(self, comic_id: str) -> str:
        # on an object store a comic folder is versioned: read only its committed version (fileio)
        url = fileio.join(self.url, COMICS, comic_id)
        return fileio.committed_directory(url) or url

    def _group_attrs(self, comic_id: str) -> dict | None:
        """Attrs of a complete comic group, None when absent or unfinished."""
        metadata = _read_json(fileio.join(self._group_url(comic_id), "zarr.json"))
        if metadata is None or metadata.get("node_type") != "group":
            return None
        attrs = metadata.get("attributes") or {}
        return attrs if attrs.get("complete") is True else None

    def _listed_names(self) -> list[str]:
        fs, path = url_to_fs(fileio.join(self.url, COMICS))
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        names = [entry["name"].rstrip("/").rpartition("/")[2] for entry in entries if entry["type"] == "directory"]
        return sorted(name for name in names if not name.startswith("."))

    def comic_ids(self) -> list[str]:
        """Ids of the complete comic groups, sorted."""
        return [name for name in self._listed_names() if self._group_attrs(name) is not None]

    def attrs(self, comic_id: str) -> dict:
        attrs = self._group_attrs(comic_id)
        if attrs is None:
            raise KeyError(f"comic {comic_id!r} has no complete group in {self.url}")
        return dict(attrs)

    def read(self, comic_id: str) -> ComicEmbeddings:
        attrs = self.attrs(comic_id)
        group = zarr.open_group(_zarr_location(self._group_url(comic_id)), mode="r", zarr_format=3,
                                use_consolidated=False)
        return ComicEmbeddings(
            comic_id=comic_id,
            panel_embeddings=np.asarray(group["panel_embeddings"][...], dtype=np.float32),
            strip_embeddings=np.asarray(group["strip_embeddings"][...], dtype=np.float32),
            panel_mask=np.asarray(group["panel_mask"][...], dtype=bool),
            page_ids=list(attrs["page_ids"]),
            attrs=attrs,
        )

    def _read_strips(self, comic_id: str) -> tuple[np.ndarray, dict]:
        attrs = self.attrs(comic_id)
        group = zarr.open_group(_zarr_location(self._group_url(comic_id)), mode="r", zarr_format=3,
                                use_consolidated=False)
        return np.asarray(group["strip_embeddings"][...], dtype=np.float32), attrs

    def model_versions(self) -> dict[str, str]:
        """comic_id -> model_version of its embeddings (reads group attrs only)."""
        versions = {}
        for name in self._listed_names():
            attrs = self._group_attrs(name)
            if attrs is not None:
                versions[name] = attrs["model_version"]
        return versions

    def stale_comics(self, champion_version: str) -> list[str]:
        """Comics whose embeddings were made by a model version other than the champion."""
        return sorted(cid for cid, version in self.model_versions().items() if version != str(champion_version))

    # -- search --
    def strip_matrix(self, comic_ids: Iterable[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
        """All strip embeddings stacked, (N, D) float32, and a table of what each row is.

        The table has one row per matrix row: comic_id, page_number (reading order in its
        comic), page_id. comic_ids=None: every complete comic (cached for search).
        """
        if comic_ids is None and self._search_index is not None:
            return self._search_index
        wanted = self.comic_ids() if comic_ids is None else list(comic_ids)
        blocks, tables, dims = [], [], set()
        for comic_id in wanted:
            strips, attrs = self._read_strips(comic_id)  # (pages, D)
            blocks.append(strips)
            dims.add(strips.shape[1])
            tables.append(pd.DataFrame({
                "comic_id": comic_id,
                "page_number": np.arange(strips.shape[0], dtype=np.int32),
                "page_id": list(attrs["page_ids"]),
            }))
        if len(dims) > 1:
            raise ValueError(f"store {self.url}: comics have different embedding dimensions {sorted(dims)}; "
                             "they were written by different models — re-embed the stale comics")
        if blocks:
            matrix = np.concatenate(blocks, axis=0)
            table = pd.concat(tables, ignore_index=True)
        else:
            matrix = np.zeros((0, 0), dtype=np.float32)
            table = pd.DataFrame({"comic_id": pd.Series(dtype=str), "page_number": pd.Series(dtype=np.int32),
                                  "page_id": pd.Series(dtype=str)})
        if comic_ids is None:
            self._search_index = (matrix, table)
        return matrix, table

    def nearest_pages(self, query, k: int = 10, exclude_self: bool = True) -> pd.DataFrame:
        """The k pages whose strip embeddings are most cosine-similar to `query`.

        query: a (D,) vector, or (comic_id, page_number) of a stored page. exclude_self drops
        that page itself from its own results (vector queries have no self). Returns a table
        comic_id, page_number, page_id, score, best first.
        """
        from comic_pipeline.metrics import top_k_cosine

        matrix, table = self.strip_matrix()
        if matrix.shape[0] == 0:
            raise ValueError(f"store {self.url} holds no complete comics to search")
        self_row = None
        if isinstance(query, tuple):
            comic_id, page_number = query
            rows = np.flatnonzero((table["comic_id"].to_numpy() == comic_id)
                                  & (table["page_number"].to_numpy() == int(page_number)))
            if rows.size == 0:
                raise KeyError(f"page {page_number} of comic {comic_id!r} is not in {self.url}")
            self_row = int(rows[0])
            vector = matrix[self_row]
        else:
            vector = np.asarray(query, dtype=np.float32)
            if vector.shape != (matrix.shape[1],):
                raise ValueError(f"query vector must have shape ({matrix.shape[1]},), got {vector.shape}")
        candidates = matrix.shape[0] - (1 if exclude_self and self_row is not None else 0)
        k = min(int(k), candidates)
        if k < 1:
            return table.iloc[:0].assign(score=np.zeros(0, np.float32))
        if exclude_self and self_row is not None:
            # rank k + 1, then drop the page itself (ties may put it anywhere in the top)
            _, top, scores = next(top_k_cosine(vector[None], matrix, min(k + 1, matrix.shape[0])))
            keep = top[0] != self_row
            top, scores = top[0][keep][:k], scores[0][keep][:k]
        else:
            _, top, scores = next(top_k_cosine(vector[None], matrix, k))
            top, scores = top[0], scores[0]
        result = table.iloc[top].reset_index(drop=True)
        result["score"] = scores.astype(np.float32)
        return result

    def to_xarray(self, comic_id: str):
        """One comic as an xarray.Dataset (dims page, panel, dim; coords page_id, panel)."""
        try:
            import xarray
        except ImportError as error:
            raise ImportError("ContextualizedStore.to_xarray needs xarray, which is not installed: "
                              "pip install xarray") from error
        comic = self.read(comic_id)
        return xarray.Dataset(
            {
                "panel_embeddings": (("page", "panel", "dim"), comic.panel_embeddings),
                "strip_embeddings": (("page", "dim"), comic.strip_embeddings),
                "panel_mask": (("page", "panel"), comic.panel_mask),
            },
            coords={
                "page": np.arange(len(comic.page_ids)),
                "page_id": ("page", np.asarray(comic.page_ids)),
                "panel": np.arange(comic.panel_mask.shape[1]),
            },
            attrs={**comic.attrs, "comic_id": comic_id},
        )


# --- streaming embedder -----------------------------------------------------------------------
@dataclass
class ComicInput:
    """A comic to embed: its pages are loaded only when the embedder reaches it."""

    comic_id: str
    page_ids: list[str]
    content_hash: str | None  # Stage 3 content hash stamped on the output; None: load() sets it
    load: Callable[[], PageFeatures]  # the comic's pages in reading order

    @classmethod
    def from_reader(cls, reader, modalities: Iterable[str] | None = None,
                    content_hash: str | None = None) -> "ComicInput":
        """Lazy input over a comic of the Stage 3 store (a comic_pipeline.store.ComicReader).

        load() returns the comic's features (all stored modalities unless given; the reader
        checks masks and values of what it reads, so a bad comic fails before anything of it is
        written). Without a known content_hash, load() reads every modality once and hashes what
        it read; with a subset of modalities and no hash it validates the whole comic first.
        """
        def load() -> PageFeatures:
            if comic.content_hash is not None:  # `comic` is bound below
                return reader.features(modalities)
            if modalities is None:
                features, summary = reader.validated_features()
                comic.content_hash = summary.content_hash
                return features
            comic.content_hash = reader.validate().content_hash
            return reader.features(modalities)

        comic = cls(comic_id=reader.comic_id, page_ids=list(reader.page_ids), content_hash=content_hash,
                    load=load)
        return comic


@dataclass(frozen=True)
class WrittenComic:
    comic_id: str
    url: str
    n_pages: int
    n_panels: int
    seconds: float  # from loading its pages to its group being in place


@dataclass
class _PendingComic:
    """A comic whose pages are (partly) in flight: outputs fill in as batches finish."""

    comic: ComicInput
    panel_mask: np.ndarray  # (pages, P) bool
    started: float
    panels: np.ndarray | None = None  # (pages, P, D_out) allocated on first output
    strips: np.ndarray | None = None  # (pages, D_out)
    done_pages: int = 0


def _checked_features(comic: ComicInput, features: PageFeatures) -> PageFeatures:
    where = f"comic {comic.comic_id!r}"
    if not isinstance(features, PageFeatures):
        raise TypeError(f"{where}: load() must return PageFeatures, got {type(features).__name__}")
    if features.n_pages == 0:
        raise ValueError(f"{where}: no pages to embed")
    if features.n_pages != len(comic.page_ids):
        raise ValueError(f"{where}: load() gave {features.n_pages} pages but page_ids lists {len(comic.page_ids)}")
    if not np.array_equal(np.asarray(features.page_ids, dtype=str), np.asarray(comic.page_ids, dtype=str)):
        raise ValueError(f"{where}: load() gave pages in a different order or with other ids than page_ids")
    if not (np.asarray(features.comic_ids) == comic.comic_id).all():
        raise ValueError(f"{where}: load() gave rows of other comics")
    return features


def _loaded_comics(comics: Iterable[ComicInput], prefetch: bool) -> Iterator[tuple[ComicInput, float, PageFeatures]]:
    """(comic, load start time, its checked pages) in order. prefetch: comic i+1 is loaded by a
    helper thread while comic i is being encoded (reading overlaps compute; one more comic in
    memory)."""
    seen: set[str] = set()

    def checked(comic: ComicInput) -> ComicInput:
        _check_comic_id(comic.comic_id)
        if comic.comic_id in seen:
            raise ValueError(f"comic {comic.comic_id!r} is listed twice in one embedding run")
        seen.add(comic.comic_id)
        return comic

    if not prefetch:
        for comic in comics:
            comic = checked(comic)
            t0 = time.perf_counter()
            yield comic, t0, _checked_features(comic, comic.load())
        return
    iterator = iter(comics)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="comic-loader") as loader:
        def start(comic: ComicInput | None) -> tuple[ComicInput, float, Future] | None:
            if comic is None:
                return None
            comic = checked(comic)
            return comic, time.perf_counter(), loader.submit(comic.load)

        upcoming = start(next(iterator, None))
        while upcoming is not None:
            comic, t0, future = upcoming
            pages = _checked_features(comic, future.result())  # a failed load re-raises here
            upcoming = start(next(iterator, None))  # loads while this comic is cut and encoded
            yield comic, t0, pages
            del pages


def _batches(comics: Iterable[ComicInput], batch_pages: int, prefetch: bool
             ) -> Iterator[tuple[list[tuple[_PendingComic, int, int]], list[PageFeatures], list[_PendingComic]]]:
    """Cut the pages of consecutive comics into batches of batch_pages (the last may be short).

    Yields (pieces, features, newly_started): pieces[i] = (pending comic, first page, end page)
    of features[i]; newly_started lists comics whose first page is in this batch. Only the
    comic being cut (and, with prefetch, the next one) is loaded; its pieces are views, so it
    is freed once its last piece is encoded.
    """
    pieces: list[tuple[_PendingComic, int, int]] = []
    features: list[PageFeatures] = []
    started: list[_PendingComic] = []
    room = batch_pages
    for comic, t0, pages in _loaded_comics(comics, prefetch):
        pending = _PendingComic(comic=comic, panel_mask=np.asarray(pages.panel_mask, dtype=bool), started=t0)
        started.append(pending)
        first = 0
        while first < pages.n_pages:
            end = min(pages.n_pages, first + room)
            pieces.append((pending, first, end))
            features.append(pages.select(slice(first, end)))  # views, no copy
            room -= end - first
            first = end
            if room == 0:
                yield pieces, features, started
                pieces, features, started, room = [], [], [], batch_pages
        del pages
    if pieces:
        yield pieces, features, started


def embed_and_write(url: str, comics: Iterable[ComicInput],
                    encode: Callable[[PageFeatures], tuple[np.ndarray, np.ndarray]], *,
                    batch_pages: int, model_name: str, model_version: str, mlflow_run_id: str | None,
                    on_comic_written: Callable[[str, int, float], None] | None = None,
                    dtype: str = "float32", extra_attrs: dict | None = None,
                    background_write: bool = True, prefetch: bool = True) -> list[WrittenComic]:
    """Embed comics in shared batches and write each one as soon as all its pages are done.

    encode(batch) takes PageFeatures of up to batch_pages pages (possibly from several comics,
    in order) and returns (panels (n, P, D_out), strips (n, D_out)). Comics are loaded lazily
    in order, so memory holds one batch plus a few comics whatever their number: the comic
    being cut into batches, the next one (prefetch: loaded by a helper thread while this batch
    is encoded) and the one being written (background_write: comic groups are written by a
    helper thread, at most one write in flight, while the next batch is encoded). on_comic_written(comic_id, n_pages, seconds)
    is called in the caller's thread after each comic's group is in place. Returns the written
    comics in input order.
    """
    if batch_pages < 1:
        raise ValueError(f"batch_pages must be at least 1, got {batch_pages}")
    ensure_root(url)
    written: list[WrittenComic] = []
    in_flight: list[_PendingComic] = []  # comics started, not yet written, in input order
    writes: deque[tuple[_PendingComic, Future]] = deque()  # submitted, not yet reported

    def write(pending: _PendingComic) -> str:
        comic = pending.comic
        if comic.content_hash is None:
            raise ValueError(f"comic {comic.comic_id!r}: no Stage 3 content hash (ComicInput.content_hash "
                             "is None and load() did not set it)")
        return write_comic(
            url, comic.comic_id,
            panel_embeddings=pending.panels, strip_embeddings=pending.strips,
            panel_mask=pending.panel_mask, page_ids=comic.page_ids,
            model_name=model_name, model_version=model_version, mlflow_run_id=mlflow_run_id,
            stage3_content_hash=comic.content_hash, extra_attrs=extra_attrs, dtype=dtype,
        )

    def report_oldest() -> None:
        pending, future = writes.popleft()
        comic_url = future.result()  # re-raises a failed write here, in the caller's thread
        seconds = time.perf_counter() - pending.started
        record = WrittenComic(pending.comic.comic_id, comic_url, len(pending.comic.page_ids),
                              int(pending.panel_mask.sum()), seconds)
        written.append(record)
        if on_comic_written is not None:
            on_comic_written(record.comic_id, record.n_pages, seconds)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding-writer") as writer:
        for pieces, features, started in _batches(comics, batch_pages, prefetch):
            in_flight.extend(started)
            batch = features[0] if len(features) == 1 else PageFeatures.concatenate(features)
            panels, strips = encode(batch)
            panels, strips = np.asarray(panels), np.asarray(strips)
            n = batch.n_pages
            if panels.ndim != 3 or panels.shape[:2] != (n, batch.max_panels) or strips.shape != (n, panels.shape[2]):
                raise ValueError(f"encode returned panels {panels.shape} and strips {strips.shape} for a batch "
                                 f"of {n} pages with {batch.max_panels} panel slots; expected "
                                 f"({n}, {batch.max_panels}, D) and ({n}, D)")
            offset = 0
            for pending, first, end in pieces:
                if pending.panels is None:
                    n_pages = len(pending.comic.page_ids)
                    pending.panels = np.zeros((n_pages,) + panels.shape[1:], dtype=np.float32)
                    pending.strips = np.zeros((n_pages, strips.shape[1]), dtype=np.float32)
                pending.panels[first:end] = panels[offset: offset + end - first]
                pending.strips[first:end] = strips[offset: offset + end - first]
                pending.done_pages += end - first
                offset += end - first
            del batch, features, pieces, panels, strips
            # comics finish in input order; hand every finished one to the writer
            while in_flight and in_flight[0].done_pages == len(in_flight[0].comic.page_ids):
                pending = in_flight.pop(0)
                while writes:  # at most one write in flight: memory stays flat
                    report_oldest()
                if background_write:
                    writes.append((pending, writer.submit(write, pending)))
                else:
                    future: Future = Future()
                    future.set_result(write(pending))
                    writes.append((pending, future))
                    report_oldest()
        while writes:
            report_oldest()
    return written
