"""Contextualized panel and strip embeddings for Stage 5, made by the champion model."""


import time

import dagster as dg
from pydantic import Field

from comic_pipeline import embedding_pipeline, embedding_store, fileio, inference
from comic_pipeline.defs.keys import (
    CHAMPION_MODEL, CONTEXTUALIZED_EMBEDDINGS, STAGE3_PANEL_EMBEDDINGS, STALE_EMBEDDINGS_CHECK,
    comics_partitions,
)
from comic_pipeline.defs.refs import ModelRef
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, Stage3StoreResource, TorchDevice
from comic_pipeline.defs.k8s import gpu_op_tags


class EmbeddingConfig(dg.Config):
    batch_pages: int = Field(default=256, description="Pages per model batch (across comics).")


@dg.asset(
    key=CONTEXTUALIZED_EMBEDDINGS,
    group_name="embeddings",
    partitions_def=comics_partitions,
    deps=[STAGE3_PANEL_EMBEDDINGS],
    ins={"champion": dg.AssetIn(CHAMPION_MODEL)},
    pool="gpu",
    op_tags=gpu_op_tags(),  # a GPU pod under k8s (defs/k8s.py)
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=100),
    description=(
        "Per comic: contextualized panel embeddings and strip (page) embeddings from the "
        "champion model (the version champion_model last promoted), written atomically to "
        "the contextualized zarr and stamped with the model version. A backfill batches many "
        "comics per run; their pages share model batches."
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
) -> dg.MaterializeResult:
    tracking = mlflow_tracking.tracking()
    version, run_id = champion.version, champion.run_id
    device = torch_device.configure()
    model = tracking.load_model(version)
    store = stage3.open()
    url = storage.contextualized_url()
    comics = [embedding_pipeline.ComicInput.from_reader(store.comic(comic_id)) for comic_id in context.partition_keys]
    started = time.perf_counter()
    progress = _Progress(context, total=len(comics))
    written = embedding_pipeline.embed_and_write(
        url, comics,
        encode=lambda features: inference.embed_pages(model, features, device=device),
        batch_pages=config.batch_pages, model_name=champion.name,
        model_version=version, mlflow_run_id=run_id,
        on_comic_written=progress.comic_written,
    )
    seconds = time.perf_counter() - started
    pages = sum(w.n_pages for w in written)
    return dg.MaterializeResult(
        metadata={
            "comics": len(written),
            "pages": pages,
            "panels": sum(w.n_panels for w in written),
            "model_version": version,
            "mlflow_run_id": run_id,
            "output": dg.MetadataValue.path(url if len(written) != 1 else written[0].url),
            "seconds": round(seconds, 2),
            "pages_per_s": round(pages / seconds, 1) if seconds > 0 else 0.0,
        },
        data_version=dg.DataVersion(version),
    )


class _Progress:
    """One log line per 25 comics (and the last): every line is an event-log write."""

    def __init__(self, context: dg.AssetExecutionContext, total: int, every: int = 25):
        self.context, self.total, self.every, self.done, self.pages = context, total, every, 0, 0

    def comic_written(self, comic_id: str, pages: int, seconds: float) -> None:
        self.done += 1
        self.pages += pages
        if self.done % self.every == 0 or self.done == self.total:
            self.context.log.info(f"{self.done}/{self.total} comics embedded and written "
                                  f"({self.pages} pages; last: {comic_id})")


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
