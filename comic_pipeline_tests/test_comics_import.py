"""COMICS fold reading and the text-only import, with a deterministic stand-in encoder.

The real encoder is tested in test_comics_encoder.py / test_comics_run.py; here what is tested is
what the importer does with vectors, so a hash-seeded fake keeps these tests instant.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from comic_pipeline import comics_folds as cf
from comic_pipeline import comics_import as ci
from comic_pipeline.comic_names import comic_key
from comic_pipeline.store import Stage3Store, Stage3StoreError
from comic_pipeline.text_encoder import EncodeStats

FIXTURES = Path(__file__).parent / "fixtures" / "comics"
CLOZE_SLICE = FIXTURES / "text_cloze_dev_easy_slice.csv"
COHERENCE_SLICE = FIXTURES / "char_coherence_dev_slice.csv"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "comics"


class FakeEncoder:
    """Texts -> seeded unit vectors (same text, same vector)."""

    dim = 8

    def __init__(self):
        self.stats = EncodeStats()

    def encode(self, texts):
        self.stats.encoded += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            vector = np.random.default_rng(seed).normal(size=self.dim)
            out[i] = vector / np.linalg.norm(vector)
        return out


def write_fold(path: Path, kind: str, rows: list[dict]) -> Path:
    columns = cf.COMMON_COLUMNS + cf.KIND_COLUMNS[kind]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def cloze_row(book="7", page=0, answer=4, texts=None, candidates=("a", "b", "c"), label=0) -> dict:
    row = {"book_id": book, "page_id": page, "answer_panel_id": answer,
           **{f"context_panel_{p}_id": answer - 3 + p for p in range(3)}}
    texts = texts or [[f"box {answer - 3 + p}"] for p in range(3)]
    for p, boxes in enumerate(texts):
        for b, text in enumerate(boxes):
            row[f"context_text_{p}_{b}"] = text
    for k, text in enumerate(candidates):
        row[f"answer_candidate_{k}_text"] = text
    row["correct_answer"] = label
    return row


# --- reading -----------------------------------------------------------------------------------
def test_slices_are_detected_and_parsed():
    cloze = cf.read_fold(CLOZE_SLICE)
    coherence = cf.read_fold(COHERENCE_SLICE)
    assert (cloze.kind, coherence.kind) == (cf.TEXT_CLOZE, cf.CHARACTER_COHERENCE)
    assert cloze.verified is None and not cloze.problems and len(cloze.rows) == 94
    first = cloze.rows[0]
    assert first.line == 2 and first.context_panels == tuple(range(first.answer_panel - 3, first.answer_panel))
    assert len(first.candidates) == 3 and all(len(c) == 1 for c in first.candidates)
    assert len(coherence.rows) == 92 and all(len(r.candidates) == 2 for r in coherence.rows)


def test_character_coherence_gold_is_candidate_0_shown_at_correct_answer():
    with open(COHERENCE_SLICE, newline="") as handle:
        records = list(csv.DictReader(handle))
    rows = cf.read_fold(COHERENCE_SLICE).rows
    assert {r.label for r in rows} == {0, 1}  # both positions occur in the slice
    for record, row in zip(records, rows):
        true_order = (record["answer_candidate_0_box_0"], record["answer_candidate_0_box_1"])
        assert row.answer_boxes == true_order  # gold = candidate 0, wherever it was shown
        assert row.label == int(record["correct_answer"])
        assert row.candidates[1 - row.label] == true_order[::-1]


def test_published_fold_checksum(tmp_path):
    fake = tmp_path / "text_cloze_dev_easy.csv"  # the published name, other content
    shutil.copy(CLOZE_SLICE, fake)
    with pytest.raises(cf.ComicsFoldError, match="sha256 .* does not match the published fold"):
        cf.read_fold(fake)
    real = SHARED_DATA / "text_cloze_dev_easy.csv"
    if real.is_file():
        fold = cf.read_fold(real, limit=5)
        assert fold.verified is True and len(fold.rows) == 5


def test_bad_rows_are_reported_with_file_line_and_column_and_skipped(tmp_path):
    good = cloze_row(answer=4)
    rows = [
        good,
        {**cloze_row(answer=5), "page_id": "x"},
        {**cloze_row(answer=6), "context_panel_1_id": 9},
        {**cloze_row(answer=7), "context_text_0_0": "", "context_text_0_1": "late box"},
        {**cloze_row(answer=8), "correct_answer": 3},
        {**cloze_row(answer=3), "answer_candidate_2_text": ""},
        cloze_row(answer=4, candidates=("x", "y", "z")),  # the same answer panel again
    ]
    fold = cf.read_fold(write_fold(tmp_path / "cloze.csv", cf.TEXT_CLOZE, rows))
    assert [r.answer_panel for r in fold.rows] == [4]
    expected = ["cloze.csv:3 column 'page_id'", "cloze.csv:4 column 'context_panel_0_id'",
                "cloze.csv:5 column 'context_text_0_1'", "cloze.csv:6 column 'correct_answer'",
                "cloze.csv:7 column 'answer_candidate_2_text'", "cloze.csv:8 column 'answer_panel_id'"]
    assert len(fold.problems) == len(expected)
    for problem, start in zip(fold.problems, expected):
        assert problem.startswith(start), problem

    coherence = {**cloze_row(answer=4), "answer_candidate_0_box_0": "one", "answer_candidate_0_box_1": "two",
                 "answer_candidate_1_box_0": "two", "answer_candidate_1_box_1": "three", "correct_answer": 1}
    fold = cf.read_fold(write_fold(tmp_path / "coh.csv", cf.CHARACTER_COHERENCE, [coherence]))
    assert not fold.rows and "not candidate 0 reversed" in fold.problems[0]


def test_bad_files_are_named_and_do_not_stop_the_others(tmp_path, monkeypatch):
    odd = tmp_path / "odd.csv"
    odd.write_text("book_id,page_id\n1,2\n")
    with pytest.raises(cf.ComicsFoldError, match="odd.csv: not a COMICS fold file: missing columns"):
        cf.read_fold(odd)
    both = write_fold(tmp_path / "both.csv", cf.TEXT_CLOZE, [])
    text = both.read_text().splitlines()
    both.write_text(text[0] + "," + ",".join(cf.KIND_COLUMNS[cf.CHARACTER_COHERENCE][:-1]) + "\n")
    with pytest.raises(cf.ComicsFoldError, match="cannot tell the fold kind .*both found"):
        cf.read_fold(both)
    folds, problems = cf.read_folds([str(odd), str(CLOZE_SLICE), str(tmp_path / "missing.csv")])
    assert [f.name for f in folds] == [CLOZE_SLICE.name]
    assert len(problems) == 2 and "missing.csv: no such fold file" in problems[1]
    with pytest.raises(cf.ComicsFoldError, match="no fold file could be read"):
        cf.read_folds([str(odd)])
    with pytest.raises(cf.ComicsFoldError, match="given twice"):
        cf.read_folds([str(CLOZE_SLICE), str(CLOZE_SLICE)])
    monkeypatch.setenv(cf.FOLDS_ENV, f"{CLOZE_SLICE}, {COHERENCE_SLICE}")
    assert cf.fold_paths() == [str(CLOZE_SLICE), str(COHERENCE_SLICE)] and cf.has_folds()
    assert not cf.has_folds(" , ")  # a given spec wins over the environment
    monkeypatch.delenv(cf.FOLDS_ENV)
    assert not cf.has_folds() and cf.has_folds([str(CLOZE_SLICE)])
    with pytest.raises(cf.ComicsFoldError, match="COMICS_FOLDS"):
        cf.fold_paths()


# --- importing ---------------------------------------------------------------------------------
def test_gaps_become_separate_pages_and_arrays_are_text_only(tmp_path):
    rows = [
        cloze_row(page=2, answer=4, texts=[["one", "two"], [], ["three"]], candidates=("four", "x", "y")),
        cloze_row(page=2, answer=9, candidates=("nine", "x", "y")),  # panels 6..9: a gap at 5
        cloze_row(page=0, answer=3, candidates=("z", "p0 answer", "y"), label=1),
    ]
    fold = cf.read_fold(write_fold(tmp_path / "gappy.csv", cf.TEXT_CLOZE, rows))
    encoder = FakeEncoder()
    report = ci.import_folds([fold], str(tmp_path / "s.zarr"), encoder, log=lambda _: None)
    assert (report.books, report.pages, report.source_pages, report.pages_split_at_gaps) == (1, 3, 2, 1)
    assert report.panels == 4 + 4 + 4 and report.silent_panels == 1 and report.max_panels == 4
    store = Stage3Store.open(str(tmp_path / "s.zarr"))
    comic = store.comic("7")
    assert comic.title == "7" and comic.modalities == {"fused", "text"}
    assert comic.page_ids == ["p0:0-3", "p2:1-4", "p2:6-9"]  # page order, then panel order; no 5
    features = comic.features()
    assert features.visual is None and features.caption is None
    vectors = dict(zip(["one", "two", "three", "four"], encoder.encode(["one", "two", "three", "four"])))
    page = 1  # p2:1-4
    np.testing.assert_allclose(features.fused[page, 0], (vectors["one"] + vectors["two"]) / 2, atol=2e-3)
    assert not features.text_mask[page, 1].any() and not features.fused[page, 1].any()  # silent panel
    np.testing.assert_allclose(features.text[page, 3, 0], vectors["four"], atol=2e-3)  # the answer
    assert features.text_mask[page].sum(1).tolist() == [2, 0, 1, 1]


def test_conflicting_observations_are_reported(tmp_path):
    rows = [cloze_row(answer=4, texts=[["a"], ["b"], ["c"]], candidates=("d", "x", "y")),
            cloze_row(answer=5, texts=[["B!"], ["c"], ["d"]], candidates=("e", "x", "y"))]
    fold = cf.read_fold(write_fold(tmp_path / "c.csv", cf.TEXT_CLOZE, rows))
    panels, conflicts = ci.collect_panels(fold.rows)
    assert panels[("7", 0, 2)] == ("b",)
    assert len(conflicts) == 1 and "c.csv:3: book 7 page 0 panel 2" in conflicts[0]
    rows[0]["answer_candidate_0_text"] = "not d"  # the answer disagrees with its context cells
    fold = cf.read_fold(write_fold(tmp_path / "c.csv", cf.TEXT_CLOZE, rows))
    panels, conflicts = ci.collect_panels(fold.rows)
    assert panels[("7", 0, 4)] == ("d",) and "answer panel 4 reads ['not d']" in conflicts[1]


def test_runs_of_consecutive_panels():
    assert ci.runs_of([0, 1, 2, 5, 6, 9], 16) == [[0, 1, 2], [5, 6], [9]]
    assert ci.runs_of(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_comic_name_of_book():
    assert ci.comic_name_of_book("2946") == "2946"
    # any book id is kept as the name; the store derives distinct keys
    assert ci.comic_name_of_book("Action Comics #1 (1938)") == "Action Comics #1 (1938)"
    assert comic_key("Action Comics #1 (1938)") != comic_key("Action Comics #1 (1939)")
    with pytest.raises(Stage3StoreError, match="cannot name a comic"):
        ci.comic_name_of_book("  ")
