"""Streaming many comics through a model into the contextualized-embedding store.

``embed_and_write``: pages of several comics share one batch; comics are read by a small pool of
reader threads several comics ahead of the encoder (reads overlap compute; with reader_processes,
the threads hand the reading, checking and hashing to other processes); each comic is written
(committed) by a helper thread as soon as its last page is embedded, while the next batch is
encoded. Memory stays at one batch plus a few comics however many comics go through.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from comic_pipeline.embedding_store import ensure_root, write_comic
from comic_pipeline.schema import PageFeatures, join_pages
from comic_pipeline.stage3_checks import check_pins

READERS = 4  # comics loading at once ahead of the encoder
# comic commits in flight behind it: a durable commit mostly waits for the disk (fsync), so a few
# overlap each other and the encoder; memory stays flat (at most this many comics' outputs)
WRITERS = 4


@dataclass
class ComicInput:
    """A comic to embed: its pages are loaded only when the embedder reaches it."""

    comic_id: str  # the key (comic_names.comic_key of name)
    page_ids: list[str] | None  # None: load() sets them (ComicInput.from_store)
    content_hash: str | None  # Stage 3 content hash stamped on the output; None: load() sets it
    load: Callable[[], PageFeatures]  # the comic's pages in reading order
    name: str | None = None  # the comic's name (default: comic_id)

    @classmethod
    def from_reader(cls, reader, modalities: Iterable[str] | None = None,
                    content_hash: str | None = None, pinned_hash: str | None = None) -> "ComicInput":
        """Lazy input over a comic of the Stage 3 store (a comic_pipeline.store.ComicReader).

        load() returns the comic's features (all stored modalities unless given; the reader
        checks masks and values of what it reads, so a bad comic fails before anything of it is
        written). Without a known content_hash, load() reads every modality once and hashes what
        it read; with a subset of modalities and no hash it validates the whole comic first, in
        the same single read of every array (the subset is kept, the rest dropped).
        With `pinned_hash` (the hash its validation recorded), a comic whose content differs
        fails with store.Stage3Changed instead of being embedded.
        """
        comic = cls(comic_id=reader.comic_id, page_ids=list(reader.page_ids), content_hash=content_hash,
                    load=lambda: _read_features(comic, reader, modalities, pinned_hash), name=reader.name)
        return comic

    @classmethod
    def from_store(cls, store, comic_id: str, modalities: Iterable[str] | None = None,
                   pinned_hash: str | None = None, processes: Executor | None = None) -> "ComicInput":
        """Lazy input over the comic `comic_id` (its key) of a comic_pipeline.store.Stage3Store,
        opened only by load(), so a run's comics are opened by the reader threads, ahead of the
        encoder, instead of one after another before the first comic is read (0.3-0.6 ms per
        comic on a local disk, several object-store round trips each on S3). load() also sets
        page_ids; a comic whose group cannot be opened fails there, alone. The rest is as
        from_reader. With `processes` (reader_processes()), the comic is read, checked and
        hashed in one of those processes and its features sent back."""
        wanted = None if modalities is None else sorted(modalities)

        def load() -> PageFeatures:
            if processes is not None:
                comic.page_ids, comic.content_hash, features = processes.submit(
                    _load_in_reader_process, store.url, store.metadata_url, comic_id, wanted,
                    pinned_hash).result()
                return features
            reader = store.comic(comic_id)
            comic.page_ids = list(reader.page_ids)
            return _read_features(comic, reader, modalities, pinned_hash)

        comic = cls(comic_id=comic_id, page_ids=None, content_hash=None, load=load,
                    name=store.name_of(comic_id))
        return comic


def _read_features(comic: ComicInput, reader, modalities: Iterable[str] | None,
                   pinned_hash: str | None) -> PageFeatures:
    """What load() of a Stage 3 input returns (ComicInput.from_reader); sets its content hash."""
    if comic.content_hash is not None:
        return reader.features(modalities)
    if modalities is None or frozenset(modalities) <= reader.modalities:
        features, summary = reader.validated_features()
        comic.content_hash = summary.content_hash
        features = features if modalities is None else features.only(modalities)
    else:  # validated first, then the read names the modality the comic lacks
        comic.content_hash = reader.validate().content_hash
        features = reader.features(modalities)
    if pinned_hash is not None:
        check_pins({reader.comic_id: pinned_hash}, {reader.comic_id: comic.content_hash},
                   {reader.comic_id: reader.name})
    return features


# --- reader processes ---------------------------------------------------------------------------
MIN_COMICS_FOR_READER_PROCESSES = 16  # a run this small reads in threads: a process takes ~1 s to start


def reader_process_count(configured: int | None, n_comics: int) -> int:
    """How many reader processes a run of `n_comics` gets: `configured` (None: 0, threads only),
    except that a run of fewer than MIN_COMICS_FOR_READER_PROCESSES comics reads in threads.

    Off unless asked for, because on the only machine measured (2 CPU cores, the demo model on
    one torch thread; README "Benchmarks") a reader process made no consistent difference:
    0.91x the pages/s of reader threads at the asset's 256-page batches, 1.07-1.28x at 64-page
    batches. Where the encoder leaves cores idle (a GPU node) they should pay off; measure there
    with bench_embeddings.py --reader-processes N before turning them on."""
    if not configured or n_comics < MIN_COMICS_FOR_READER_PROCESSES:
        return 0
    return configured


def reader_processes(count: int) -> ProcessPoolExecutor:
    """`count` processes that read Stage 3 comics for ComicInput.from_store(..., processes=):
    the reads, checks and content hashing of an embedding run leave the encoder's process, so
    they no longer take turns with it for one interpreter lock (reader_process_count says when
    a run uses them). Spawned, not forked: the run's process has threads (Dagster's, zarr's
    event loop) that a fork would copy in whatever state they are in. Each process costs about
    a second to start; use it as a context manager (it shuts the processes down). A process
    that dies (killed, out of memory) fails every comic still to be read with it."""
    if count < 1:
        raise ValueError(f"reader processes must be at least 1, got {count}")
    return ProcessPoolExecutor(max_workers=count, mp_context=multiprocessing.get_context("spawn"))


_OPENED_STORES: dict[tuple[str, str | None], object] = {}  # per reader process, by (url, metadata_url)


def _load_in_reader_process(store_url: str, metadata_url: str | None, comic_id: str,
                            modalities: list[str] | None, pinned_hash: str | None
                            ) -> tuple[list[str], str, PageFeatures]:
    """A from_store input's load() in a reader process: (page ids, content hash, features)."""
    from comic_pipeline.store import Stage3Store

    store = _OPENED_STORES.get((store_url, metadata_url))
    if store is None:  # opened once per process; comic() relists for comics added since
        store = _OPENED_STORES[(store_url, metadata_url)] = Stage3Store.open(store_url, metadata_url)
    comic = ComicInput.from_store(store, comic_id, modalities, pinned_hash)  # load() as a reader thread runs it
    features = comic.load()
    return comic.page_ids, comic.content_hash, features


@dataclass(frozen=True)
class WrittenComic:
    comic_id: str
    url: str
    n_pages: int
    n_panels: int
    seconds: float  # from loading its pages to its commit
    name: str = ""


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
    where = f"comic {comic.name or comic.comic_id!r}"
    if not isinstance(features, PageFeatures):
        raise TypeError(f"{where}: load() must return PageFeatures, got {type(features).__name__}")
    if features.n_pages == 0:
        raise ValueError(f"{where}: no pages to embed")
    if comic.page_ids is None:
        raise ValueError(f"{where}: load() did not set page_ids (the input was made without them)")
    if features.n_pages != len(comic.page_ids):
        raise ValueError(f"{where}: load() gave {features.n_pages} pages but page_ids lists {len(comic.page_ids)}")
    if not np.array_equal(np.asarray(features.page_ids, dtype=str), np.asarray(comic.page_ids, dtype=str)):
        raise ValueError(f"{where}: load() gave pages in a different order or with other ids than page_ids")
    if not (np.asarray(features.comic_ids) == comic.comic_id).all():
        raise ValueError(f"{where}: load() gave rows of other comics")
    return features


def _loaded_comics(comics: Iterable[ComicInput], readers: int,
                   on_failed: Callable[[ComicInput, Exception], None] | None = None
                   ) -> Iterator[tuple[ComicInput, float, PageFeatures]]:
    """(comic, load start time, its checked pages) in input order. readers > 0: a pool of that
    many threads loads the next comics while this one is encoded (zarr and numpy release the
    GIL while reading and decoding); readers = 0 loads in the caller's thread. With `on_failed`,
    a comic that fails to load or check is handed to it and left out; without, the error ends
    the run."""
    seen: set[str] = set()

    def checked(comic: ComicInput) -> ComicInput:
        if comic.comic_id in seen:
            raise ValueError(f"comic {comic.name or comic.comic_id!r} is listed twice in one embedding run")
        seen.add(comic.comic_id)
        return comic

    if readers < 1:
        for comic in comics:
            comic = checked(comic)
            t0 = time.perf_counter()
            try:
                pages = _checked_features(comic, comic.load())
            except Exception as error:
                if on_failed is None:
                    raise
                on_failed(comic, error)
                continue
            yield comic, t0, pages
        return
    iterator = iter(comics)
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="comic-reader") as pool:
        ahead: deque[tuple[ComicInput, float, Future]] = deque()

        def top_up() -> None:
            while len(ahead) < readers:
                comic = next(iterator, None)
                if comic is None:
                    return
                comic = checked(comic)
                ahead.append((comic, time.perf_counter(), pool.submit(comic.load)))

        top_up()
        while ahead:
            comic, t0, future = ahead.popleft()
            try:
                pages = _checked_features(comic, future.result())  # a failed load re-raises here
            except Exception as error:
                if on_failed is None:
                    for _, _, pending in ahead:
                        pending.cancel()
                    raise
                on_failed(comic, error)  # this comic only: the others go on
                top_up()
                continue
            except BaseException:
                for _, _, pending in ahead:
                    pending.cancel()
                raise
            top_up()  # keeps `readers` comics loading while this one is cut and encoded
            yield comic, t0, pages
            del pages


def _batches(comics: Iterable[ComicInput], batch_pages: int, readers: int,
             on_failed: Callable[[ComicInput, Exception], None] | None = None) -> Iterator[tuple[list[tuple[_PendingComic, int, int]], list[PageFeatures], list[_PendingComic]]]:
    """Cut the pages of consecutive comics into batches of batch_pages (the last may be short).

    Yields (pieces, features, newly_started): pieces[i] = (pending comic, first page, end page)
    of features[i]; newly_started lists comics whose first page is in this batch. Pieces are
    views, so a comic is freed once its last piece is encoded.
    """
    pieces: list[tuple[_PendingComic, int, int]] = []
    features: list[PageFeatures] = []
    started: list[_PendingComic] = []
    room = batch_pages
    for comic, t0, pages in _loaded_comics(comics, readers, on_failed):
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
                    on_comic_written: Callable[[str, int, float], None] | None = None,
                    **options) -> list[WrittenComic]:
    """iter_embed_and_write run to the end: the written comics in input order.
    on_comic_written(comic_id, n_pages, seconds) is called in the caller's thread after each
    commit. `options` are iter_embed_and_write's."""
    written = []
    for record in iter_embed_and_write(url, comics, encode, **options):
        written.append(record)
        if on_comic_written is not None:
            on_comic_written(record.comic_id, record.n_pages, record.seconds)
    return written


def iter_embed_and_write(url: str, comics: Iterable[ComicInput],
                         encode: Callable[[PageFeatures], tuple[np.ndarray, np.ndarray]], *,
                         batch_pages: int, model_name: str, model_version: str, mlflow_run_id: str | None,
                         on_comic_failed: Callable[[ComicInput, Exception], None] | None = None,
                         dtype: str = "float32", extra_attrs: dict | None = None,
                         background_write: bool = True, prefetch: bool = True,
                         readers: int = READERS, writers: int = WRITERS) -> Iterator[WrittenComic]:
    """Embed comics in shared batches, commit each one as soon as all its pages are done, and
    yield it (in input order) once its commit is on the store: a caller that records progress as
    it goes (the asset's per-comic materializations) never loses what a crash leaves written.

    encode(batch) takes PageFeatures of up to batch_pages pages (possibly from several comics,
    in order; comics with different modalities share a batch with the modalities they all have)
    and returns (panels (n, P, D_out), strips (n, D_out)). Comics are loaded in order by
    `readers` threads ahead of the encoder (prefetch=False: in the caller's thread); comics are
    committed by `writers` helper threads behind it (background_write; False: in the caller's
    thread), at most `writers` in flight. With on_comic_failed(comic, error), a comic whose
    pages fail to load or check is reported to it and left out while the others are embedded
    (without it the error ends the run); an encoder or write failure always ends the run: the
    comics committed before it are still yielded, then the error is raised. Closing the iterator
    early waits for the commits in flight and reads nothing more.
    """
    if batch_pages < 1:
        raise ValueError(f"batch_pages must be at least 1, got {batch_pages}")
    if writers < 1:
        raise ValueError(f"writers must be at least 1, got {writers}")
    ensure_root(url)
    in_flight: deque[_PendingComic] = deque()  # comics started, not yet written, in input order
    writes: deque[tuple[_PendingComic, Future]] = deque()  # submitted, not yet reported

    def write(pending: _PendingComic) -> str:
        comic = pending.comic
        if comic.content_hash is None:
            raise ValueError(f"comic {comic.name or comic.comic_id!r}: no Stage 3 content hash "
                             "(ComicInput.content_hash is None and load() did not set it)")
        return write_comic(
            url, comic.comic_id, name=comic.name,
            panel_embeddings=pending.panels, strip_embeddings=pending.strips,
            panel_mask=pending.panel_mask, page_ids=comic.page_ids,
            model_name=model_name, model_version=model_version, mlflow_run_id=mlflow_run_id,
            stage3_content_hash=comic.content_hash, extra_attrs=extra_attrs, dtype=dtype,
        )

    def oldest_written() -> WrittenComic:
        pending, future = writes.popleft()
        comic_url = future.result()  # re-raises a failed write here, in the caller's thread
        comic = pending.comic
        return WrittenComic(comic.comic_id, comic_url, len(comic.page_ids), int(pending.panel_mask.sum()),
                            time.perf_counter() - pending.started, comic.name or comic.comic_id)

    def written_before_the_error() -> Iterator[WrittenComic]:
        while writes:
            try:
                record = oldest_written()
            except Exception:  # noqa: BLE001 - this write failed too: nothing of it to hand over
                continue
            yield record

    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="embedding-writer") as writer:
        try:
            for pieces, features, started in _batches(comics, batch_pages, readers if prefetch else 0,
                                                      on_comic_failed):
                in_flight.extend(started)
                batch = join_pages(features)
                panels, strips = encode(batch)
                panels, strips = np.asarray(panels), np.asarray(strips)
                n = batch.n_pages
                if panels.ndim != 3 or panels.shape[:2] != (n, batch.max_panels) or strips.shape != (n, panels.shape[2]):
                    raise ValueError(f"encode returned panels {panels.shape} and strips {strips.shape} for a "
                                     f"batch of {n} pages with {batch.max_panels} panel slots; expected "
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
                    pending = in_flight.popleft()
                    while len(writes) >= writers:  # a few writes in flight: memory stays flat
                        yield oldest_written()
                    if background_write:
                        writes.append((pending, writer.submit(write, pending)))
                    else:
                        future: Future = Future()
                        future.set_result(write(pending))
                        writes.append((pending, future))
                while writes and writes[0][1].done():  # committed already: handed over now
                    yield oldest_written()
            while writes:
                yield oldest_written()
        except Exception:
            # the run ends with this error; the comics committed before it are still handed over
            yield from written_before_the_error()
            raise
