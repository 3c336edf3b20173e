"""A plain-text summary of what the pipeline has produced (printed by `make demo`): the refs the
asset edges carried (read from the IO manager's store) and the Stage 3 store's record."""


import math

import dagster as dg

from comic_pipeline import schema
from comic_pipeline.defs.keys import (
    CHAMPION_MODEL, CONTEXTUALIZED_EMBEDDINGS, EVALUATION_SUMMARY, SEQUENCE_MODEL, STAGE3_STORE, TASK_KEYS,
)
from comic_pipeline.defs.refs import EvaluationReport, ModelRef
from comic_pipeline.defs.resources import RefIOManager


def materialization_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict:
    """Metadata values of `key`'s latest materialization (for display only), or {} when none."""
    event = instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        return {}
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}


def summary_table(instance: dg.DagsterInstance, io_manager: RefIOManager) -> str:
    lines = ["", "comic_pipeline summary", "=" * 22]
    store = materialization_metadata(instance, STAGE3_STORE)
    if store:
        lines.append(f"Stage 3 store: {store.get('comics')} comics, dim {store.get('dim')}, "
                     f"modalities {store.get('modalities')} ({store.get('layout')})")
    report: EvaluationReport | None = io_manager.stored(EVALUATION_SUMMARY)
    header = f"{'task':<20} {'test n':>7} {'accuracy':>9} {'95% CI':>15} {'chance':>7} {'shortcut':>9}"
    lines += ["", header, "-" * len(header)]
    for name in schema.TASK_NAMES:
        task = io_manager.stored(TASK_KEYS[name])
        result = report.tasks.get(name) if report else None
        skipped = (task.skipped if task else None) or (result.skipped if result else None)
        if skipped:
            lines.append(f"{name:<20} skipped: {skipped}")
        elif result:
            m = result.metrics
            lines.append(
                f"{name:<20} {int(m['n_samples']):>7} {m['accuracy']:>9.3f} "
                f"{'[%.3f, %.3f]' % (m['accuracy_ci_low'], m['accuracy_ci_high']):>15} "
                f"{m['chance']:>7.3f} {m['best_shortcut']:>9.3f}"
            )
        else:
            lines.append(f"{name:<20} {'not evaluated':>7}")
    model: ModelRef | None = io_manager.stored(SEQUENCE_MODEL)
    champion: ModelRef | None = io_manager.stored(CHAMPION_MODEL)
    if model:
        training = materialization_metadata(instance, SEQUENCE_MODEL)
        lines += ["", f"sequence_model: version {model.version} (MLflow run {model.run_id}), "
                      f"{training.get('epochs_run')} epochs, {training.get('train_seconds')} s"]
    lines.append(f"champion: {champion.version if champion else 'none'}")
    if report and report.strip:
        lines.append("strip embeddings: " + ", ".join(
            f"{k} {v:.3f}" for k, v in report.strip.items() if not math.isnan(v)))
    materialized = instance.get_materialized_partitions(CONTEXTUALIZED_EMBEDDINGS)
    lines.append(f"contextualized embeddings: {len(materialized)} comics")
    return "\n".join(lines)
