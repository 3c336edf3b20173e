"""Automation: new comics become partitions (validated, and embedded once a champion exists),
weekly retraining, and the stale-embedding check whenever the champion moves. Names assets by key."""


import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus  # no public name for it in 1.13

from comic_pipeline.defs.keys import (
    CHAMPION_MODEL, COMIC_SPLITS, CONTEXTUALIZED_EMBEDDINGS, EVALUATION_KEYS, EVALUATION_SUMMARY,
    SEQUENCE_MODEL, STAGE3_PANEL_EMBEDDINGS, STAGE3_STORE, STALE_EMBEDDINGS_CHECK, TASK_KEYS,
    comics_partitions,
)
from comic_pipeline.defs.resources import Stage3StoreResource
from comic_pipeline.embedding_store import ContextualizedStore
from comic_pipeline.quarantine import Quarantine
from comic_pipeline.store import Stage3StoreError

IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
               dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
MAX_NEW_COMICS_PER_TICK = 500  # one run validates them all; a bigger store takes a few ticks
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
STALE_CHECK = dg.AssetCheckKey(CONTEXTUALIZED_EMBEDDINGS, STALE_EMBEDDINGS_CHECK)


# --- comic names -> partition keys: the one place the sensor maps store comics to partitions ---
def new_partition_keys(names: dict[str, str], known: set[str]) -> list[str]:
    """Partition keys of the store's comics that are not partitions yet, sorted.

    `names` is Stage3Store.names(): {partition key: original name}; each key is derived from the
    name by comic_names (stable, unique, valid for Dagster)."""
    return sorted(key for key in names if key not in known)
# ------------------------------------------------------------------------------------------------


def _range_requests(keys: list[str], ordered: list[str], selection: list[dg.AssetKey],
                   purpose: str) -> list[dg.RunRequest]:
    """One run per contiguous stretch of `keys` in partition order (usually exactly one)."""
    position = {key: index for index, key in enumerate(ordered)}
    keys = sorted(keys, key=position.__getitem__)
    stretches: list[list[str]] = []
    for key in keys:
        if stretches and position[key] == position[stretches[-1][-1]] + 1:
            stretches[-1].append(key)
        else:
            stretches.append([key])
    requests = []
    for stretch in stretches:
        run_key = f"{purpose}:{stretch[0]}..{stretch[-1]}:{len(stretch)}"
        if len(stretch) == 1:
            requests.append(dg.RunRequest(partition_key=stretch[0], run_key=run_key,
                                          asset_selection=selection))
        else:
            requests.append(dg.RunRequest(run_key=run_key, asset_selection=selection,
                                          tags={RANGE_START: stretch[0], RANGE_END: stretch[-1]}))
    return requests


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[STAGE3_PANEL_EMBEDDINGS, CONTEXTUALIZED_EMBEDDINGS],
    description=(
        "Finds comics in the Stage 3 store that are not yet partitions of `comics`, adds them "
        "(partition key derived from the comic's name), and "
        "requests ONE run per tick that validates all of them (each comic on its own: a bad one "
        "is reported, the others are validated). Once champion_model has promoted a model, the "
        "next tick requests the embeddings of validated comics that have none. Up to 500 new "
        "comics per tick. On a fresh home it waits for the store: materialize stage3_store first. "
        "Comics that vanished from the store are retired (partitions removed) and reported. While "
        "a run materializes stage3_store it waits (a store being written is not yet what it holds)."
    ),
)
def new_comics_sensor(context: dg.SensorEvaluationContext, stage3: Stage3StoreResource):
    writers = runs_writing_the_store(context.instance)
    if writers:
        # Rewriting the demo store empties it first: listed now, its comics would look vanished.
        return dg.SkipReason(f"stage3_store is being written by run {writers[0]}; comics are listed "
                             "once it has finished.")
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
    instance = context.instance
    ordered = list(instance.get_dynamic_partitions(comics_partitions.name))
    vanished = sorted(set(ordered) - set(names))
    partition_requests = []
    if vanished:
        partition_requests.append(comics_partitions.build_delete_request(vanished))
        _report_retired(context, stage3, vanished)
        ordered = [key for key in ordered if key in names]
    new = new_partition_keys(names, set(ordered))[:MAX_NEW_COMICS_PER_TICK]
    if new:
        # Added by one request, the new partitions are contiguous and last: one range run.
        return dg.SensorResult(
            run_requests=_range_requests(new, ordered + new, [STAGE3_PANEL_EMBEDDINGS], "new-comics"),
            dynamic_partitions_requests=[*partition_requests, comics_partitions.build_add_request(new)],
        )
    if partition_requests:
        return dg.SensorResult(dynamic_partitions_requests=partition_requests)
    if instance.get_latest_materialization_event(CHAMPION_MODEL) is None:
        return dg.SkipReason("No new comics in the store (and no champion yet to embed with).")
    if instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS), limit=1) or \
            instance.get_backfills(status=BulkActionStatus.REQUESTED, limit=1):
        # A backfill or run may be embedding these comics right now: never race it.
        return dg.SkipReason("Runs or a backfill are in progress; embedding new comics waits.")
    validated = instance.get_materialized_partitions(STAGE3_PANEL_EMBEDDINGS)
    embedded = instance.get_materialized_partitions(CONTEXTUALIZED_EMBEDDINGS)
    quarantined = set(Quarantine(stage3.storage.root()).records())  # the embedder would skip them
    unembedded = [key for key in ordered if key in validated and key not in embedded and key not in quarantined]
    if not unembedded:
        return dg.SkipReason("No new comics in the store; every validated comic is embedded.")
    return dg.SensorResult(run_requests=_range_requests(
        unembedded, ordered, [CONTEXTUALIZED_EMBEDDINGS], "embed-new-comics"))


def runs_writing_the_store(instance: dg.DagsterInstance) -> list[str]:
    """Ids of queued or running runs that materialize stage3_store."""
    records = instance.get_run_records(dg.RunsFilter(statuses=IN_PROGRESS))
    return [r.dagster_run.run_id for r in records
            if STAGE3_STORE in (r.dagster_run.asset_selection or ())]


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
        dg.AssetSelection.assets(COMIC_SPLITS, *TASK_KEYS.values(), SEQUENCE_MODEL,
                                 *EVALUATION_KEYS.values(), EVALUATION_SUMMARY, CHAMPION_MODEL)
        | dg.AssetSelection.checks_for_assets(*EVALUATION_KEYS.values())
        | dg.AssetSelection.checks(STALE_CHECK)
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

stale_embeddings_automation = dg.AutomationConditionSensorDefinition(
    "stale_embeddings_automation",
    target=dg.AssetSelection.checks(STALE_CHECK),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Runs embeddings_made_by_champion whenever champion_model or "
    "contextualized_embeddings changes, whatever moved it (asset page, retraining_job, schedule), "
    "so stale embeddings show in the UI within a tick.",
)
