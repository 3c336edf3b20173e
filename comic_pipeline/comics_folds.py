"""Reading COMICS fold files (Iyyer et al. 2017, `miyyer/comics` folds/): rows, kinds, checks.

A fold file is a CSV of evaluation rows. Its kind is detected from its columns:

- text cloze (``answer_candidate_{0,1,2}_text`` + ``correct_answer``): the true text of the answer
  panel is candidate ``correct_answer`` (3 options, one text box each).
- character coherence (``answer_candidate_{0,1}_box_{0,1}`` + ``correct_answer``): candidate 0 is
  ALWAYS the true box order and candidate 1 its reverse; ``correct_answer`` only says where the
  original evaluation *showed* the true order. So the options are laid out with the true order at
  position ``correct_answer`` — reading ``correct_answer`` as "which candidate is true" would
  mislabel about half the rows.

Both kinds share ``book_id, page_id, answer_panel_id, context_panel_{0,1,2}_id`` (the three panels
just before the answer panel on its page) and ``context_text_{p}_{b}`` (up to 3 boxes per context
panel; an empty cell is no box).

Files named like a published fold are checked against its sha256; other files (slices, new folds of
the same format) are accepted and reported as unverified. A bad row is reported with file, line and
column and skipped; it never takes the other rows down. A bad file (unknown columns, a checksum
that does not match) raises ComicsFoldError naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

TEXT_CLOZE = "text_cloze"
CHARACTER_COHERENCE = "character_coherence"
KINDS = (TEXT_CLOZE, CHARACTER_COHERENCE)

# The files of miyyer/comics@e9e08398 folds/ that are known here (README of the data folder).
KNOWN_SHA256 = {
    "text_cloze_dev_easy.csv": "6f350fcc3b358e08be946d2639ff8f11a3a4bedb5c30eb6fd668be86530e960a",
    "char_coherence_dev.csv": "7628136ffcd55628cf5423da554c6ff8f3225bc58e74c18c3f727a18528ae4b6",
}
FOLDS_ENV = "COMICS_FOLDS"  # comma-separated fold files

CONTEXT_PANELS = 3
BOXES_PER_PANEL = 3
COMMON_COLUMNS = (
    ["book_id", "page_id", "answer_panel_id"]
    + [f"context_panel_{p}_id" for p in range(CONTEXT_PANELS)]
    + [f"context_text_{p}_{b}" for p in range(CONTEXT_PANELS) for b in range(BOXES_PER_PANEL)]
)
KIND_COLUMNS = {
    TEXT_CLOZE: [f"answer_candidate_{k}_text" for k in range(3)] + ["correct_answer"],
    CHARACTER_COHERENCE: [f"answer_candidate_{k}_box_{b}" for k in range(2) for b in range(2)]
    + ["correct_answer"],
}


class ComicsFoldError(ValueError):
    """A fold file that cannot be read. The message names the file (and row/column when known)."""


Boxes = tuple[str, ...]  # the text boxes of one panel, in box order


@dataclass(frozen=True)
class FoldRow:
    """One evaluation row, candidates laid out as the original evaluation showed them."""

    kind: str
    source: str  # file name
    line: int  # 1-based line in the file (the header is line 1)
    book_id: str
    page_id: int
    answer_panel: int
    context_panels: tuple[int, int, int]
    context_boxes: tuple[Boxes, Boxes, Boxes]
    candidates: tuple[Boxes, ...]  # K options; text cloze: one box each; coherence: 2 boxes each
    label: int  # index of the true option in `candidates`

    @property
    def answer_boxes(self) -> Boxes:
        """What the row tells of the answer panel's own text, in true box order."""
        return self.candidates[self.label]


@dataclass
class Fold:
    path: str
    kind: str
    sha256: str
    verified: bool | None  # True: matches a known fold; None: no known checksum for this name
    rows: list[FoldRow]
    problems: list[str] = field(default_factory=list)  # skipped rows, "file:line column: problem"
    n_lines: int = 0  # data lines read (rows + skipped)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def books(self) -> list[str]:
        return sorted({row.book_id for row in self.rows}, key=_book_sort_key)


def _book_sort_key(book_id: str) -> tuple:
    return (0, int(book_id), "") if book_id.isdigit() else (1, 0, book_id)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detect_kind(path: str, columns: Sequence[str]) -> str:
    """The fold kind from the header, or ComicsFoldError saying which columns are missing."""
    have = set(columns)
    missing_common = [c for c in COMMON_COLUMNS if c not in have]
    if missing_common:
        raise ComicsFoldError(f"{path}: not a COMICS fold file: missing columns {missing_common[:6]}"
                              f"{' …' if len(missing_common) > 6 else ''}")
    matches = [kind for kind, wanted in KIND_COLUMNS.items() if all(c in have for c in wanted)]
    if len(matches) != 1:
        raise ComicsFoldError(
            f"{path}: cannot tell the fold kind from the columns: a text-cloze file has "
            f"{KIND_COLUMNS[TEXT_CLOZE]}, a character-coherence file has "
            f"{KIND_COLUMNS[CHARACTER_COHERENCE]} ({'both' if matches else 'neither'} found)")
    return matches[0]


class _RowError(Exception):
    def __init__(self, column: str, problem: str):
        super().__init__(f"column {column!r}: {problem}")


def _integer(record: dict, column: str) -> int:
    value = record[column].strip()
    if not value.isdigit():
        raise _RowError(column, f"expected a non-negative integer, got {record[column]!r}")
    return int(value)


def _boxes(record: dict, columns: Sequence[str]) -> Boxes:
    """The non-empty cells of `columns` in order; an empty cell before a filled one is an error
    (the boxes of a panel are a prefix)."""
    values = [record[c].strip() if record[c] is not None else "" for c in columns]
    boxes = []
    for column, value in zip(columns, values):
        if value:
            if len(boxes) != columns.index(column):
                raise _RowError(column, "a text box follows an empty box of the same panel")
            boxes.append(value)
    return tuple(boxes)


def _parse_row(kind: str, source: str, line: int, record: dict) -> FoldRow:
    if None in record:  # more cells than the header names
        raise _RowError("(extra cells)", f"{len(record[None])} cell(s) beyond the header")
    book_id = record["book_id"].strip()
    if not book_id:
        raise _RowError("book_id", "empty")
    page_id = _integer(record, "page_id")
    answer = _integer(record, "answer_panel_id")
    context_panels = tuple(_integer(record, f"context_panel_{p}_id") for p in range(CONTEXT_PANELS))
    expected = tuple(range(answer - CONTEXT_PANELS, answer))
    if context_panels != expected:
        raise _RowError("context_panel_0_id", f"context panels {list(context_panels)} are not the "
                                              f"three panels before answer panel {answer} "
                                              f"({list(expected)})")
    context_boxes = tuple(_boxes(record, [f"context_text_{p}_{b}" for b in range(BOXES_PER_PANEL)])
                          for p in range(CONTEXT_PANELS))
    if kind == TEXT_CLOZE:
        candidates = tuple(_boxes(record, [f"answer_candidate_{k}_text"]) for k in range(3))
        for k, boxes in enumerate(candidates):
            if not boxes:
                raise _RowError(f"answer_candidate_{k}_text", "empty candidate")
        label = _integer(record, "correct_answer")
        if label >= len(candidates):
            raise _RowError("correct_answer", f"{label} is not a candidate index (0..2)")
    else:
        true_order = _boxes(record, ["answer_candidate_0_box_0", "answer_candidate_0_box_1"])
        shown_reversed = _boxes(record, ["answer_candidate_1_box_0", "answer_candidate_1_box_1"])
        if len(true_order) != 2:
            raise _RowError("answer_candidate_0_box_1", "the answer panel needs two text boxes")
        if true_order[0] == true_order[1]:
            raise _RowError("answer_candidate_0_box_1", "both boxes hold the same text: the two "
                                                        "orders cannot be told apart")
        if shown_reversed != true_order[::-1]:
            raise _RowError("answer_candidate_1_box_0", "candidate 1 is not candidate 0 reversed")
        label = _integer(record, "correct_answer")  # where the TRUE order (candidate 0) was shown
        if label > 1:
            raise _RowError("correct_answer", f"{label} is not a position (0 or 1)")
        candidates = (true_order, shown_reversed) if label == 0 else (shown_reversed, true_order)
    return FoldRow(kind=kind, source=source, line=line, book_id=book_id, page_id=page_id,
                   answer_panel=answer, context_panels=context_panels,  # type: ignore[arg-type]
                   context_boxes=context_boxes, candidates=candidates, label=label)  # type: ignore[arg-type]


def read_fold(path: str, *, limit: int | None = None, books: Iterable[str] | None = None) -> Fold:
    """Read one fold file. `limit`: the first N data lines only; `books`: only rows of these books.

    The checksum is always taken over the whole file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ComicsFoldError(f"{path}: no such fold file")
    sha = file_sha256(path)
    known = KNOWN_SHA256.get(os.path.basename(path))
    if known is not None and known != sha:
        raise ComicsFoldError(f"{path}: sha256 {sha} does not match the published fold of that name "
                              f"({known}): the file was modified or truncated; rename a slice or a "
                              "new fold so it is not mistaken for the published one")
    wanted_books = None if books is None else set(books)
    source = os.path.basename(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            kind = detect_kind(path, reader.fieldnames or [])
            fold = Fold(path=path, kind=kind, sha256=sha, verified=None if known is None else True, rows=[])
            for record in reader:
                if limit is not None and fold.n_lines >= limit:
                    break
                fold.n_lines += 1
                line = reader.line_num
                if wanted_books is not None and record.get("book_id", "").strip() not in wanted_books:
                    continue
                try:
                    fold.rows.append(_parse_row(kind, source, line, record))
                except _RowError as error:
                    fold.problems.append(f"{source}:{line} {error}")
    except UnicodeDecodeError as error:
        raise ComicsFoldError(f"{path}: not UTF-8 text ({error})") from None
    except csv.Error as error:
        raise ComicsFoldError(f"{path}: not a readable CSV ({error})") from None
    _check_duplicates(fold)
    return fold


def _check_duplicates(fold: Fold) -> None:
    """The same answer panel twice in one file: keep the first, report the others."""
    seen: dict[tuple, int] = {}
    kept = []
    for row in fold.rows:
        key = (row.book_id, row.page_id, row.answer_panel)
        if key in seen:
            fold.problems.append(f"{row.source}:{row.line} column 'answer_panel_id': book "
                                 f"{row.book_id} page {row.page_id} panel {row.answer_panel} is "
                                 f"already the answer of line {seen[key]}; row skipped")
            continue
        seen[key] = row.line
        kept.append(row)
    fold.rows = kept


def _given_paths(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        spec = os.environ.get(FOLDS_ENV, "")
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [p.strip() for p in parts if p and p.strip()]


def has_folds(spec: str | Sequence[str] | None = None) -> bool:
    """Whether `spec` (default: $COMICS_FOLDS) names any fold file."""
    return bool(_given_paths(spec))


def fold_paths(spec: str | Sequence[str] | None = None) -> list[str]:
    """Fold files from a comma-separated string or a list; default: $COMICS_FOLDS."""
    paths = _given_paths(spec)
    if not paths:
        raise ComicsFoldError(f"no COMICS fold file given: pass paths (comma-separated) or set "
                              f"{FOLDS_ENV}=path.csv,path.csv")
    return paths


def read_folds(paths: Sequence[str], *, limit: int | None = None,
               books: Iterable[str] | None = None) -> tuple[list[Fold], list[str]]:
    """Read several fold files; a file that cannot be read is reported and the others go on.

    Returns (folds, file problems). Raises ComicsFoldError when no file could be read, or when
    the same file is given twice."""
    if len(set(map(os.path.realpath, paths))) != len(paths):
        raise ComicsFoldError(f"a fold file is given twice: {list(paths)}")
    folds, problems = [], []
    books = None if books is None else list(books)
    for path in paths:
        try:
            folds.append(read_fold(path, limit=limit, books=books))
        except ComicsFoldError as error:
            problems.append(str(error))
    if not folds:
        raise ComicsFoldError("no fold file could be read:\n  " + "\n  ".join(problems))
    return folds, problems
