"""Test-split evaluation of exactly the model and datasets a `ModelRef` names, and the quality
gates (asset checks of every evaluation/<task>). The champion alias moves in champion.py."""


import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from comic_pipeline import tasks
from comic_pipeline.defs.datasets import load_task_datasets, pinned_features
from comic_pipeline.defs.keys import (
    BLOCKING_GATES, EVALUATION_KEYS, EVALUATION_SUMMARY, REGRESSION_GATE, REGRESSION_TOLERANCE,
    SEQUENCE_MODEL,
)
from comic_pipeline.defs.refs import EvaluationReport, ModelRef, TaskReport
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, Stage3StoreResource, TorchDevice

if TYPE_CHECKING:  # torch: imported by the steps that evaluate, not with the definitions
    from comic_pipeline import evaluation

GATE_DESCRIPTIONS = {
    "beats_chance": "Blocking: the lower end of the 95% interval of test accuracy (a bootstrap "
    "over comics) is above chance — for every variant on its own where the task has variants.",
    "beats_shortcuts": "Blocking: test accuracy is above the best shortcut (label-free heuristics, "
    "the slot oracle, the learned option-only baseline) — per variant where the task has them.",
}


def _check_specs() -> list[dg.AssetCheckSpec]:
    specs = []
    for key in EVALUATION_KEYS.values():
        specs += [dg.AssetCheckSpec(gate, asset=key, blocking=True, description=GATE_DESCRIPTIONS[gate])
                  for gate in BLOCKING_GATES]
        specs.append(dg.AssetCheckSpec(
            REGRESSION_GATE, asset=key,
            description="Warns when test accuracy is more than 2 points below the current "
            "champion's figure (champion_model blocks the promotion itself).",
        ))
    return specs


class EvaluationConfig(dg.Config):
    seed: int = Field(default=0, description="Seed for tie-breaking and strip-view dropout.")
    batch_size: int = 256


@dg.multi_asset(
    outs={
        name: dg.AssetOut(
            key=key, group_name="evaluation", is_required=False,
            description=f"Test-split metrics of {name} for the sequence_model version it receives, "
            "on exactly the dataset that version trained on (named in its ModelRef): accuracy with "
            "a 95% interval beside chance and the best shortcut heuristic"
            + (" (accuracy = per-page pairwise order accuracy; plus Kendall's tau and exact match)"
               if tasks.TASKS[name].family == "order" else "") + "; logged to the model's MLflow run.",
        )
        for name, key in EVALUATION_KEYS.items()
    } | {
        "summary": dg.AssetOut(
            key=EVALUATION_SUMMARY, group_name="evaluation", is_required=False,
            description="The evaluation report champion_model decides on: every task's test "
            "metrics and gate outcomes beside chance and shortcuts, a per-task accuracy chart, the "
            "training curves and the strip-embedding retrieval metrics; all also logged to the "
            "model's MLflow run.",
        )
    },
    ins={"model_ref": dg.AssetIn(SEQUENCE_MODEL)},
    internal_asset_deps={
        **{name: {SEQUENCE_MODEL} for name in EVALUATION_KEYS},
        "summary": {SEQUENCE_MODEL, *EVALUATION_KEYS.values()},
    },
    check_specs=_check_specs(),
    can_subset=True,
)
def evaluation_assets(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    stage3: Stage3StoreResource,
    storage: PipelineStorage,
    torch_device: TorchDevice,
    mlflow_tracking: MLflowTracking,
    model_ref: ModelRef,
):
    from comic_pipeline import evaluation

    tracking = mlflow_tracking.tracking()
    device = torch_device.configure()
    version, run_id = model_ref.version, model_ref.run_id
    model = tracking.load_model(version, run_id=run_id)
    champion = tracking.champion_version()
    champion_metrics = tracking.metrics_of(champion if champion != version else None)
    datasets, skipped = load_task_datasets(storage, model_ref.datasets)
    if not datasets:
        raise dg.Failure(f"Model version {version} trained on no dataset (skipped: {skipped}).")
    features = pinned_features(stage3, datasets)  # fails by name if Stage 3 rewrote a comic since
    want_summary = EVALUATION_SUMMARY in context.selected_asset_keys

    results: dict[str, evaluation.TaskEvaluation] = {}
    reports: dict[str, TaskReport] = {}
    for name, key in EVALUATION_KEYS.items():
        selected = key in context.selected_asset_keys
        if not (selected or want_summary):
            continue
        fingerprint = model_ref.datasets[name].fingerprint
        if name in skipped:
            reports[name] = TaskReport(task=name, model_version=version, dataset_fingerprint=None,
                                       skipped=skipped[name])
            if selected:
                yield dg.Output(reports[name], output_name=name,
                                metadata={"skipped": skipped[name], "model_version": version})
                for check in (*BLOCKING_GATES, REGRESSION_GATE):
                    yield dg.AssetCheckResult(asset_key=key, check_name=check, passed=True,
                                              metadata={"skipped": skipped[name]})
            continue
        try:
            result = evaluation.evaluate_task(
                model, datasets[name], features, split="test", device=device,
                seed=config.seed, batch_size=config.batch_size,
            )
        except evaluation.EvaluationSkipped as skip:  # e.g. no test samples: never blocks the others
            skipped[name] = skip.reason
            context.log.warning(f"evaluation/{name} skipped: {skip.reason}")
            reports[name] = TaskReport(task=name, model_version=version, dataset_fingerprint=fingerprint,
                                       skipped=skip.reason)
            if selected:
                yield dg.Output(reports[name], output_name=name,
                                metadata={"skipped": skip.reason, "model_version": version})
                for check in (*BLOCKING_GATES, REGRESSION_GATE):
                    yield dg.AssetCheckResult(asset_key=key, check_name=check, passed=True,
                                              metadata={"skipped": skip.reason})
            continue
        results[name] = result
        tracking.log_metrics(run_id, {f"test_{name}_{k}": v for k, v in result.metrics.items()})
        checks = list(_gates(key, result, champion, champion_metrics.get(f"test_{name}_accuracy")))
        reports[name] = TaskReport(
            task=name, model_version=version, dataset_fingerprint=fingerprint,
            metrics={k: float(v) for k, v in result.metrics.items()},
            gates={check.check_name: bool(check.passed) for check in checks
                   if check.check_name in BLOCKING_GATES},
        )
        if selected:
            yield dg.Output(reports[name], output_name=name, metadata={
                **result.metadata(), "model_version": version, "dataset_fingerprint": fingerprint})
            yield from checks

    if want_summary:
        report = EvaluationReport(model=model_ref, tasks=reports)
        yield _summary(context, tracking, report, model, results, skipped, features, datasets,
                       device, config.seed)


def _gates(key, result: "evaluation.TaskEvaluation", champion, champion_accuracy):
    m = result.metrics
    # the whole task, then each variant on its own (text_cloze easy and hard): all must pass
    scopes = ["", *(f"_{variant}" for variant in result.variants)]
    chance_ok = {f"accuracy{s}": bool(m[f"accuracy{s}_ci_low"] > m[f"chance{s}"]) for s in scopes}
    yield dg.AssetCheckResult(
        asset_key=key, check_name="beats_chance", passed=all(chance_ok.values()),
        metadata={**{f"accuracy{s}_ci_low": m[f"accuracy{s}_ci_low"] for s in scopes},
                  **{f"chance{s}": m[f"chance{s}"] for s in scopes},
                  "ci_method": result.ci_method},
    )
    shortcut_ok = {f"accuracy{s}": bool(m[f"accuracy{s}"] > m[f"best_shortcut{s}"]) for s in scopes}
    yield dg.AssetCheckResult(
        asset_key=key, check_name="beats_shortcuts", passed=all(shortcut_ok.values()),
        metadata={**{f"accuracy{s}": m[f"accuracy{s}"] for s in scopes},
                  **{f"best_shortcut{s}": m[f"best_shortcut{s}"] for s in scopes},
                  "best_shortcut_name": result.best_shortcut_name},
    )
    if champion_accuracy is None or math.isnan(float(champion_accuracy)):
        yield dg.AssetCheckResult(
            asset_key=key, check_name=REGRESSION_GATE, passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"champion": champion or "none", "note": "no champion figure to compare"},
        )
    else:
        drop = float(champion_accuracy) - m["accuracy"]
        yield dg.AssetCheckResult(
            asset_key=key, check_name=REGRESSION_GATE,
            passed=bool(drop <= REGRESSION_TOLERANCE), severity=dg.AssetCheckSeverity.WARN,
            metadata={"champion": champion, "champion_accuracy": float(champion_accuracy),
                      "accuracy": m["accuracy"], "drop": round(drop, 4)},
        )


def _summary(context, tracking, report: EvaluationReport, model, results, skipped, features,
             datasets, device, seed) -> dg.Output:
    from comic_pipeline import evaluation

    run_id, version = report.model.run_id, report.model.version
    test_rows = evaluation.test_page_rows(datasets)
    strips = evaluation.evaluate_strips(model, features, test_rows, device=device, seed=seed)
    tracking.log_metrics(run_id, {f"test_strip_{k}": v for k, v in strips.items()})
    history = evaluation.metric_history(tracking.client(), run_id)
    table = evaluation.summary_markdown(results, skipped, strips, version)
    with tempfile.TemporaryDirectory() as folder:
        chart = Path(folder) / "test_accuracy.png"
        curves = Path(folder) / "training_curves.png"
        markdown = Path(folder) / "summary.md"
        evaluation.plot_accuracy(results, chart)
        evaluation.plot_training_curves(history, curves)
        markdown.write_text(table)
        for path in (chart, curves, markdown):
            tracking.log_artifact(run_id, str(path), "evaluation")
        images = "\n\n".join(
            f"![{p.stem}](data:image/png;base64,{evaluation.base64_png(p)})" for p in (chart, curves)
        )
    context.log.info("\n" + table)
    report = EvaluationReport(model=report.model, tasks=report.tasks,
                              strip={k: float(v) for k, v in strips.items()})
    failed = report.problems_for(report.model, BLOCKING_GATES)
    return dg.Output(
        report,
        output_name="summary",
        metadata={
            "blocking_gates": "all passed" if not failed else "FAILED: " + "; ".join(failed),
            "summary": dg.MetadataValue.md(table + "\n\n" + images),
            "model_version": version,
            "mlflow_run_id": run_id,
            "tasks_evaluated": len(results),
            **{f"strip_{k}": float(v) for k, v in strips.items()},
        },
    )
