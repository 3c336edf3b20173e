"""Stage 3 input: the store itself (the demo corpus when none is configured) and one validated
view per comic, partitioned by the dynamic `comics` partitions."""


import dataclasses
import time
from typing import Optional

import dagster as dg
from pydantic import Field

from comic_pipeline import corpus
from comic_pipeline.defs.resources import Stage3StoreResource, profile

comics_partitions = dg.DynamicPartitionsDefinition(name="comics")


class DemoCorpusConfig(dg.Config):
    size: Optional[str] = Field(default=None, description="Demo corpus size: tiny or demo; default: "
                                "the profile's ($COMIC_PIPELINE_PROFILE, read at run time).")
    n_comics: Optional[int] = Field(default=None, description="Override the size's comic count.")
    seed: int = Field(default=0, description="Generator seed: the same seed, the same corpus.")


@dg.asset(
    group_name="stage3",
    description=(
        "The Stage 3 embedding store. When no store is configured (COMIC_STAGE3_STORE or the "
        "stage3 resource's url), this writes the synthetic demo corpus into the home folder; with "
        "a configured store it opens it, detects its layout and records what it holds."
    ),
)
def stage3_store(
    context: dg.AssetExecutionContext, config: DemoCorpusConfig, stage3: Stage3StoreResource
) -> dg.MaterializeResult:
    url = stage3.store_url()
    started = time.perf_counter()
    if stage3.is_demo():
        size = config.size or profile()
        if size not in corpus.SIZES:
            raise dg.Failure(f"demo corpus size {size!r} is not one of {sorted(corpus.SIZES)}")
        corpus_config = corpus.SIZES[size]
        overrides = {"seed": config.seed}
        if config.n_comics is not None:
            overrides["n_comics"] = config.n_comics
        corpus_config = dataclasses.replace(corpus_config, **overrides)
        context.log.info(f"Writing the {size} demo corpus to {url}")
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
    group_name="stage3",
    partitions_def=comics_partitions,
    deps=[stage3_store],
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=50),
    description=(
        "One comic of the Stage 3 store, validated against the input contract (shapes, dims, "
        "finite values, prefix masks, ids). Records pages, panels, modalities, dim, dtype and a "
        "content hash. A bad comic fails here with the comic, array and problem named."
    ),
)
def stage3_panel_embeddings(
    context: dg.AssetExecutionContext, stage3: Stage3StoreResource
) -> dg.MaterializeResult:
    store = stage3.open()
    summaries = []
    for comic_id in context.partition_keys:
        summary = store.comic(comic_id).validate()
        summaries.append(summary)
        context.log.info(
            f"{comic_id}: {summary.n_pages} pages, {summary.n_panels} panels, "
            f"{', '.join(summary.modalities)}"
        )
    metadata: dict[str, object] = {
        "comics": len(summaries),
        "pages": sum(s.n_pages for s in summaries),
        "panels": sum(s.n_panels for s in summaries),
        "dim": store.dim,
        "store": dg.MetadataValue.path(stage3.store_url()),
    }
    if len(summaries) == 1:
        (summary,) = summaries
        metadata.update(
            modalities=", ".join(summary.modalities), dtype=summary.dtype,
            content_hash=summary.content_hash,
        )
    else:
        rows = "\n".join(
            f"| {s.comic_id} | {s.n_pages} | {s.n_panels} | {', '.join(s.modalities)} | "
            f"{s.dtype} | `{s.content_hash[:12]}` |" for s in summaries
        )
        metadata["summary"] = dg.MetadataValue.md(
            "| comic | pages | panels | modalities | dtype | content hash |\n"
            "|---|---|---|---|---|---|\n" + rows
        )
    return dg.MaterializeResult(metadata=metadata)
