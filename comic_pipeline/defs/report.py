"""A plain-text summary of what the pipeline has produced, read from the instance's records."""


import dagster as dg

from comic_pipeline import schema
from comic_pipeline.defs.evaluation import EVALUATION_KEYS
from comic_pipeline.defs.lineage import latest_metadata
from comic_pipeline.defs.tasks import TASK_KEYS


def _metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict:
    """The latest metadata of `key`, or nothing yet: a summary reports what exists so far."""
    try:
        return dict(latest_metadata(instance, key))
    except dg.Failure:
        return {}


def summary_table(instance: dg.DagsterInstance) -> str:
    lines = ["", "comic_pipeline summary", "=" * 22]
    store = _metadata(instance, dg.AssetKey("stage3_store"))
    if store:
        lines.append(f"Stage 3 store: {store.get('comics')} comics, dim {store.get('dim')}, "
                     f"modalities {store.get('modalities')} ({store.get('layout')})")
    header = f"{'task':<20} {'test n':>7} {'accuracy':>9} {'95% CI':>15} {'chance':>7} {'shortcut':>9}"
    lines += ["", header, "-" * len(header)]
    for name in schema.TASK_NAMES:
        task = _metadata(instance, TASK_KEYS[name])
        result = _metadata(instance, EVALUATION_KEYS[name])
        if "skipped" in task or "skipped" in result:
            lines.append(f"{name:<20} skipped: {task.get('skipped') or result.get('skipped')}")
        elif result:
            lines.append(
                f"{name:<20} {int(result['n_samples']):>7} {result['accuracy']:>9.3f} "
                f"{'[%.3f, %.3f]' % (result['accuracy_ci_low'], result['accuracy_ci_high']):>15} "
                f"{result['chance']:>7.3f} {result['best_shortcut']:>9.3f}"
            )
        else:
            lines.append(f"{name:<20} {'not evaluated':>7}")
    model = _metadata(instance, dg.AssetKey("sequence_model"))
    champion = _metadata(instance, dg.AssetKey("champion_model"))
    if model:
        lines += ["", f"sequence_model: version {model.get('model_version')} "
                      f"(MLflow run {model.get('mlflow_run_id')}), {model.get('epochs_run')} epochs, "
                      f"{model.get('train_seconds')} s"]
    lines.append(f"champion: {champion.get('model_version', 'none')}")
    summary = _metadata(instance, dg.AssetKey(["evaluation", "summary"]))
    if summary:
        strip = {k: v for k, v in summary.items() if k.startswith("strip_")}
        lines.append("strip embeddings: " + ", ".join(f"{k[6:]} {v:.3f}" for k, v in strip.items()))
    materialized = instance.get_materialized_partitions(dg.AssetKey("contextualized_embeddings"))
    lines.append(f"contextualized embeddings: {len(materialized)} comics")
    return "\n".join(lines)
