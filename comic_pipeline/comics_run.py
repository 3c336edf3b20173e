"""`make comics`: COMICS folds -> text-only Stage 3 store -> the graph's domain steps -> the table.

    python -m comic_pipeline.comics_run --folds a.csv,b.csv   (or COMICS_FOLDS=a.csv,b.csv)

Steps, each the domain function a Dagster asset of the graph calls: import (the store), validate
every comic (stage3_panel_embeddings; a bad comic is reported and left out), book-level splits
(comic_splits), the task datasets (tasks/*; a task the text-only store cannot feed is skipped
with its reason), training (sequence_model), test-split figures of the generated tasks
(evaluation/*), then the COMICS evaluation of the test books' own rows (comics_eval). Everything
lands in its own home (default ``$COMIC_PIPELINE_HOME/comics``); the text cache makes a second
run encode nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import numpy as np

from comic_pipeline import comics_eval, fileio, home, inference, metrics, schema, tasks, training
from comic_pipeline.comics_folds import ComicsFoldError, fold_paths, read_folds
from comic_pipeline.comics_import import comic_name_of_book, import_folds
from comic_pipeline.store import Stage3Store, Stage3StoreError
from comic_pipeline.text_encoder import TextEncoder, TextEncoderError
from comic_pipeline.train_config import TrainConfig


def comics_home(base: str | None = None) -> str:
    return base or fileio.join(home.default_home(), "comics")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", help="comma-separated COMICS fold files (default: $COMICS_FOLDS)")
    parser.add_argument("--home", help="where the store, text cache, checkpoints and results go")
    parser.add_argument("--limit", type=int, help="read only the first N rows of each fold file")
    parser.add_argument("--preset", default="demo", help="model size: tiny | demo | full")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples-per-page", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoder-device", default="cpu")
    parser.add_argument("--kfold", type=int, default=0,
                        help="k-fold by book (e.g. 5): k trainings, every row scored once by a model "
                             "that never saw its book; 0 = the graph's own split")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, log=print) -> dict:
    started = time.perf_counter()
    root = comics_home(args.home)
    store_url = fileio.join(root, "stage3_comics.zarr")

    # 1. the folds
    folds, file_problems = read_folds(fold_paths(args.folds), limit=args.limit)
    for problem in file_problems:
        log(f"[comics] FOLD FILE LEFT OUT: {problem}")
    for fold in folds:
        state = {True: "sha256 verified", None: "no published checksum for this name"}[fold.verified]
        log(f"[comics] {fold.name}: {fold.kind}, {len(fold.rows)} rows of {len(fold.books)} books "
            f"({state}); {len(fold.problems)} rows skipped")
        for problem in fold.problems[:10]:
            log(f"[comics]   skipped {problem}")

    # 2. the text-only Stage 3 store
    encoder = TextEncoder(root, device=args.encoder_device)
    report = import_folds(folds, store_url, encoder, report_url=fileio.join(root, "comics_import.json"),
                          log=log)
    log(f"[comics] store {store_url}: {report.books} books, {report.pages} pages (runs of consecutive "
        f"panels from {report.source_pages} source pages; {report.pages_split_at_gaps} split at "
        f"gaps), {report.panels} panels ({report.silent_panels} without text), {report.boxes} boxes, "
        f"max_panels {report.max_panels}; {len(report.conflicts)} conflicting observations")

    # 3. validation (stage3_panel_embeddings): a bad comic is left out, the others go on
    store = Stage3Store.open(store_url)
    valid = []
    for comic_id in store.comic_ids():
        try:
            store.comic(comic_id).validate()
            valid.append(comic_id)
        except Stage3StoreError as error:
            log(f"[comics] comic {comic_id!r} left out: {error}")

    features = store.load_features(valid)
    if args.kfold:
        parts = [(f"fold {i + 1}/{args.kfold}", comics_eval.kfold_splits(valid, args.kfold, i))
                 for i in range(args.kfold)]
    else:  # 4. book-level splits, exactly as the comic_splits asset assigns them
        parts = [("graph split", tasks.assign_splits(valid))]
    outcomes, notes, parts_summary = [], [], []
    for label, split_of in parts:
        log(f"[comics] {label}: books per split "
            f"{ {s: sum(1 for c in valid if split_of[c] == s) for s in schema.SPLITS} }")
        part = train_and_score(args, root, label, features, split_of, folds, encoder, log)
        outcomes += part.pop("outcomes")
        notes += [f"{label}: {note}" if args.kfold else note for note in part.pop("notes")]
        parts_summary.append(part)
    score_rows = comics_eval.summarize(outcomes)
    table = comics_eval.comics_table(score_rows, notes)
    for part in parts_summary:
        log(f"\nInternal figures on the generated tasks, {part['label']} (test books; no published number):")
        for task, figures in part["internal"].items():
            log(f"  {task}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in figures.items()))
    log("\nCOMICS: the test books' own candidate rows, scored verbatim" + table)
    summary = {
        "import": {k: v for k, v in report.to_dict().items() if k != "conflicts"},
        "parts": parts_summary, "splits": parts_summary[0]["splits"],
        "skipped_tasks": parts_summary[0]["skipped_tasks"], "training": parts_summary[0]["training"],
        "comics": [asdict(r) for r in score_rows], "notes": notes,
        "encoder": {"encoded": encoder.stats.encoded, "strings_per_s": encoder.stats.strings_per_s},
        "seconds": time.perf_counter() - started,
    }
    fileio.atomic_write_bytes(fileio.join(root, "comics_results.json"),
                              json.dumps(summary, indent=2, default=_jsonable).encode())
    return summary


def train_and_score(args, root, label, features, split_of, folds, encoder, log) -> dict:
    """Steps 5-8 for one split: task datasets, training, internal figures, COMICS outcomes."""
    counts = {s: sum(1 for c in split_of.values() if c == s) for s in schema.SPLITS}
    # 5. task datasets (tasks/*)
    config = tasks.TaskConfig(seed=args.seed, samples_per_page=args.samples_per_page)
    datasets, skipped = {}, {}
    for task in schema.TASK_NAMES:
        try:
            datasets[task] = tasks.generate_task(task, features, split_of, config)
        except tasks.TaskSkipped as skip:
            skipped[task] = skip.reason
            log(f"[comics] task {task} skipped: {skip.reason}")
    for task, dataset in datasets.items():
        log(f"[comics] task {task}: samples {dataset.attrs['samples']}")

    # 6. training (sequence_model)
    train_config = TrainConfig.from_preset(args.preset, epochs=args.epochs, max_steps=args.max_steps,
                                                    batch_size=args.batch_size, seed=args.seed, log_every=100)
    trainable = {t: d for t, d in datasets.items() if d.n_samples("train") > 0}
    train_started = time.perf_counter()
    checkpoints = fileio.join(root, "checkpoints", label.replace(" ", "-").replace("/", "of"))
    result = training.train(train_config, trainable, features, device=args.device,
                            checkpoint_dir=checkpoints, log=log)
    train_seconds = time.perf_counter() - train_started
    log(f"[comics] trained {result.steps} steps in {train_seconds:.0f} s "
        f"({result.samples_per_s:,.0f} samples/s), best epoch {result.best_epoch}")

    # 7. internal figures on the generated tasks' test split (evaluation/*)
    internal = {}
    for task in result.tasks:
        outputs = inference.predict(result.model, datasets[task], features, "test", device=args.device)
        if tasks.spec_of(task).family == "order":
            internal[task] = metrics.reading_order_report(outputs["predicted_order"], outputs["true_order"])
            internal[task]["chance_exact"] = datasets[task].attrs.get("chance")
        elif len(outputs["label"]):
            internal[task] = {"accuracy": float((outputs["prediction"] == outputs["label"]).mean()),
                              "chance": datasets[task].attrs["chance"], "n": int(len(outputs["label"]))}

    # 8. the COMICS evaluation of the test books' own rows
    outcomes, notes = comics_outcomes(folds, split_of, encoder, result, skipped, seed=args.seed)
    return {"label": label, "splits": counts, "skipped_tasks": skipped, "internal": internal,
            "training": {"steps": result.steps, "seconds": train_seconds, "best_epoch": result.best_epoch,
                         "tasks": list(result.tasks), "samples_per_s": result.samples_per_s,
                         "config": train_config.to_dict()},
            "outcomes": outcomes, "notes": notes}


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def comics_outcomes(folds, split_of_comic, encoder, result, skipped, *, seed=0):
    """Per-row outcomes on the test books of every fold file: the model (when its head was
    trained), the label-free heuristics, the learned option-only baseline."""
    all_rows = [row for fold in folds for row in fold.rows]
    books = sorted({row.book_id for row in all_rows})
    split_of = {b: split_of_comic.get(comic_name_of_book(b), "left out") for b in books}
    texts = comics_eval.book_texts(all_rows)
    test_texts = set().union(*(texts[b] for b in books if split_of[b] == "test"))
    train_texts = set().union(*(texts[b] for b in books if split_of[b] == "train"))
    outcomes, notes = [], []
    for fold in folds:
        test = [r for r in fold.rows if split_of[r.book_id] == "test"]
        if not test:
            notes.append(f"{fold.name}: no row of a test book; nothing scored")
            continue
        arrays = comics_eval.row_arrays(test, encoder)
        task = comics_eval.MODEL_TASK[fold.kind]
        if task in result.tasks:
            scores = comics_eval.model_option_scores(result.model, arrays)
            outcomes.append(comics_eval.scored(fold.name, arrays, f"ours ({task} head, text only)",
                                                    scores.argmax(1), "model"))
            notes.extend(error_examples(arrays, scores.argmax(1)))
        else:
            why = skipped.get(task, "no train samples")
            notes.append(f"{fold.name}: the model has no trained {task} head ({why}), so no model row")
        for name, predictions in comics_eval.baseline_predictions(arrays, seed=seed).items():
            outcomes.append(comics_eval.scored(fold.name, arrays, name, predictions, "label-free"))
        train_rows, dropped = comics_eval.training_rows(fold.rows, split_of, test_texts)
        if train_rows:
            train_arrays = comics_eval.row_arrays(train_rows, encoder)
            predictions = comics_eval.option_only_predictions(train_arrays, arrays, seed=seed)
            outcomes.append(comics_eval.scored(fold.name, arrays, "learned option-only (MLP, no context)",
                                                    predictions, "option-only"))
        answers_seen = np.mean([any(s in train_texts for s in r.answer_boxes) for r in test])
        notes.append(f"{fold.name}: {len(test)} test rows of {len(set(r.book_id for r in test))} test books; "
                     f"option-only trained on {len(train_rows)} train-book rows ({dropped} dropped for "
                     f"quoting test-book text); {100 * answers_seen:.1f}% of test answers also occur "
                     "verbatim in train books (common phrases: 'UNK !' ...)")
    return outcomes, notes


def _short(boxes, width: int = 48) -> str:
    text = " / ".join(boxes) or "(no text)"
    return text if len(text) <= width else text[:width - 1] + "…"


def error_examples(arrays: comics_eval.RowArrays, predictions, n: int = 3) -> list[str]:
    """A few rows the model gets wrong, as notes: where, the context, what it picked, the truth."""
    wrong = np.flatnonzero(np.asarray(predictions) != arrays.labels)[:n]
    return [f"model error {row.source}:{row.line} (book {row.book_id}): context "
            f"[{' | '.join(_short(b, 32) for b in row.context_boxes)}] picked "
            f"'{_short(row.candidates[predictions[i]])}', true '{_short(row.answer_boxes)}'"
            for i, row in ((i, arrays.rows[i]) for i in wrong)]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ComicsFoldError, TextEncoderError, Stage3StoreError) as error:
        print(f"[comics] error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
