"""`make comics`: COMICS folds -> text-only Stage 3 store -> the asset graph -> the COMICS table.

    python -m comic_pipeline.comics_run --folds a.csv,b.csv   (or COMICS_FOLDS=a.csv,b.csv)

Imports the fold files into a text-only Stage 3 store (comics_import; the text cache makes a
second run encode nothing), then materializes the graph's real definitions on that store through
Dagster, in the store's own home (default ``$COMIC_PIPELINE_HOME/comics``: Dagster instance,
refs, task datasets, MLflow): stage3_store, stage3_panel_embeddings (a bad comic is quarantined and
left out), comic_splits, tasks/* (a task the text-only store cannot feed is skipped with its
reason), sequence_model, comics_evaluation (the test books' own rows), then evaluation/* for the
internal figures; prints the COMICS table. `--kfold k` trains k models by book with the same
domain functions outside Dagster (the graph holds one split).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import asdict

import dagster as dg
import numpy as np

from comic_pipeline import comics_eval, fileio, home, inference, metrics, schema, tasks, training
from comic_pipeline.comics_folds import ComicsFoldError, fold_paths, read_folds
from comic_pipeline.comics_import import import_folds
from comic_pipeline.definitions import defs as load_defs
from comic_pipeline.defs.comics import RESULTS as COMICS_RESULTS
from comic_pipeline.defs.keys import (
    COMIC_SPLITS, COMICS_EVALUATION, EVALUATION_KEYS, EVALUATION_SUMMARY, SEQUENCE_MODEL, TASK_KEYS,
)
from comic_pipeline.defs.resources import PipelineStorage, Stage3StoreResource, TorchDevice, build_resources
from comic_pipeline.demo import materialize, validate_store_comics
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
    parser.add_argument("--match-similarity", action=argparse.BooleanOptionalAction, default=False,
                        help="similarity-matched distractors in the generated training tasks (default "
                        "off: on real comics a line's likeness to its context is content, and a model "
                        "trained on matched distractors learns to ignore it; slot matching stays on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoder-device", default="cpu")
    parser.add_argument("--kfold", type=int, default=0,
                        help="k-fold by book (e.g. 5): k trainings, every row scored once by a model "
                             "that never saw its book; 0 = the graph's own split")
    parser.add_argument("--internal", action=argparse.BooleanOptionalAction, default=True,
                        help="materialize evaluation/* for the internal figures of the generated tasks")
    return parser.parse_args(argv)


def task_config(args: argparse.Namespace) -> tasks.TaskConfig:
    """The generated tasks' settings of this run, the same in the graph and in k-fold."""
    return tasks.TaskConfig(seed=args.seed, samples_per_page=args.samples_per_page,
                            match_similarity=args.match_similarity)


def run(args: argparse.Namespace, log=print) -> dict:
    started = time.perf_counter()
    root = comics_home(args.home)
    store_url = fileio.join(root, "stage3_comics.zarr")
    folds, report, encoder = import_store(args, root, store_url, log)
    if args.kfold:
        summary = run_kfold(args, root, store_url, folds, encoder, log)
    else:
        summary = run_graph(args, root, store_url, folds, log)
    summary = {"import": {k: v for k, v in report.to_dict().items() if k != "conflicts"}, **summary,
               "encoder": {"encoded": encoder.stats.encoded, "strings_per_s": encoder.stats.strings_per_s},
               "seconds": time.perf_counter() - started}
    fileio.atomic_write_bytes(fileio.join(root, "comics_results.json"),
                              json.dumps(summary, indent=2, default=_jsonable).encode())
    return summary


def import_store(args, root: str, store_url: str, log):
    """Steps 1-2: the fold files, then the text-only Stage 3 store (the text cache makes a second
    import encode nothing)."""
    folds, file_problems = read_folds(fold_paths(args.folds), limit=args.limit)
    for problem in file_problems:
        log(f"[comics] FOLD FILE LEFT OUT: {problem}")
    for fold in folds:
        state = {True: "sha256 verified", None: "no published checksum for this name"}[fold.verified]
        log(f"[comics] {fold.name}: {fold.kind}, {len(fold.rows)} rows of {len(fold.books)} books "
            f"({state}); {len(fold.problems)} rows skipped")
        for problem in fold.problems[:10]:
            log(f"[comics]   skipped {problem}")
    encoder = TextEncoder(root, device=args.encoder_device)
    report = import_folds(folds, store_url, encoder, report_url=fileio.join(root, "comics_import.json"),
                          log=log)
    log(f"[comics] store {store_url}: {report.books} books, {report.pages} pages (runs of consecutive "
        f"panels from {report.source_pages} source pages; {report.pages_split_at_gaps} split at "
        f"gaps), {report.panels} panels ({report.silent_panels} without text), {report.boxes} boxes, "
        f"max_panels {report.max_panels}; {len(report.conflicts)} conflicting observations")
    return folds, report, encoder


# The graph after validation: splits -> tasks -> training -> the COMICS evaluation, in one run.
COMICS_GRAPH = dg.AssetSelection.assets(COMIC_SPLITS, *TASK_KEYS.values(), SEQUENCE_MODEL, COMICS_EVALUATION)
INTERNAL = dg.AssetSelection.assets(*EVALUATION_KEYS.values(), EVALUATION_SUMMARY)  # not the champion


class GraphRunError(RuntimeError):
    """A run of the graph failed; Dagster's log above names the step and the error."""


def run_graph(args, root: str, store_url: str, folds, log) -> dict:
    """Steps 3-8 through Dagster: the real definitions, the home's resources with the stage3
    resource on the COMICS store, the home's own Dagster instance (`<home>/dagster`): validation
    (stage3_panel_embeddings), comic_splits, tasks/*, sequence_model (MLflow in the home),
    comics_evaluation; then evaluation/* for the internal figures (their gates may fail on a
    small model: reported, not fatal)."""
    storage = PipelineStorage(home=root)
    stage3 = Stage3StoreResource(storage=storage, url=store_url)
    resources = {**build_resources(storage), "stage3": stage3, "torch_device": TorchDevice(device=args.device)}
    training = {"preset": args.preset, "epochs": args.epochs, "batch_size": args.batch_size,
                "seed": args.seed, "log_every": 100,
                **({"max_steps": args.max_steps} if args.max_steps is not None else {})}
    run_config = {"ops": {
        "task_datasets": {"config": {name: value for name, value in vars(task_config(args)).items()
                                     if name in ("seed", "samples_per_page", "match_similarity")}},
        "sequence_model": {"config": training},
        "comics_evaluation": {"config": {"folds": ",".join(f.path for f in folds), "limit": args.limit,
                                         "seed": args.seed, "encoder_device": args.encoder_device}},
    }}
    definitions = load_defs()
    instance_dir = os.path.join(root, "dagster")  # a Dagster instance is a local folder
    os.makedirs(instance_dir, exist_ok=True)
    with dg.DagsterInstance.local_temp(instance_dir) as instance:
        step = functools.partial(materialize, definitions, instance=instance, resources=resources,
                                 log=log, prefix="comics")
        # the instance mirrors the store: a comic of an earlier import that is gone is unregistered
        if not validate_store_comics(definitions, instance, stage3, resources=resources, log=log,
                                     prefix="comics", prune=True):
            raise GraphRunError("validating the store's comics failed")
        if not step(COMICS_GRAPH, label="comic_splits -> tasks -> sequence_model -> comics_evaluation",
                    run_config=run_config).success:
            raise GraphRunError("the graph run failed")
        gates = args.internal and step(INTERNAL, label="evaluation/* (internal figures; FAILED = a gate failed "
                                       "or a step: see the log)", run_config={
            "ops": {"evaluation_assets": {"config": {"seed": args.seed}}}}).success
        event = instance.get_latest_materialization_event(SEQUENCE_MODEL)
        trained = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    io_manager = resources["io_manager"]
    model_ref = io_manager.stored(SEQUENCE_MODEL)
    internal = io_manager.stored(EVALUATION_SUMMARY) if args.internal else None
    if internal and internal.model.version != model_ref.version:  # its run failed: an older report
        internal = None
    with fileio.open_binary(storage.path(*COMICS_RESULTS)) as handle:
        comics = json.loads(handle.read())
    if internal:
        log("\nInternal figures on the generated tasks (test books; no published number"
            + ("" if gates else "; some blocking gates failed") + "):")
    for task, report in (internal.tasks.items() if internal else ()):
        if report.skipped is None:
            log(f"  {task}: " + ", ".join(f"{k} {report.metrics[k]:.3f}" for k in INTERNAL_FIGURES
                                          if k in report.metrics))
    log("\nCOMICS: the test books' own candidate rows, scored verbatim" + comics["table"])
    skipped = {name: ref.skipped for name, ref in model_ref.datasets.items() if ref.skipped}
    return {"splits": dict(io_manager.stored(COMIC_SPLITS).counts), "skipped_tasks": skipped,
            "training": {"tasks": model_ref.trained_tasks(), "model_version": model_ref.version,
                         **{k: trained.get(k) for k in ("steps", "train_seconds", "best_epoch",
                                                        "samples_per_s", "unchanged")}},
            "internal": {t: dict(r.metrics) for t, r in (internal.tasks.items() if internal else ())},
            "comics": comics["rows"], "notes": comics["notes"]}


INTERNAL_FIGURES = ("accuracy", "chance", "best_shortcut", "kendall_tau", "exact_match")


def run_kfold(args, root: str, store_url: str, folds, encoder, log) -> dict:
    """k-fold by book, domain-level (k trainings on one store; the graph has one split): every row
    is scored once by a model that never saw its book."""
    # validation (stage3_panel_embeddings): a bad comic is left out, the others go on
    store = Stage3Store.open(store_url)
    valid = []
    for comic_id in store.comic_ids():
        try:
            store.comic(comic_id).validate()
            valid.append(comic_id)
        except Stage3StoreError as error:
            log(f"[comics] comic {comic_id!r} left out: {error}")
    features = store.load_features(valid)
    outcomes, notes, parts = [], [], []
    for i in range(args.kfold):
        label, split_of = f"fold {i + 1}/{args.kfold}", comics_eval.kfold_splits(valid, args.kfold, i)
        log(f"[comics] {label}: books per split "
            f"{ {s: sum(1 for c in valid if split_of[c] == s) for s in schema.SPLITS} }")
        part = train_and_score(args, root, label, features, split_of, folds, encoder, log)
        outcomes += part.pop("outcomes")
        notes += [f"{label}: {note}" for note in part.pop("notes")]
        parts.append(part)
    score_rows = comics_eval.summarize(outcomes)
    for part in parts:
        log(f"\nInternal figures on the generated tasks, {part['label']} (test books; no published number):")
        for task, figures in part["internal"].items():
            log(f"  {task}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in figures.items()))
    log("\nCOMICS: the test books' own candidate rows, scored verbatim (k-fold by book)"
        + comics_eval.comics_table(score_rows, notes))
    return {"parts": parts, "splits": parts[0]["splits"], "skipped_tasks": parts[0]["skipped_tasks"],
            "training": parts[0]["training"], "comics": [asdict(r) for r in score_rows], "notes": notes}


def train_and_score(args, root, label, features, split_of, folds, encoder, log) -> dict:
    """Steps 5-8 for one split: task datasets, training, internal figures, COMICS outcomes."""
    counts = {s: sum(1 for c in split_of.values() if c == s) for s in schema.SPLITS}
    # 5. task datasets (tasks/*)
    config = task_config(args)
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
    except (ComicsFoldError, TextEncoderError, Stage3StoreError, GraphRunError) as error:
        print(f"[comics] error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
