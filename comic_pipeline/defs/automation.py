"""Automation: new comics become partitions (and get embedded), weekly retraining."""


import dagster as dg

from comic_pipeline.defs.embeddings import contextualized_embeddings, embeddings_made_by_champion
from comic_pipeline.defs.evaluation import EVALUATION_KEYS, SUMMARY_KEY, champion_model, evaluation_assets
from comic_pipeline.defs.resources import MLflowTracking, Stage3StoreResource
from comic_pipeline.defs.stage3 import comics_partitions, stage3_panel_embeddings
from comic_pipeline.defs.tasks import TASK_KEYS, comic_splits
from comic_pipeline.defs.training import sequence_model
from comic_pipeline.embedding_store import ContextualizedStore
from comic_pipeline.store import Stage3StoreError

MAX_NEW_COMICS_PER_TICK = 25  # bounds the run queue when a whole store arrives at once


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[stage3_panel_embeddings, contextualized_embeddings],
    description=(
        "Finds comics in the Stage 3 store that are not yet partitions of `comics`, adds them "
        "(partition key derived from the comic's name; the name is the run's `comic_name` tag), and "
        "requests one run per new comic that validates it and — once a champion model exists — "
        "writes its contextualized embeddings. At most 25 new comics per tick. Comics that vanished "
        "from the store are retired (their partitions removed) and reported, with their embeddings."
    ),
)
def new_comics_sensor(
    context: dg.SensorEvaluationContext, stage3: Stage3StoreResource, mlflow_tracking: MLflowTracking
):
    if not stage3.exists():
        if not stage3.is_demo():
            return dg.SkipReason(f"The configured Stage 3 store {stage3.store_url()} does not exist "
                                 "(check COMIC_STAGE3_STORE or the stage3 resource's url).")
        return dg.SkipReason(f"No Stage 3 store at {stage3.store_url()} yet (materialize stage3_store "
                             "to write the demo corpus, or configure COMIC_STAGE3_STORE).")
    try:
        names = stage3.open().names()  # key -> name; one bad comic never fails the listing
    except Stage3StoreError as error:
        return dg.SkipReason(f"The Stage 3 store cannot be opened: {error}")
    known = set(context.instance.get_dynamic_partitions(comics_partitions.name))
    vanished = sorted(known - set(names))
    partition_requests = []
    if vanished:
        partition_requests.append(comics_partitions.build_delete_request(vanished))
        _report_retired(context, stage3, vanished)
    new = [comic_id for comic_id in sorted(names) if comic_id not in known]
    if not new:
        if partition_requests:
            return dg.SensorResult(dynamic_partitions_requests=partition_requests)
        return dg.SkipReason("No new comics in the store.")
    new = new[:MAX_NEW_COMICS_PER_TICK]
    selection = [stage3_panel_embeddings.key]
    if mlflow_tracking.tracking().champion_version() is not None:
        selection.append(contextualized_embeddings.key)  # runs after validation in the same run
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(partition_key=comic_id, run_key=f"new-comic:{comic_id}", asset_selection=selection,
                          tags={"comic_name": names[comic_id]})
            for comic_id in new
        ],
        dynamic_partitions_requests=[*partition_requests, comics_partitions.build_add_request(new)],
    )


def _report_retired(context: dg.SensorEvaluationContext, stage3: Stage3StoreResource,
                    vanished: list[str]) -> None:
    """Log the retired comics and which of them still have contextualized embeddings."""
    with_embeddings: list[str] = []
    try:
        output = ContextualizedStore.open(stage3.storage.contextualized_url())
        with_embeddings = sorted(set(vanished) & set(output.comic_ids()))
    except (FileNotFoundError, ValueError):
        pass  # no output store yet
    context.log.warning(
        f"{len(vanished)} comic(s) vanished from the Stage 3 store and are retired: {vanished[:20]}; "
        f"{len(with_embeddings)} of them still have contextualized embeddings: {with_embeddings[:20]}"
    )


retraining_job = dg.define_asset_job(
    "retraining_job",
    selection=(
        dg.AssetSelection.assets(comic_splits, *TASK_KEYS.values(), sequence_model,
                                 *EVALUATION_KEYS.values(), SUMMARY_KEY, champion_model)
        | dg.AssetSelection.checks_for_assets(evaluation_assets)
        | dg.AssetSelection.checks(embeddings_made_by_champion)
    ),
    description="Splits -> tasks -> sequence_model -> evaluation -> champion (only through the "
    "gates), then reports embeddings made by an older model as stale.",
)

weekly_retraining = dg.ScheduleDefinition(
    name="weekly_retraining",
    job=retraining_job,
    cron_schedule="0 3 * * 1",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Mondays 03:00 UTC: regenerate splits and tasks from every validated comic, "
    "retrain, evaluate, and promote the new model if it passes the quality gates. Turn it on in "
    "the UI (Automation -> weekly_retraining) or with `dagster schedule start weekly_retraining -w workspace.yaml`.",
)
