"""Test-split evaluation of the model that `sequence_model` produced, the quality gates, and the
`champion` alias that only moves when every blocking gate passed."""


import tempfile
from pathlib import Path

import dagster as dg
from pydantic import Field

from comic_pipeline import evaluation, schema
from comic_pipeline.defs.lineage import latest_metadata
from comic_pipeline.defs.resources import MLflowTracking, Stage3StoreResource, TorchDevice
from comic_pipeline.defs.tasks import TASK_KEYS, load_task_datasets
from comic_pipeline.defs.training import sequence_model

EVALUATION_KEYS = {name: dg.AssetKey(["evaluation", name]) for name in schema.TASK_NAMES}
SUMMARY_KEY = dg.AssetKey(["evaluation", "summary"])
REGRESSION_TOLERANCE = 0.02  # the WARN gate: at most 2 points below the champion


def _check_specs() -> list[dg.AssetCheckSpec]:
    specs = []
    for name, key in EVALUATION_KEYS.items():
        specs += [
            dg.AssetCheckSpec(
                "beats_chance", asset=key, blocking=True,
                description="Blocking: the lower end of the 95% interval of test accuracy is above chance.",
            ),
            dg.AssetCheckSpec(
                "beats_shortcuts", asset=key, blocking=True,
                description="Blocking: test accuracy is above the best label-free shortcut heuristic.",
            ),
            dg.AssetCheckSpec(
                "no_regression_vs_champion", asset=key,
                description="Warns when test accuracy is more than 2 points below the current "
                "champion's figure.",
            ),
        ]
    return specs


class EvaluationConfig(dg.Config):
    seed: int = Field(default=0, description="Seed for tie-breaking and strip-view dropout.")
    batch_size: int = 256


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            key, group_name="evaluation", deps=[sequence_model, TASK_KEYS[name]],
            description=f"Test-split metrics of {name} for the latest sequence_model version: "
            "accuracy with a 95% Wilson interval beside chance and the best shortcut "
            "heuristic" + (" (accuracy = per-page pairwise order accuracy; plus Kendall's tau and "
                           "exact match)"
                           if name == "reading_order" else "") + "; logged to the model's MLflow run.",
        )
        for name, key in EVALUATION_KEYS.items()
    ]
    + [
        dg.AssetSpec(
            SUMMARY_KEY, group_name="evaluation", deps=[sequence_model, *EVALUATION_KEYS.values()],
            description="One table of every task's test metrics beside chance and shortcuts, a "
            "per-task accuracy chart, the training curves and the strip-embedding retrieval "
            "metrics; all also logged to the model's MLflow run.",
        )
    ],
    check_specs=_check_specs(),
    can_subset=True,
)
def evaluation_assets(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    stage3: Stage3StoreResource,
    torch_device: TorchDevice,
    mlflow_tracking: MLflowTracking,
):
    tracking = mlflow_tracking.tracking()
    device = torch_device.configure()
    model_metadata = latest_metadata(context.instance, sequence_model.key)
    version, run_id = str(model_metadata["model_version"]), str(model_metadata["mlflow_run_id"])
    model = tracking.load_model(version)
    champion = tracking.champion_version()
    champion_metrics = (
        tracking.client().get_run(tracking.run_id_of(champion)).data.metrics
        if champion and champion != version else {}
    )
    datasets, skipped = load_task_datasets(context.instance)
    comic_ids = list(dict.fromkeys(next(iter(datasets.values())).comic_ids))
    features = stage3.open().load_features(comic_ids)

    results: dict[str, evaluation.TaskEvaluation] = {}
    for name, key in EVALUATION_KEYS.items():
        if key not in context.selected_asset_keys and SUMMARY_KEY not in context.selected_asset_keys:
            continue
        if name in skipped:
            if key in context.selected_asset_keys:
                yield dg.MaterializeResult(asset_key=key, metadata={"skipped": skipped[name],
                                                                     "model_version": version})
                for check in ("beats_chance", "beats_shortcuts", "no_regression_vs_champion"):
                    yield dg.AssetCheckResult(
                        asset_key=key, check_name=check, passed=True,
                        metadata={"skipped": skipped[name]},
                    )
            continue
        result = evaluation.evaluate_task(
            model, datasets[name], features, split="test", device=device,
            seed=config.seed, batch_size=config.batch_size,
        )
        results[name] = result
        tracking.log_metrics(run_id, {f"test_{name}_{k}": v for k, v in result.metrics.items()})
        if key not in context.selected_asset_keys:
            continue
        yield dg.MaterializeResult(
            asset_key=key, metadata={**result.metadata(), "model_version": version}
        )
        yield from _gates(key, result, champion, champion_metrics.get(f"test_{name}_accuracy"))

    if SUMMARY_KEY in context.selected_asset_keys:
        yield _summary(context, tracking, run_id, version, model, results, skipped, features,
                       datasets, device, config.seed)


def _gates(key, result: "evaluation.TaskEvaluation", champion, champion_accuracy):
    m = result.metrics
    yield dg.AssetCheckResult(
        asset_key=key, check_name="beats_chance", passed=bool(m["accuracy_ci_low"] > m["chance"]),
        metadata={"accuracy_ci_low": m["accuracy_ci_low"], "chance": m["chance"]},
    )
    yield dg.AssetCheckResult(
        asset_key=key, check_name="beats_shortcuts",
        passed=bool(m["accuracy"] > m["best_shortcut"]),
        metadata={"accuracy": m["accuracy"], "best_shortcut": m["best_shortcut"],
                  "best_shortcut_name": result.best_shortcut_name},
    )
    if champion_accuracy is None:
        yield dg.AssetCheckResult(
            asset_key=key, check_name="no_regression_vs_champion", passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"champion": champion or "none", "note": "no champion figure to compare"},
        )
    else:
        drop = float(champion_accuracy) - m["accuracy"]
        yield dg.AssetCheckResult(
            asset_key=key, check_name="no_regression_vs_champion",
            passed=bool(drop <= REGRESSION_TOLERANCE), severity=dg.AssetCheckSeverity.WARN,
            metadata={"champion": champion, "champion_accuracy": float(champion_accuracy),
                      "accuracy": m["accuracy"], "drop": round(drop, 4)},
        )


def _summary(context, tracking, run_id, version, model, results, skipped, features, datasets,
             device, seed) -> dg.MaterializeResult:
    test_rows = evaluation.test_page_rows(datasets)
    strips = evaluation.evaluate_strips(model, features, test_rows, device=device, seed=seed)
    tracking.log_metrics(run_id, {f"test_strip_{k}": v for k, v in strips.items()})
    history = evaluation.metric_history(tracking.client(), run_id)
    table = evaluation.summary_markdown(results, skipped, strips, version)
    with tempfile.TemporaryDirectory() as folder:
        chart = Path(folder) / "test_accuracy.png"
        curves = Path(folder) / "training_curves.png"
        report = Path(folder) / "summary.md"
        evaluation.plot_accuracy(results, chart)
        evaluation.plot_training_curves(history, curves)
        report.write_text(table)
        for path in (chart, curves, report):
            tracking.log_artifact(run_id, str(path), "evaluation")
        images = "\n\n".join(
            f"![{p.stem}](data:image/png;base64,{evaluation.base64_png(p)})" for p in (chart, curves)
        )
    context.log.info("\n" + table)
    return dg.MaterializeResult(
        asset_key=SUMMARY_KEY,
        metadata={
            "summary": dg.MetadataValue.md(table + "\n\n" + images),
            "model_version": version,
            "mlflow_run_id": run_id,
            "tasks_evaluated": len(results),
            **{f"strip_{k}": float(v) for k, v in strips.items()},
        },
    )


@dg.asset(
    group_name="evaluation",
    deps=[*EVALUATION_KEYS.values(), SUMMARY_KEY],
    description=(
        "Moves the MLflow registry alias `champion` to the evaluated model version. Runs only when "
        "every blocking quality gate of the evaluation passed (a failed gate stops it)."
    ),
)
def champion_model(
    context: dg.AssetExecutionContext, mlflow_tracking: MLflowTracking
) -> dg.MaterializeResult:
    tracking = mlflow_tracking.tracking()
    version = str(latest_metadata(context.instance, sequence_model.key)["model_version"])
    evaluated = {
        str(latest_metadata(context.instance, key).get("model_version")) for key in EVALUATION_KEYS.values()
    }
    if evaluated != {version}:
        raise dg.Failure(
            f"The evaluation assets describe model version(s) {sorted(evaluated)}, not the latest "
            f"sequence_model version {version}: materialize evaluation first."
        )
    failed = _failed_blocking_gates(context.instance)
    if failed:
        raise dg.Failure(
            f"Model version {version} did not pass its blocking gates ({', '.join(failed)}); the "
            "champion stays where it is."
        )
    previous = tracking.champion_version()
    tracking.set_champion(version)
    context.log.info(f"champion: version {previous} -> {version}")
    return dg.MaterializeResult(
        metadata={"model_version": version, "previous_champion": previous or "none",
                  "model_uri": f"models:/{tracking.registered_model_name}@champion"},
        data_version=dg.DataVersion(version),
    )


BLOCKING_CHECKS = ("beats_chance", "beats_shortcuts")


def _failed_blocking_gates(instance: dg.DagsterInstance) -> list[str]:
    """Blocking checks that did not pass on the latest evaluation of each task.

    The gate also stops champion_model when someone materializes it on its own after a failed
    evaluation: every blocking check must have succeeded in the run that made the evaluation.
    """
    failed = []
    for key in EVALUATION_KEYS.values():
        record = instance.get_latest_materialization_event(key)
        if record is None:
            failed.append(f"{key.to_user_string()} not evaluated")
            continue
        check_keys = [dg.AssetCheckKey(key, name) for name in BLOCKING_CHECKS]
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
        for check_key in check_keys:
            execution = latest.get(check_key)
            if (
                execution is None
                or execution.run_id != record.run_id
                or execution.status.value != "SUCCEEDED"
            ):
                failed.append(f"{key.to_user_string()}:{check_key.name}")
    return failed
