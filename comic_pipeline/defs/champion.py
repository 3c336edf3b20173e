"""`champion_model`: moves the MLflow alias `champion` to a model version, only when the evaluation
report it receives clears that very version (and the datasets it trained on) through every
blocking gate, and the version is not worse than the current champion on any task."""


import math

import dagster as dg
from pydantic import Field

from comic_pipeline import embedding_store, fileio
from comic_pipeline.defs.keys import (
    BLOCKING_GATES, CHAMPION_MODEL, EVALUATION_KEYS, EVALUATION_SUMMARY, REGRESSION_TOLERANCE,
    SEQUENCE_MODEL,
)
from comic_pipeline.defs.refs import EvaluationReport, ModelRef
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage
from comic_pipeline.tracking import Tracking


class ChampionConfig(dg.Config):
    regression_tolerance: float = Field(
        default=REGRESSION_TOLERANCE,
        description="Largest allowed drop of a task's test accuracy below the current champion's.",
    )
    allow_regression: bool = Field(
        default=False,
        description="Promote even when a task drops more than the tolerance below the champion.",
    )


@dg.asset(
    key=CHAMPION_MODEL,
    group_name="evaluation",
    ins={"model_ref": dg.AssetIn(SEQUENCE_MODEL), "report": dg.AssetIn(EVALUATION_SUMMARY)},
    deps=list(EVALUATION_KEYS.values()),
    description=(
        "Moves the MLflow registry alias `champion` to the evaluated model version. Refuses (and "
        "says why) unless the evaluation report names this version and the datasets it trained "
        "on and shows every blocking gate passed, and unless no task is more than the tolerance "
        "below the current champion (launch config `allow_regression: true` overrides that). Its "
        "metadata lists every comparison and how many comics' embeddings are now stale."
    ),
)
def champion_model(
    context: dg.AssetExecutionContext,
    config: ChampionConfig,
    storage: PipelineStorage,
    mlflow_tracking: MLflowTracking,
    model_ref: ModelRef,
    report: EvaluationReport,
) -> dg.Output[ModelRef]:
    problems = report.problems_for(model_ref, BLOCKING_GATES)
    if problems:
        raise dg.Failure(
            description=f"Model version {model_ref.version} cannot become champion: "
            + "; ".join(problems) + ". The champion stays where it is.",
            metadata={"refused_version": model_ref.version, "reasons": dg.MetadataValue.md(
                "\n".join(f"- {p}" for p in problems))},
        )
    tracking = mlflow_tracking.tracking()
    previous = tracking.champion_version()
    rows = compare_with_champion(tracking, previous, model_ref, report)
    table = comparison_markdown(previous, rows, config.regression_tolerance)
    regressions = [row for row in rows if row["drop"] is not None and row["drop"] > config.regression_tolerance]
    if regressions and not config.allow_regression:
        worst = ", ".join(f"{r['task']} -{r['drop']:.3f}" for r in regressions)
        raise dg.Failure(
            description=f"Model version {model_ref.version} is worse than champion {previous} by "
            f"more than {config.regression_tolerance:.3f} on {len(regressions)} task(s) ({worst}). "
            "The champion stays where it is; to promote it anyway, launch champion_model with "
            "config `allow_regression: true`.",
            metadata={"refused_version": model_ref.version, "comparisons": dg.MetadataValue.md(table)},
        )
    tracking.set_champion(model_ref.version)
    context.log.info(f"champion: version {previous} -> {model_ref.version}")
    stale = stale_comics(storage, model_ref.version)
    return dg.Output(
        model_ref,
        metadata={
            "model_version": model_ref.version,
            "previous_champion": previous or "none",
            "model_uri": f"models:/{tracking.registered_model_name}@champion",
            "comparisons": dg.MetadataValue.md(table),
            "regressions_allowed": len(regressions),
            "stale_comics": len(stale),
            "refresh": (
                "nothing to refresh" if not stale else
                f"{len(stale)} comics have embeddings of an older model: materialize "
                "contextualized_embeddings over all partitions (Materialize -> all partitions, one "
                "backfill) or just the partitions listed by its embeddings_made_by_champion check"
            ),
        },
        data_version=dg.DataVersion(model_ref.version),
    )


def compare_with_champion(
    tracking: Tracking, champion: str | None, candidate: ModelRef, report: EvaluationReport
) -> list[dict]:
    """One row per task the candidate trained on: the champion's and the candidate's test
    accuracy (from the champion's MLflow run, where evaluation logged it) and the drop."""
    champion_metrics = tracking.metrics_of(champion if champion != candidate.version else None)
    rows = []
    for task in candidate.datasets:
        before = champion_metrics.get(f"test_{task}_accuracy")
        after = report.accuracy(task)
        known = before is not None and after is not None and not math.isnan(before)
        rows.append({"task": task, "champion": before, "candidate": after,
                     "drop": round(float(before) - after, 4) if known else None})
    return rows


def comparison_markdown(champion: str | None, rows: list[dict], tolerance: float) -> str:
    def cell(value):
        return "–" if value is None else f"{value:.3f}"

    lines = [f"champion before: {champion or 'none'} · tolerance {tolerance:.3f}", "",
             "| task | champion | candidate | drop | |", "|---|---|---|---|---|"]
    for row in rows:
        verdict = ("no champion figure" if row["drop"] is None else
                   "REGRESSION" if row["drop"] > tolerance else "ok")
        lines.append(f"| {row['task']} | {cell(row['champion'])} | {cell(row['candidate'])} | "
                     f"{cell(row['drop'])} | {verdict} |")
    return "\n".join(lines)


def stale_comics(storage: PipelineStorage, champion: str) -> list[str]:
    url = storage.contextualized_url()
    if not fileio.exists(url):
        return []
    return embedding_store.ContextualizedStore.open(url).stale_comics(champion)
