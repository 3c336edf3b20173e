"""Contextualized panel and strip embeddings for Stage 5, made by the champion model."""


import contextlib
import os
import time
from typing import Mapping

import dagster as dg
from pydantic import Field

from comic_pipeline import embedding_pipeline, embedding_store, fileio
from comic_pipeline.defs.keys import (
    CHAMPION_MODEL, CONTEXTUALIZED_EMBEDDINGS, STAGE3_PANEL_EMBEDDINGS, STALE_EMBEDDINGS_CHECK,
    comics_partitions,
)
from comic_pipeline.defs.refs import ModelRef
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, Stage3StoreResource, TorchDevice
from comic_pipeline.defs.k8s import gpu_op_tags
from comic_pipeline.quarantine import Quarantine
from comic_pipeline.store import Stage3StoreError


RUN_COMICS_ENV = "COMIC_PIPELINE_EMBEDDING_RUN_COMICS"
DEFAULT_RUN_COMICS = 1000


def comics_per_embedding_run(environ: Mapping[str, str] | None = None) -> int:
    """Comics per run of an embedding backfill (the backfill policy's max_partitions_per_run),
    from the code location's environment. A run costs seconds to launch (11.7 s for a local run
    process to write its first comic, bench_run_overhead.py; a pod on a GPU node far more) and
    a comic costs milliseconds to embed, so runs are sized to minutes of work: the default of
    1,000 is about 3 minutes of the full model on 2 CPU cores (24-page comics, 138 pages/s);
    a GPU deployment sets more (deploy/helm-values.yaml)."""
    env = os.environ if environ is None else environ
    text = env.get(RUN_COMICS_ENV, str(DEFAULT_RUN_COMICS))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{RUN_COMICS_ENV} must be a whole number of comics, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{RUN_COMICS_ENV} must be at least 1, got {value}")
    return value


class EmbeddingConfig(dg.Config):
    batch_pages: int = Field(default=256, description="Pages per model batch (across comics).")
    reader_processes: int = Field(
        default=0, ge=0,
        description="Processes that read, check and hash the run's Stage 3 comics, off the "
        "encoder's process (0: reader threads in the run's process). A run of fewer than "
        f"{embedding_pipeline.MIN_COMICS_FOR_READER_PROCESSES} comics reads in threads anyway (a "
        "process takes about a second to start). Off by default: on 2 CPU cores they made no "
        "consistent difference; measure on a GPU node (bench_embeddings.py --reader-processes N).")


@dg.asset(
    key=CONTEXTUALIZED_EMBEDDINGS,
    group_name="embeddings",
    partitions_def=comics_partitions,
    deps=[STAGE3_PANEL_EMBEDDINGS],
    ins={"champion": dg.AssetIn(CHAMPION_MODEL)},
    pool="gpu",
    op_tags=gpu_op_tags(),  # a GPU pod under k8s (defs/k8s.py)
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=comics_per_embedding_run()),
    output_required=False,  # one materialization per comic written, each with its own metadata
    description=(
        "Per comic: contextualized panel embeddings and strip (page) embeddings from the "
        "champion model (the version champion_model last promoted), written atomically to "
        "the contextualized zarr and stamped with the model version. A backfill batches many "
        "comics per run; their pages share model batches. Each comic stands alone: a "
        "quarantined or unvalidated comic is skipped (an observation on its partition says "
        "why); a comic whose Stage 3 content changed since its validation, or that fails to "
        "read, is left out and named, the others are written, and the run then fails so the "
        "left-out partitions show as failed."
    ),
)
def contextualized_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingConfig,
    stage3: Stage3StoreResource,
    storage: PipelineStorage,
    torch_device: TorchDevice,
    mlflow_tracking: MLflowTracking,
    champion: ModelRef,
):
    tracking = mlflow_tracking.tracking()
    version, run_id = champion.version, champion.run_id
    store = stage3.open()
    pins = validated_hashes(context.instance, context.partition_keys)
    quarantined = Quarantine(storage.root()).records()
    skipped = {key: f"quarantined: {quarantined[key].error}" for key in context.partition_keys
               if key in quarantined}
    skipped.update({key: "not validated yet: materialize stage3_panel_embeddings for it first"
                    for key in context.partition_keys if key not in pins and key not in skipped})
    for key, reason in skipped.items():
        context.log.warning(f"{key}: skipped ({reason})")
        yield dg.AssetObservation(asset_key=context.asset_key, partition=key,
                                  metadata={"skipped": reason, "model_version": version})
    wanted = [key for key in context.partition_keys if key not in skipped]
    if not wanted:
        return
    from comic_pipeline import inference  # torch: here, not with the definitions every run loads

    device = torch_device.configure()
    model = tracking.load_model(version, run_id=run_id)  # from the model cache after the first run
    failed: dict[str, str] = {}

    def comic_failed(comic: embedding_pipeline.ComicInput, error: Exception) -> None:
        failed[comic.comic_id] = f"{type(error).__name__}: {error}"
        context.log.error(f"{comic.comic_id}: not embedded: {error}")

    n_processes = embedding_pipeline.reader_process_count(config.reader_processes, len(wanted))
    with contextlib.ExitStack() as closing:
        processes = (closing.enter_context(embedding_pipeline.reader_processes(n_processes))
                     if n_processes else None)
        comics = []
        for key in wanted:  # opened by the pipeline's readers (a group that broke since its
            try:            # validation fails there, alone); here only its name is looked up
                comics.append(embedding_pipeline.ComicInput.from_store(store, key, pinned_hash=pins[key],
                                                                       processes=processes))
            except Stage3StoreError as error:  # no longer in the store
                failed[key] = f"{type(error).__name__}: {error}"
        context.log.info(f"{len(comics)} comics to embed; Stage 3 read by "
                         + (f"{n_processes} reader process(es)" if n_processes else "reader threads"))
        url = storage.contextualized_url()
        progress = _Progress(context, total=len(comics))
        # each comic's materialization is recorded as soon as its commit is on the store, so a run
        # that dies midway keeps, in Dagster too, every comic it wrote
        for comic in embedding_pipeline.iter_embed_and_write(
            url, comics,
            encode=lambda features: inference.embed_pages(model, features, device=device),
            batch_pages=config.batch_pages, model_name=champion.name,
            model_version=version, mlflow_run_id=run_id, on_comic_failed=comic_failed,
        ):
            progress.comic_written(comic.comic_id, comic.n_pages, comic.seconds)
            yield dg.AssetMaterialization(
                asset_key=context.asset_key, partition=comic.comic_id,
                metadata={
                    "comic": comic.name,
                    "pages": comic.n_pages,
                    "panels": comic.n_panels,
                    "model_version": version,
                    "mlflow_run_id": run_id,
                    "output": dg.MetadataValue.path(comic.url),
                    "seconds": round(comic.seconds, 3),
                },
            )
    context.log.info(progress.summary())
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} of {len(wanted)} comics were not embedded (the other "
            f"{progress.done} were written):\n" + "\n".join(f"{k}: {e}" for k, e in failed.items()),
            metadata={"failed_comics": dg.MetadataValue.md(
                "| partition key | error |\n|---|---|\n"
                + "\n".join(f"| `{k}` | {e.replace('|', '/')} |" for k, e in failed.items()))},
        )


def validated_hashes(instance: dg.DagsterInstance, keys: list[str], page_size: int = 500) -> dict[str, str]:
    """{key: content hash its latest stage3_panel_embeddings materialization recorded} for the
    comics of `keys` that were validated.

    One query for the whole run (newest first, paged when comics were validated many times),
    not one per comic: on PostgreSQL the per-comic queries were about 0.6 s of a 100-comic run."""
    hashes: dict[str, str] = {}
    wanted, seen = set(keys), set()  # seen: partitions whose latest materialization was read
    cursor = None
    while seen != wanted:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=STAGE3_PANEL_EMBEDDINGS,
                                  asset_partitions=sorted(wanted - seen)),
            limit=page_size, cursor=cursor,
        )
        for record in result.records:  # newest first: the first record of a comic is its latest
            materialization = record.asset_materialization
            key = materialization.partition if materialization else None
            if key is None or key in seen:
                continue
            seen.add(key)
            entry = materialization.metadata.get("content_hash")
            if entry is not None:
                hashes[key] = str(entry.value)
        if not result.has_more:
            break
        cursor = result.cursor
    return hashes


class _Progress:
    """One log line per 25 comics (and the last): every line is an event-log write."""

    def __init__(self, context: dg.AssetExecutionContext, total: int, every: int = 25):
        self.context, self.total, self.every, self.done, self.pages = context, total, every, 0, 0
        self.started, self.first_written = time.perf_counter(), None

    def comic_written(self, comic_id: str, pages: int, seconds: float) -> None:
        if self.done == 0:
            self.first_written = time.perf_counter() - self.started
        self.done += 1
        self.pages += pages
        if self.done % self.every == 0 or self.done == self.total:
            self.context.log.info(f"{self.done}/{self.total} comics embedded and written "
                                  f"({self.pages} pages; last: {comic_id})")

    def summary(self) -> str:
        seconds = time.perf_counter() - self.started
        first = "" if self.first_written is None else f"; first comic written after {self.first_written:.2f} s"
        rate = self.pages / seconds if seconds > 0 else 0.0
        return (f"{self.done} comics ({self.pages} pages) embedded in {seconds:.1f} s, "
                f"{rate:,.0f} pages/s{first}")


@dg.asset_check(
    asset=CONTEXTUALIZED_EMBEDDINGS,
    name=STALE_EMBEDDINGS_CHECK,
    additional_ins={"champion": dg.AssetIn(CHAMPION_MODEL)},
    automation_condition=dg.AutomationCondition.any_deps_updated(),
    description=(
        "Warns with the list of comics whose embeddings were made by a model version that is no "
        "longer the champion. Runs by itself whenever champion_model moves (from any path: the "
        "asset page, retraining_job, the schedule) and after every embedding run. Re-embed the "
        "listed comics with one backfill of contextualized_embeddings over their partitions."
    ),
)
def embeddings_made_by_champion(
    context: dg.AssetCheckExecutionContext, storage: PipelineStorage, champion: ModelRef
) -> dg.AssetCheckResult:
    url = storage.contextualized_url()
    if not fileio.exists(url):
        return dg.AssetCheckResult(
            passed=True, severity=dg.AssetCheckSeverity.WARN,
            metadata={"champion": champion.version, "note": "no embeddings yet"},
        )
    stale = embedding_store.ContextualizedStore.open(url).stale_comics(champion.version)
    return dg.AssetCheckResult(
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        description=(f"{len(stale)} comics have embeddings of an older model than champion "
                     f"{champion.version}: backfill contextualized_embeddings over them."
                     if stale else f"Every comic's embeddings were made by champion {champion.version}."),
        metadata={
            "champion": champion.version,
            "stale_comics": len(stale),
            "backfill_partitions": dg.MetadataValue.text(", ".join(stale) if stale else "none"),
        },
    )
