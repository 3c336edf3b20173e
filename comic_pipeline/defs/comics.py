"""COMICS (DESIGN §9): the trained sequence_model scores COMICS's own candidate rows of the test
books, verbatim, beside the published numbers, label-free baselines and a learned option-only
baseline. The graph runs on a text-only Stage 3 store imported from the fold files
(`python -m comic_pipeline.comics_run` imports it and points the stage3 resource at it)."""


import json
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import dagster as dg
import numpy as np
from pydantic import Field

from comic_pipeline import fileio, schema
from comic_pipeline.comics_folds import FOLDS_ENV, ComicsFoldError, fold_paths, has_folds, read_folds
from comic_pipeline.defs.datasets import load_task_datasets, read_splits
from comic_pipeline.defs.keys import COMIC_SPLITS, COMICS_EVALUATION, SEQUENCE_MODEL, UNSEEN_TEST_BOOKS_CHECK
from comic_pipeline.defs.refs import ModelRef, SplitsRef
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, Stage3StoreResource, TorchDevice
from comic_pipeline.text_encoder import TextEncoder, TextEncoderError

if TYPE_CHECKING:  # torch: imported by the step, not with the definitions
    from comic_pipeline import comics_eval

RESULTS = ("comics_evaluation.json",)  # under the home: the table and rows, for comics_run


class ComicsEvaluationConfig(dg.Config):
    folds: Optional[str] = Field(default=None, description=f"Comma-separated COMICS fold files "
                                 f"(text cloze or character coherence, detected); default ${FOLDS_ENV}. "
                                 "Use the files the Stage 3 store was imported from: rows of books "
                                 "not in the store are not scored.")
    limit: Optional[int] = Field(default=None, description="Read only the first N rows of each file.")
    seed: int = Field(default=0, description="Seed of tie-breaking and the option-only baseline.")
    encoder_device: str = Field(default="cpu", description="Device of the sentence encoder (rows "
                                "not in the home's text cache are encoded).")


@dg.asset(
    key=COMICS_EVALUATION,
    group_name="comics",
    ins={"model_ref": dg.AssetIn(SEQUENCE_MODEL), "comic_splits": dg.AssetIn(COMIC_SPLITS)},
    check_specs=[dg.AssetCheckSpec(
        UNSEEN_TEST_BOOKS_CHECK, asset=COMICS_EVALUATION, blocking=True,
        description="Blocking: every task dataset the model trained on was generated from these "
        "comic_splits, and no train or val sample of any of them touches a test comic (its page, "
        "its options, its caption or visual panel): no text of a scored book reached training.",
    )],
    description=(
        "COMICS's own candidate rows of the test books (the test comics of comic_splits), scored "
        "verbatim by the sequence_model version it receives, per fold file: accuracy with a 95% "
        "interval by book bootstrap, n rows and books, beside the published rows (Iyyer et al. "
        "2017), label-free baselines on the same rows and the learned option-only baseline, with "
        "the caveats (dev books, few training books, frozen text encoder, text only). Needs the "
        "graph to run on a COMICS store (COMIC_STAGE3_STORE or `python -m "
        "comic_pipeline.comics_run`). Figures and table are logged to the model's MLflow run."
    ),
)
def comics_evaluation(
    context: dg.AssetExecutionContext,
    config: ComicsEvaluationConfig,
    stage3: Stage3StoreResource,
    storage: PipelineStorage,
    torch_device: TorchDevice,
    mlflow_tracking: MLflowTracking,
    model_ref: ModelRef,
    comic_splits: SplitsRef,
) -> dg.MaterializeResult:
    if not has_folds(config.folds):
        # the demo corpus and most Stage 3 stores are not COMICS: "Materialize all" goes on
        reason = (f"nothing scored: no COMICS fold files (launch config `folds` or ${FOLDS_ENV}); "
                  "run the graph on a COMICS store with `python -m comic_pipeline.comics_run` or `make comics`")
        context.log.info(reason)
        return dg.MaterializeResult(
            metadata={"skipped": reason, "model_version": model_ref.version},
            check_results=[dg.AssetCheckResult(check_name=UNSEEN_TEST_BOOKS_CHECK, passed=True,
                                               metadata={"note": "no COMICS rows scored"})],
        )
    from comic_pipeline import comics_eval

    torch_device.configure()  # CPU threads; scoring a few thousand rows runs on the CPU
    try:
        folds, file_problems = read_folds(fold_paths(config.folds), limit=config.limit)
        encoder = TextEncoder(storage.root(), device=config.encoder_device)
    except (ComicsFoldError, TextEncoderError) as error:
        raise dg.Failure(str(error)) from error
    for problem in file_problems:
        context.log.warning(f"fold file left out: {problem}")
    store = stage3.open()
    split_of_comic = read_splits(storage, comic_splits)
    split_of_name = {store.name_of(comic_id): split for comic_id, split in split_of_comic.items()}
    check = _unseen_test_books(storage, model_ref, comic_splits, split_of_comic)

    tracking = mlflow_tracking.tracking()
    model = tracking.load_model(model_ref.version, run_id=model_ref.run_id)
    skipped = {name: ref.skipped for name, ref in model_ref.datasets.items() if ref.skipped}
    outcomes, notes = comics_eval.comics_outcomes(folds, split_of_name, encoder, model,
                                                  model_ref.trained_tasks(), skipped, seed=config.seed)
    rows = comics_eval.summarize(outcomes)
    table = comics_eval.comics_table(rows, notes)
    context.log.info("COMICS: the test books' own candidate rows, scored verbatim\n" + table)
    _publish(storage, tracking, model_ref, folds, rows, table, notes, encoder)
    model_rows = {r.fold: r for r in rows if r.group == "model"}
    return dg.MaterializeResult(
        metadata={
            "table": dg.MetadataValue.md(_markdown(rows, notes)),
            "model_version": model_ref.version,
            "mlflow_run_id": model_ref.run_id,
            "folds": dg.MetadataValue.json([{"file": f.name, "kind": f.kind, "rows": len(f.rows),
                                             "books": len(f.books), "sha256_verified": f.verified}
                                            for f in folds]),
            **{f"accuracy {fold}": round(float(r.accuracy), 4) for fold, r in model_rows.items()},
            "test_books": sum(1 for s in split_of_comic.values() if s == "test"),
            "encoded_strings": encoder.stats.encoded,
        },
        check_results=[check],
    )


def _unseen_test_books(storage, model_ref: ModelRef, comic_splits: SplitsRef,
                       split_of: dict[str, str]) -> dg.AssetCheckResult:
    test = {comic_id for comic_id, split in split_of.items() if split == "test"}
    other_splits = sorted({ref.splits_fingerprint for ref in model_ref.datasets.values()}
                          - {comic_splits.fingerprint})
    datasets, _ = load_task_datasets(storage, model_ref.datasets)
    touched = {name: sorted(comics_read_by(dataset, ("train", "val")) & test)
               for name, dataset in datasets.items()}
    touched = {name: comics for name, comics in touched.items() if comics}
    return dg.AssetCheckResult(
        asset_key=COMICS_EVALUATION, check_name=UNSEEN_TEST_BOOKS_CHECK,
        passed=not other_splits and not touched,
        metadata={"test_comics": len(test), "datasets_checked": len(datasets),
                  "other_splits_fingerprints": ", ".join(other_splits) or "none",
                  "test_comics_in_training": json.dumps(touched) if touched else "none"},
    )


def comics_read_by(dataset: schema.TaskDataset, splits) -> set[str]:
    """Every comic a sample of `splits` reads: its page and any panel it refers to."""
    comics = set()
    for split in splits:
        samples = dataset.splits.get(split)
        if samples is None or not len(samples):
            continue
        rows = [samples.page]
        for name in ("options", "option_visual", "caption_of"):  # flat panel refs
            refs = getattr(samples, name, None)
            if refs is not None:
                rows.append(np.asarray(refs).reshape(-1) // dataset.max_panels)
        comics.update(str(c) for c in dataset.comic_ids[np.unique(np.concatenate(rows))])
    return comics


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _markdown(rows: "list[comics_eval.ScoreRow]", notes: list[str]) -> str:
    from comic_pipeline import comics_eval

    lines = []
    for fold in dict.fromkeys(r.fold for r in rows):
        ours = [r for r in rows if r.fold == fold]
        column = comics_eval.COLUMN[ours[0].kind]
        lines += [f"**{fold}** ({ours[0].kind}; published column `{column}`)", "",
                  "| method | accuracy % | 95% CI (books) | rows | books |", "|---|---|---|---|---|"]
        lines += [f"| {r.group}: {r.method} | {100 * r.accuracy:.1f} | {100 * r.low:.1f}–{100 * r.high:.1f} "
                  f"| {r.n_rows} | {r.n_books} |" for r in ours]
        lines += [f"| published (Iyyer et al. 2017): {model} | {columns[column]:.1f} | | test fold | |"
                  for model, columns in comics_eval.PUBLISHED.items() if columns[column] is not None]
        lines.append("")
    lines += ["**Caveats**", ""] + [f"- {note}" for note in (*comics_eval.CAVEATS, *notes)]
    return "\n".join(lines)


def _publish(storage, tracking, model_ref: ModelRef, folds, rows, table: str, notes, encoder) -> None:
    """The table and rows into the home (comics_run prints them) and into the model's MLflow run."""
    results = {"model_version": model_ref.version, "mlflow_run_id": model_ref.run_id,
               "table": table, "notes": notes, "rows": [asdict(r) for r in rows],
               "folds": [{"file": f.name, "kind": f.kind, "rows": len(f.rows), "sha256": f.sha256,
                          "verified": f.verified} for f in folds],
               "encoder": {"encoded": encoder.stats.encoded, "strings_per_s": encoder.stats.strings_per_s}}
    payload = json.dumps(results, indent=2, default=float).encode()
    fileio.atomic_write_bytes(storage.path(*RESULTS), payload)
    tracking.log_metrics(model_ref.run_id, {
        f"comics_{_slug(r.fold)}_{_slug(r.group + ' ' + r.method)}"[:250]: r.accuracy for r in rows})
    with tempfile.TemporaryDirectory() as folder:
        for name, data in (("comics_table.txt", table.encode()), ("comics_results.json", payload)):
            (Path(folder) / name).write_bytes(data)
            tracking.log_artifact(model_ref.run_id, str(Path(folder) / name), "comics")
