"""COMICS fold rows -> a native, TEXT-ONLY Stage 3 store (DESIGN §3, §9).

One comic per book (its name from `comic_name_of_book`, the book id kept as title). What the rows
say about each panel is collected first: a context panel's cells list all its text boxes (up to
3); an answer panel that is never a context panel is known by its true candidate (text cloze: one
box; character coherence: its two boxes in true order). Observations of one panel that disagree
are reported and the first is kept.

Gaps: not every panel of a page appears in the folds (each row shows 4 consecutive panels). A store
page is a contiguous page: panels sit next to each other exactly when the book has them next to
each other. So every page of the book is cut into maximal RUNS of consecutive known panel ids, and
each run becomes one store page with page id ``"p{page}:{first}-{last}"`` (pages in page order,
runs in panel order). No adjacency is invented across a missing panel: a reading-order or closure
sample never spans a gap. A run longer than the store's `max_panels` is cut into pieces.

Arrays per comic: ``text (pages, P, 3, D)`` one sentence embedding per box with ``text_mask``;
``panel_embeddings`` = the mean of the panel's box embeddings (a panel without text is a real
panel with no boxes: its mean over no boxes is the zero vector); ``panel_mask``. No ``visual`` or
``caption`` array: there are no images here, and none are faked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from comic_pipeline import fileio
from comic_pipeline.comics_folds import BOXES_PER_PANEL, CONTEXT_PANELS, Boxes, Fold, FoldRow
from comic_pipeline.comic_names import ComicNameError, check_comic_name
from comic_pipeline.store import (
    Stage3StoreError,
    create_native_store,
    write_native_comic,
)
from comic_pipeline.text_encoder import TextEncoder

MAX_PANELS_CAP = 16  # DESIGN §5: up to 16 panels a page
STORE_DTYPE = np.float16

PanelKey = tuple[str, int, int]  # (book id, page id, panel id)


# ------------------------------------------------------------------------------------------------
# The one place that turns a COMICS book id into a store comic name: the book id itself. The store
# accepts any name and derives the partition key (comic_names.comic_key); COMICS ids are digits.
# ------------------------------------------------------------------------------------------------
def comic_name_of_book(book_id: str) -> str:
    try:
        return check_comic_name(book_id)
    except ComicNameError as error:
        raise Stage3StoreError(f"COMICS book id {book_id!r} cannot name a comic: {error}") from None


@dataclass(frozen=True)
class StorePage:
    page_id: str  # "p{page}:{first}-{last}"
    page: int
    first_panel: int
    panels: tuple[Boxes, ...]  # the boxes of each panel, in panel order


@dataclass
class BookText:
    book_id: str
    comic_name: str
    pages: list[StorePage]


@dataclass
class ImportReport:
    store_url: str
    folds: list[dict] = field(default_factory=list)  # name, kind, rows, skipped, sha256, verified
    books: int = 0
    books_failed: dict[str, str] = field(default_factory=dict)
    pages: int = 0  # store pages (runs)
    source_pages: int = 0  # (book, page) pairs of the folds
    panels: int = 0
    silent_panels: int = 0  # panels without any text box
    boxes: int = 0
    pages_split_at_gaps: int = 0  # source pages cut into more than one run
    runs_cut_at_max_panels: int = 0
    conflicts: list[str] = field(default_factory=list)
    max_panels: int = 0
    strings: int = 0  # unique strings (boxes + candidates)
    encoded: int = 0  # strings encoded in this run (the rest came from the cache)
    encode_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def strings_per_s(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "strings_per_s": self.strings_per_s}


# --- panels of the rows --------------------------------------------------------------------------
def collect_panels(rows: Iterable[FoldRow]) -> tuple[dict[PanelKey, Boxes], list[str]]:
    """Every panel the rows show -> its boxes; conflicting observations as messages.

    Context cells list all of a panel's boxes, so they win over an answer observation (a text
    cloze answer shows one box); an answer observation must agree with the context one."""
    context: dict[PanelKey, tuple[Boxes, str]] = {}
    answers: dict[PanelKey, tuple[Boxes, str]] = {}
    conflicts: list[str] = []
    for row in rows:
        where = f"{row.source}:{row.line}"
        for panel, boxes in zip(row.context_panels, row.context_boxes):
            key = (row.book_id, row.page_id, panel)
            seen = context.setdefault(key, (boxes, where))
            if seen[0] != boxes:
                conflicts.append(f"{where}: book {key[0]} page {key[1]} panel {key[2]} has boxes "
                                 f"{list(boxes)} but {seen[1]} gave {list(seen[0])}; kept the first")
        key = (row.book_id, row.page_id, row.answer_panel)
        answers.setdefault(key, (row.answer_boxes, where))
    panels = {key: boxes for key, (boxes, _) in context.items()}
    for key, (boxes, where) in answers.items():
        if key not in panels:
            panels[key] = boxes
        elif not _agrees(boxes, panels[key]):
            conflicts.append(f"{where}: book {key[0]} page {key[1]} answer panel {key[2]} reads "
                             f"{list(boxes)} but as a context panel ({context[key][1]}) it has "
                             f"{list(panels[key])}; kept the context boxes")
    return panels, conflicts


def _agrees(answer: Boxes, full: Boxes) -> bool:
    """An answer observation agrees when its boxes are consecutive boxes of the panel."""
    n = len(answer)
    return any(full[i:i + n] == answer for i in range(len(full) - n + 1))


def runs_of(panel_ids: Sequence[int], max_panels: int) -> list[list[int]]:
    """Maximal runs of consecutive ids (sorted input), each cut into pieces of <= max_panels."""
    runs: list[list[int]] = []
    for panel in panel_ids:
        if runs and panel == runs[-1][-1] + 1 and len(runs[-1]) < max_panels:
            runs[-1].append(panel)
        else:
            runs.append([panel])
    return runs


def book_texts(panels: dict[PanelKey, Boxes], max_panels: int, report: ImportReport) -> list[BookText]:
    """The store pages of every book (books in id order), filling the report's counts."""
    by_page: dict[tuple[str, int], dict[int, Boxes]] = {}
    for (book, page, panel), boxes in panels.items():
        by_page.setdefault((book, page), {})[panel] = boxes
    books: dict[str, list[StorePage]] = {}
    for (book, page) in sorted(by_page, key=lambda k: (_book_key(k[0]), k[1])):
        page_panels = by_page[(book, page)]
        ids = sorted(page_panels)
        runs = runs_of(ids, max_panels)
        uncut = runs_of(ids, len(ids) + 1)
        report.source_pages += 1
        report.pages_split_at_gaps += len(uncut) > 1
        report.runs_cut_at_max_panels += len(runs) - len(uncut)
        for run in runs:
            books.setdefault(book, []).append(StorePage(
                page_id=f"p{page}:{run[0]}-{run[-1]}", page=page, first_panel=run[0],
                panels=tuple(page_panels[p] for p in run)))
    names: dict[str, str] = {}
    out = []
    for book, pages in books.items():
        name = comic_name_of_book(book)
        if name in names:
            raise Stage3StoreError(f"COMICS books {names[name]!r} and {book!r} map to the same comic "
                                   f"name {name!r}")
        names[name] = book
        out.append(BookText(book, name, pages))
    return out


def _book_key(book_id: str) -> tuple:
    return (0, int(book_id), "") if book_id.isdigit() else (1, 0, book_id)


# --- arrays --------------------------------------------------------------------------------------
def book_arrays(book: BookText, vectors: dict[str, np.ndarray], *, dim: int, max_panels: int
                ) -> dict[str, np.ndarray]:
    """Native arrays of one book from text -> unit vector."""
    n_pages, B = len(book.pages), BOXES_PER_PANEL
    text = np.zeros((n_pages, max_panels, B, dim), dtype=np.float32)
    text_mask = np.zeros((n_pages, max_panels, B), dtype=bool)
    panel_mask = np.zeros((n_pages, max_panels), dtype=bool)
    for row, page in enumerate(book.pages):
        panel_mask[row, :len(page.panels)] = True
        for slot, boxes in enumerate(page.panels):
            for box, string in enumerate(boxes[:B]):
                text[row, slot, box] = vectors[string]
                text_mask[row, slot, box] = True
    n_boxes = text_mask.sum(axis=2, keepdims=True)  # (pages, P, 1)
    fused = text.sum(axis=2) / np.maximum(n_boxes, 1)  # mean of the boxes; 0 without any box
    return {"panel_embeddings": fused.astype(STORE_DTYPE), "panel_mask": panel_mask,
            "text": text.astype(STORE_DTYPE), "text_mask": text_mask}


def fold_strings(folds: Sequence[Fold]) -> list[str]:
    """Every distinct string of the rows (context boxes and all candidates), in first-seen order."""
    seen: dict[str, None] = {}
    for fold in folds:
        for row in fold.rows:
            for boxes in (*row.context_boxes, *row.candidates):
                for string in boxes:
                    seen.setdefault(string)
    return list(seen)


def import_folds(folds: Sequence[Fold], store_url: str, encoder: TextEncoder, *,
                 max_panels: int | None = None, report_url: str | None = None,
                 log: Callable[[str], None] = print) -> ImportReport:
    """Write a fresh text-only native store at `store_url` from the rows of `folds`.

    A book that fails validation is reported in `books_failed` and left out; the others are
    written. `max_panels` default: the longest run (at least 4, at most 16)."""
    started = time.perf_counter()
    report = ImportReport(store_url=store_url)
    for fold in folds:
        report.folds.append({"file": fold.name, "kind": fold.kind, "rows": len(fold.rows),
                             "skipped_rows": len(fold.problems), "problems": fold.problems[:20],
                             "books": len(fold.books), "sha256": fold.sha256,
                             "verified": fold.verified})
    rows = [row for fold in folds for row in fold.rows]
    if not rows:
        raise ValueError("import_folds: the folds hold no valid row")
    panels, report.conflicts = collect_panels(rows)
    if max_panels is None:
        longest = max(len(r) for r in _all_runs(panels))
        max_panels = int(np.clip(longest, CONTEXT_PANELS + 1, MAX_PANELS_CAP))
    report.max_panels = max_panels
    books = book_texts(panels, max_panels, report)

    strings = fold_strings(folds)
    encoded_before, seconds_before = encoder.stats.encoded, encoder.stats.seconds
    vectors = dict(zip(strings, encoder.encode(strings)))
    report.strings = len(strings)
    report.encoded = encoder.stats.encoded - encoded_before
    report.encode_seconds = encoder.stats.seconds - seconds_before
    speed = f" ({report.strings_per_s:.0f} strings/s)" if report.encoded else ""
    log(f"[comics] {len(strings)} distinct strings: {report.encoded} encoded{speed}, "
        f"{len(strings) - report.encoded} from the cache")

    create_native_store(store_url, dim=encoder.dim, max_panels=max_panels,
                        max_boxes=BOXES_PER_PANEL, overwrite=True)
    for book in books:
        try:
            arrays = book_arrays(book, vectors, dim=encoder.dim, max_panels=max_panels)
            write_native_comic(store_url, book.comic_name, page_ids=[p.page_id for p in book.pages],
                               title=book.book_id, arrays=arrays)
        except (Stage3StoreError, ValueError) as error:
            report.books_failed[book.book_id] = str(error)
            log(f"[comics] book {book.book_id!r} left out: {error}")
            continue
        report.books += 1
        report.pages += len(book.pages)
        for page in book.pages:
            report.panels += len(page.panels)
            report.silent_panels += sum(1 for boxes in page.panels if not boxes)
            report.boxes += sum(min(len(boxes), BOXES_PER_PANEL) for boxes in page.panels)
    report.seconds = time.perf_counter() - started
    if report_url is not None:
        fileio.atomic_write_bytes(report_url, json.dumps(report.to_dict(), indent=2).encode())
    return report


def _all_runs(panels: dict[PanelKey, Boxes]) -> list[list[int]]:
    by_page: dict[tuple[str, int], list[int]] = {}
    for (book, page, panel) in panels:
        by_page.setdefault((book, page), []).append(panel)
    return [run for ids in by_page.values() for run in runs_of(sorted(ids), 10**9)]
