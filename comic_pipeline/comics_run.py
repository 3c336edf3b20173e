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
from comic_pipeline.comics_import import import_folds
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
    outcomes, notes = comics_eval.comics_outcomes(folds, split_of, encoder, result.model, result.tasks,
                                                   skipped, seed=args.seed)
    return {"label": label, "splits": counts, "skipped_tasks": skipped, "internal": internal,
            "training": {"steps": result.steps, "seconds": train_seconds, "best_epoch": result.best_epoch,
                         "tasks": list(result.tasks), "samples_per_s": result.samples_per_s,
                         "config": train_config.to_dict()},
            "outcomes": outcomes, "notes": notes}


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


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
