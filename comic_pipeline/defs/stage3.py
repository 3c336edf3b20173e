"""Stage 3 input: the store itself (the demo corpus when none is configured) and one validated
view per comic, partitioned by the dynamic `comics` partitions."""


import dataclasses
import time
from typing import Optional

import dagster as dg
from pydantic import Field

from comic_pipeline import corpus
from comic_pipeline.defs.keys import STAGE3_PANEL_EMBEDDINGS, STAGE3_STORE, comics_partitions
from comic_pipeline.defs.resources import Stage3StoreResource, profile
from comic_pipeline.store import Stage3StoreError


class DemoCorpusConfig(dg.Config):
    size: str = Field(default=profile(), description="Demo corpus size: tiny or demo.")
    n_comics: Optional[int] = Field(default=None, description="Override the size's comic count.")
    seed: int = Field(default=0, description="Generator seed: the same seed, the same corpus.")


@dg.asset(
    key=STAGE3_STORE,
    group_name="stage3",
    description=(
        "The Stage 3 embedding store. When no store is configured (COMIC_STAGE3_STORE or the "
        "stage3 resource's url), this writes the synthetic demo corpus into the home folder; with "
        "a configured store it opens it, detects its layout and records what it holds. On a fresh "
        "home, start here: new_comics_sensor then turns its comics into partitions."
    ),
)
def stage3_store(
    context: dg.AssetExecutionContext, config: DemoCorpusConfig, stage3: Stage3StoreResource
) -> dg.MaterializeResult:
    url = stage3.store_url()
    started = time.perf_counter()
    if stage3.is_demo():
        if config.size not in corpus.SIZES:
            raise dg.Failure(f"demo corpus size {config.size!r} is not one of {sorted(corpus.SIZES)}")
        corpus_config = corpus.SIZES[config.size]
        overrides = {"seed": config.seed}
        if config.n_comics is not None:
            overrides["n_comics"] = config.n_comics
        corpus_config = dataclasses.replace(corpus_config, **overrides)
        context.log.info(f"Writing the {config.size} demo corpus to {url}")
        corpus.write_demo_store(url, corpus_config)
    store = stage3.open()
    comic_ids = store.comic_ids()
    return dg.MaterializeResult(
        metadata={
            "url": dg.MetadataValue.path(url),
            "layout": store.layout,
            "demo": stage3.is_demo(),
            "comics": len(comic_ids),
            "dim": store.dim,
            "max_panels": store.max_panels,
            "modalities": ", ".join(sorted(store.modalities())),
            "seconds": round(time.perf_counter() - started, 2),
        }
    )


@dg.asset(
    key=STAGE3_PANEL_EMBEDDINGS,
    group_name="stage3",
    partitions_def=comics_partitions,
    deps=[STAGE3_STORE],
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=200),
    output_required=False,  # one materialization per valid comic, each with its own metadata
    description=(
        "One comic of the Stage 3 store, validated against the input contract (shapes, dims, "
        "finite values, prefix masks, ids). Records pages, panels, modalities, dim, dtype and a "
        "content hash per comic. A run over many comics validates each on its own: every valid "
        "comic is materialized, and the run then fails naming each bad comic, array and problem. "
        "No partitions yet (a fresh home)? Materialize stage3_store: within 30 s new_comics_sensor "
        "adds one partition per comic and validates them all in one run; then Materialize all -> "
        "All partitions."
    ),
)
def stage3_panel_embeddings(context: dg.AssetExecutionContext, stage3: Stage3StoreResource):
    store = stage3.open()
    errors: dict[str, str] = {}
    for comic_id in context.partition_keys:
        try:
            summary = store.comic(comic_id).validate()
        except Stage3StoreError as error:  # one bad comic never blocks the others
            errors[comic_id] = str(error)
            context.log.error(str(error))
            continue
        context.log.info(f"{comic_id}: {summary.n_pages} pages, {summary.n_panels} panels, "
                         f"{', '.join(summary.modalities)}")
        yield dg.AssetMaterialization(
            asset_key=context.asset_key, partition=comic_id,
            metadata={
                "pages": summary.n_pages,
                "panels": summary.n_panels,
                "modalities": ", ".join(summary.modalities),
                "dim": store.dim,
                "dtype": summary.dtype,
                "content_hash": summary.content_hash,
                "store": dg.MetadataValue.path(stage3.store_url()),
            },
        )
    if errors:
        raise dg.Failure(
            description=f"{len(errors)} of {len(context.partition_keys)} comics failed validation "
            "(the others are validated): " + "; ".join(errors.values()),
            metadata={"failed_comics": dg.MetadataValue.md(
                "\n".join(f"- `{comic}`: {error}" for comic, error in errors.items()))},
        )
