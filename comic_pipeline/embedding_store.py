"""The contextualized-embedding store: Stage 4's Zarr output for Stage 5 (search), DESIGN §1, §7.

Layout (Zarr v3; `url` is a path or an fsspec URL). Each comic is a commit: immutable *version*
groups, and the comic group's own zarr.json as the pointer to the current one, written last::

    <url>/                       attrs {"format": "comic-stage4-contextualized", "version": 2}
      comics/<key>/              attrs: current (the version group to read), comic_name,
                                        model_name, model_version, mlflow_run_id,
                                        stage3_content_hash, page_ids, dtype, created_at,
                                        n_pages, n_panels, complete=True, + extra attrs
        <version>/               the same attrs (without current); never changed once written
          panel_embeddings  (pages, P, D)  float32|float16  contextualized panels, padded slots 0
          strip_embeddings  (pages, D)     float32|float16  one per page
          panel_mask        (pages, P)     bool             valid panels (a prefix)

<key> is comic_names.comic_key(comic_name): the same rule as the input store and the Dagster
partitions; the original name is the attr ``comic_name``.

Why this is complete-or-nothing everywhere: a writer puts a whole new version group (a fresh
name, so no writer ever touches another's files; on a local disk its files and folders are fsynced
first, so even after a power loss the pointer never names data the disk did not get), then
replaces the pointer in ONE atomic step
(os.replace locally; a single PUT on an object store, which replaces an object whole). A reader
reads the pointer, then the version it names: the old comic or the new one, never a mix, never
none. Concurrent writers of one comic both succeed (the last pointer wins; both versions are
whole); writers of different comics never share a file. A crash leaves an unreferenced version
that no reader sees; superseded versions are deleted by later writes of that comic once their
successor has been current for GC_GRACE_SECONDS, long after any reader that saw them as current
has finished (readers re-read the pointer if one vanishes anyway).

Reading it without this module (Stage 5)::

    root = zarr.open_group(url, mode="r")
    comic = root["comics"][key]                    # the pointer group
    data = comic[comic.attrs["current"]]           # panel_embeddings, strip_embeddings, panel_mask
    comic.attrs["comic_name"], comic.attrs["page_ids"]

Arrays are written uncompressed in chunks of whole pages by comic_groups.array_files (one batch of
plain object writes per comic instead of zarr's per-node machinery): storage speed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import zarr
from fsspec.core import url_to_fs

from comic_pipeline import fileio
from comic_pipeline.comic_groups import COMICS, array_files, group_document, list_children, prefix_gap, \
    put_files, read_json, root_format_problem, zarr_location
from comic_pipeline.comic_names import ComicNameError, check_comic_name, comic_key

FORMAT = "comic-stage4-contextualized"
VERSION = 2
STORAGE_DTYPES = ("float32", "float16")
ARRAYS = ("panel_embeddings", "strip_embeddings", "panel_mask")
# Attrs this module owns; extra_attrs may not overwrite them.
RESERVED_ATTRS = frozenset({
    "comic_name", "current", "model_name", "model_version", "mlflow_run_id", "stage3_content_hash",
    "page_ids", "dtype", "created_at", "n_pages", "n_panels", "complete",
})
ROOT_ATTRS = {"format": FORMAT, "version": VERSION}
GC_GRACE_SECONDS = 600.0  # a version that stopped being current is kept this long for readers
# A read re-reads the pointer when the version it named was collected meanwhile: only possible
# with a grace period shorter than a read (tests use 0); each retry sees a newer commit.
READ_RETRIES = 20


def _check_root(url: str, root: dict | None) -> None:
    if root is None:
        raise FileNotFoundError(f"no contextualized-embedding store at {url} (no zarr.json)")
    attrs = root.get("attributes") or {}
    if root.get("zarr_format") != 3 or root.get("node_type") != "group" or attrs.get("format") != FORMAT:
        raise ValueError(f"{url} is not a contextualized-embedding store: expected a Zarr v3 group "
                         f"with format {FORMAT!r}, found format {attrs.get('format')!r} "
                         f"(zarr_format {root.get('zarr_format')!r})")
    problem = root_format_problem(attrs, FORMAT, VERSION)
    if problem:
        raise ValueError(f"contextualized-embedding store {url}: {problem}; re-embed into a new "
                         "store (a backfill of contextualized_embeddings)")


_CHECKED_ROOTS: set[str] = set()  # stores this process has created or checked


def ensure_root(url: str, *, recheck: bool = False) -> None:
    """Create the store's root (and its `comics` group) when missing; check the format otherwise
    (once per process and URL unless `recheck`).

    Each zarr.json is written whole in one atomic step, so two processes creating the same new
    store both succeed and leave identical metadata.
    """
    if url in _CHECKED_ROOTS and not recheck:
        return
    root = read_json(fileio.join(url, "zarr.json"))
    if root is None:
        fileio.atomic_write_bytes(fileio.join(url, "zarr.json"), group_document(ROOT_ATTRS))
    else:
        _check_root(url, root)
    if read_json(fileio.join(url, COMICS, "zarr.json")) is None:
        fileio.atomic_write_bytes(fileio.join(url, COMICS, "zarr.json"), group_document({}))
    _CHECKED_ROOTS.add(url)


def _key_and_name(comic_id: str, name: str | None) -> tuple[str, str]:
    """(key, name) of a comic given its key and/or name: the key must be comic_key(name)."""
    try:
        if name is None:
            check_comic_name(comic_id)
            name = comic_id
        key = comic_key(check_comic_name(name))
    except ComicNameError as exc:
        raise ValueError(f"comic {comic_id!r}: {exc}") from None
    if comic_id != key and comic_id != name:
        raise ValueError(f"comic {name!r}: its key is {key!r} (comic_names.comic_key), got {comic_id!r}")
    return key, name


# --- writing ----------------------------------------------------------------------------------
def _validated(name: str, panel_embeddings, strip_embeddings, panel_mask, page_ids) -> tuple:
    """Arrays as float32 / bool with shapes checked and padded slots zeroed."""
    panels = np.asarray(panel_embeddings)
    strips = np.asarray(strip_embeddings)
    mask = np.asarray(panel_mask)
    page_ids = [str(p) for p in page_ids]
    where = f"comic {name!r}"
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
    gap = prefix_gap(mask)
    if gap is not None:
        raise ValueError(f"{where}: panel_mask is not a prefix on page {page_ids[gap[0]]!r}")
    for array_name, array in (("panel_embeddings", panels), ("strip_embeddings", strips)):
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{where}: {array_name} must be floating point, got {array.dtype}")
    panels = np.where(mask[:, :, None], panels, 0).astype(np.float32, copy=False)  # (pages, P, D)
    strips = strips.astype(np.float32, copy=False)
    for array_name, array in (("panel_embeddings", panels), ("strip_embeddings", strips)):
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: {array_name} holds NaN or Inf")
    return panels, strips, mask, page_ids


def _new_version() -> str:
    """A version group name no other writer picks: creation time (ms, sortable) + randomness."""
    return f"v{time.time_ns() // 1_000_000:013d}-{uuid.uuid4().hex[:10]}"


def _version_millis(version: str) -> int | None:
    try:
        return int(version[1:14]) if version.startswith("v") and version[14] == "-" else None
    except (ValueError, IndexError):
        return None


def write_comic(url: str, comic_id: str, *, panel_embeddings, strip_embeddings, panel_mask, page_ids,
                model_name: str, model_version: str, mlflow_run_id: str | None,
                stage3_content_hash: str, extra_attrs: dict | None = None,
                dtype: str = "float32", name: str | None = None,
                gc_grace_seconds: float = GC_GRACE_SECONDS, durable: bool = True) -> str:
    """Write one comic's contextualized embeddings as a new version and commit it; returns the
    comic group's URL.

    `comic_id` is the comic's key (or its name); `name` its name (default: comic_id).
    panel_embeddings (pages, P, D), strip_embeddings (pages, D), panel_mask (pages, P) bool.
    Padded slots are stored as zeros. dtype: storage dtype, "float32" or "float16" (read back
    as float32). Re-writing a comic commits a new version; readers switch to it in one step.
    durable=False skips the fsyncs of a local version (a power loss may then leave a pointer to
    data the disk never got): for scratch stores and for measuring what durability costs.
    """
    key, name = _key_and_name(comic_id, name)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"comic {name!r}: storage dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    extra_attrs = dict(extra_attrs or {})
    clashes = RESERVED_ATTRS & set(extra_attrs)
    if clashes:
        raise ValueError(f"comic {name!r}: extra_attrs may not set {sorted(clashes)}")
    panels, strips, mask, page_ids = _validated(name, panel_embeddings, strip_embeddings,
                                                panel_mask, page_ids)
    attrs = {
        **extra_attrs,
        "comic_name": name,
        "model_name": str(model_name),
        "model_version": str(model_version),
        "mlflow_run_id": None if mlflow_run_id is None else str(mlflow_run_id),
        "stage3_content_hash": str(stage3_content_hash),
        "page_ids": page_ids,
        "dtype": dtype,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_pages": int(panels.shape[0]),
        "n_panels": int(mask.sum()),
        "complete": True,
    }
    files = {"zarr.json": group_document(attrs)}  # fails on unserializable extra attrs: nothing written yet
    ensure_root(url)
    comic_url = fileio.join(url, COMICS, key)
    version = _new_version()
    files.update(array_files("panel_embeddings", panels.astype(dtype, copy=False)))
    files.update(array_files("strip_embeddings", strips.astype(dtype, copy=False)))
    files.update(array_files("panel_mask", mask))
    pointer_url = fileio.join(comic_url, "zarr.json")
    earlier = read_json(pointer_url)  # a rewrite leaves a version to collect later
    put_files(fileio.join(comic_url, version), files, durable=durable)  # the whole version, invisible until...
    fileio.atomic_write_bytes(pointer_url, group_document({**attrs, "current": version}),  # ...this commit
                              durable=durable)
    if earlier is not None:
        collect_garbage(comic_url, grace_seconds=gc_grace_seconds)
    return comic_url


def collect_garbage(comic_url: str, *, grace_seconds: float = GC_GRACE_SECONDS) -> list[str]:
    """Delete the versions of one comic that readers can no longer be using: superseded ones once
    the current version is `grace_seconds` old, newer uncommitted ones (crashes, lost races) once
    they are; and stale temporary files. Returns what it deleted."""
    pointer = read_json(fileio.join(comic_url, "zarr.json")) or {}
    current = (pointer.get("attributes") or {}).get("current")
    fs, path = url_to_fs(comic_url)
    try:
        entries = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    horizon = (time.time() - grace_seconds) * 1000
    current_millis = _version_millis(current) if current else None
    removed = []
    for entry in entries:
        child = entry.rstrip("/").rpartition("/")[2]
        millis = _version_millis(child)
        if child.startswith(".tmp-"):
            try:
                stale = fs.info(entry).get("mtime", time.time()) < time.time() - grace_seconds
            except FileNotFoundError:
                continue
        elif millis is None or child == current:
            stale = False
        elif current_millis is not None and millis < current_millis:
            # superseded: keep it until its successor has been current for the grace period, so
            # a reader that saw it as current moments ago can still read it
            stale = current_millis < horizon
        else:  # newer than the current one: a writer still at work, a crash, or a lost race
            stale = millis < horizon
        if stale:
            try:
                fs.rm(entry, recursive=True)
                removed.append(child)
            except FileNotFoundError:
                pass  # another writer collected it first
    return removed


# --- reading ----------------------------------------------------------------------------------
@dataclass
class ComicEmbeddings:
    comic_id: str  # the key
    panel_embeddings: np.ndarray  # (pages, P, D) float32, padded slots 0
    strip_embeddings: np.ndarray  # (pages, D) float32
    panel_mask: np.ndarray  # (pages, P) bool
    page_ids: list[str]
    attrs: dict

    @property
    def comic_name(self) -> str:
        return self.attrs.get("comic_name", self.comic_id)


class ContextualizedStore:
    """Reader over a contextualized-embedding store; every call looks at storage (search with a
    kept index: comic_pipeline.page_search.PageSearch)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    @classmethod
    def open(cls, url: str) -> "ContextualizedStore":
        _check_root(url, read_json(fileio.join(url, "zarr.json")))
        return cls(url)

    def _comic_url(self, comic_id: str) -> str:
        return fileio.join(self.url, COMICS, comic_id)

    def _pointer(self, comic_id: str) -> dict | None:
        """Attrs of a committed comic (its pointer), None when absent or never committed."""
        document = read_json(fileio.join(self._comic_url(comic_id), "zarr.json"))
        if document is None or document.get("node_type") != "group":
            return None
        attrs = document.get("attributes") or {}
        return attrs if attrs.get("complete") is True and attrs.get("current") else None

    def comic_ids(self) -> list[str]:
        """Keys of the committed comics, sorted."""
        return [key for key in list_children(fileio.join(self.url, COMICS)) if self._pointer(key)]

    def comic_names(self) -> dict[str, str]:
        """{key: original comic name} of the committed comics."""
        names = {}
        for key in list_children(fileio.join(self.url, COMICS)):
            attrs = self._pointer(key)
            if attrs is not None:
                names[key] = attrs.get("comic_name", key)
        return names

    def key_of(self, name: str) -> str:
        """The key of the comic called `name` (the one naming rule)."""
        return comic_key(name)

    def attrs(self, comic_id: str) -> dict:
        attrs = self._pointer(comic_id)
        if attrs is None:
            raise KeyError(f"comic {comic_id!r} has no committed embeddings in {self.url}")
        return dict(attrs)

    def _read(self, comic_id: str, arrays: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict]:
        """`arrays` of the current version with its attrs; re-reads the pointer if the version it
        named was collected meanwhile."""
        for attempt in range(READ_RETRIES):
            attrs = self.attrs(comic_id)
            location = zarr_location(fileio.join(self._comic_url(comic_id), attrs["current"]))
            try:
                group = zarr.open_group(location, mode="r", zarr_format=3, use_consolidated=False)
                return {name: np.asarray(group[name][...]) for name in arrays}, attrs
            except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
                if attempt == READ_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def open_group(self, comic_id: str) -> zarr.Group:
        """The current version of a comic as a read-only zarr group (Stage 5's plain-zarr view)."""
        attrs = self.attrs(comic_id)
        return zarr.open_group(zarr_location(fileio.join(self._comic_url(comic_id), attrs["current"])),
                               mode="r", zarr_format=3, use_consolidated=False)

    def read(self, comic_id: str) -> ComicEmbeddings:
        arrays, attrs = self._read(comic_id, ARRAYS)
        return ComicEmbeddings(
            comic_id=comic_id,
            panel_embeddings=arrays["panel_embeddings"].astype(np.float32, copy=False),
            strip_embeddings=arrays["strip_embeddings"].astype(np.float32, copy=False),
            panel_mask=arrays["panel_mask"].astype(bool, copy=False),
            page_ids=list(attrs["page_ids"]),
            attrs=attrs,
        )

    def read_strips(self, comic_id: str) -> tuple[np.ndarray, dict]:
        """(pages, D) float32 strip embeddings of one comic, with its attrs."""
        arrays, attrs = self._read(comic_id, ("strip_embeddings",))
        return arrays["strip_embeddings"].astype(np.float32, copy=False), attrs

    def model_versions(self) -> dict[str, str]:
        """comic key -> model_version of its embeddings (reads the pointers only)."""
        versions = {}
        for key in list_children(fileio.join(self.url, COMICS)):
            attrs = self._pointer(key)
            if attrs is not None:
                versions[key] = attrs["model_version"]
        return versions

    def stale_comics(self, champion_version: str) -> list[str]:
        """Comics whose embeddings were made by a model version other than the champion."""
        return sorted(cid for cid, version in self.model_versions().items() if version != str(champion_version))

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
