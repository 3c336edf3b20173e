"""Contextualized panel and strip embeddings for Stage 5, made by the champion model."""


import time

import dagster as dg
from pydantic import Field

from comic_pipeline import embedding_store, training
from comic_pipeline.defs.evaluation import champion_model
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, Stage3StoreResource, TorchDevice
from comic_pipeline.defs.stage3 import comics_partitions, stage3_panel_embeddings
from comic_pipeline.defs.k8s import gpu_op_tags


class EmbeddingConfig(dg.Config):
    batch_pages: int = Field(default=256, description="Pages per model batch (across comics).")


@dg.asset(
    group_name="embeddings",
    partitions_def=comics_partitions,
    deps=[stage3_panel_embeddings, champion_model],
    pool="gpu",
    op_tags=gpu_op_tags(),  # a GPU pod under k8s (defs/k8s.py)
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=100),
    description=(
        "Per comic: contextualized panel embeddings and strip (page) embeddings from the "
        "champion model (resolved through the MLflow alias at run time), written atomically to "
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
) -> dg.MaterializeResult:
    tracking = mlflow_tracking.tracking()
    version = tracking.champion_version()
    if version is None:
        raise dg.Failure(
            "There is no champion model yet: materialize sequence_model, the evaluation assets and "
            "champion_model first (the champion alias moves only when the quality gates pass)."
        )
    device = torch_device.configure()
    model = tracking.load_model(version)
    run_id = tracking.run_id_of(version)
    store = stage3.open()
    url = storage.contextualized_url()
    comics = [embedding_store.ComicInput.from_reader(store.comic(comic_id)) for comic_id in context.partition_keys]
    started = time.perf_counter()
    progress = _Progress(context, total=len(comics))
    written = embedding_store.embed_and_write(
        url, comics,
        encode=lambda features: training.embed_pages(model, features, device=device),
        batch_pages=config.batch_pages, model_name=tracking.registered_model_name,
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
    asset=contextualized_embeddings,
    additional_deps=[champion_model],
    description=(
        "Warns with the list of comics whose embeddings were made by a model version that is no "
        "longer the champion. Re-embed them with one backfill of contextualized_embeddings over "
        "the listed partitions (the UI marks them stale too)."
    ),
)
def embeddings_made_by_champion(
    context: dg.AssetCheckExecutionContext, storage: PipelineStorage, mlflow_tracking: MLflowTracking
) -> dg.AssetCheckResult:
    champion = mlflow_tracking.tracking().champion_version()
    url = storage.contextualized_url()
    from comic_pipeline import fileio

    if champion is None or not fileio.exists(url):
        return dg.AssetCheckResult(
            passed=True, severity=dg.AssetCheckSeverity.WARN,
            metadata={"note": "no champion or no embeddings yet"},
        )
    stale = embedding_store.ContextualizedStore.open(url).stale_comics(champion)
    return dg.AssetCheckResult(
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "champion": champion,
            "stale_comics": len(stale),
            "backfill_partitions": dg.MetadataValue.text(", ".join(stale) if stale else "none"),
        },
    )
