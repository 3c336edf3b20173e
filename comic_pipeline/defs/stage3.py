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
from comic_pipeline.quarantine import Quarantine
from comic_pipeline.store import Stage3StoreError


class DemoCorpusConfig(dg.Config):
    size: Optional[str] = Field(default=None, description="Demo corpus size: tiny or demo; default: "
                                "the profile's ($COMIC_PIPELINE_PROFILE, read at run time).")
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
    quarantined = store.quarantined()  # layout problems: each is that comic's, never the store's
    for bad in quarantined.values():
        context.log.error(f"quarantined: {bad.error}")
    for warning in store.warnings:
        context.log.warning(f"Stage 3 store: {warning}")
    return dg.MaterializeResult(
        metadata={
            "url": dg.MetadataValue.path(url),
            "layout": store.layout,
            "demo": stage3.is_demo(),
            "comics": len(comic_ids),
            "quarantined": len(quarantined),
            "quarantined_comics": dg.MetadataValue.md(_quarantine_table(quarantined.values())),
            "warnings": dg.MetadataValue.text("\n".join(store.warnings) or "none"),
            "dim": store.dim,
            "max_panels": store.max_panels,
            "modalities": ", ".join(sorted(store.modalities())),
            "seconds": round(time.perf_counter() - started, 2),
        }
    )


def _name_of(store, comic_id: str) -> str:
    try:
        return store.name_of(comic_id)
    except Stage3StoreError:  # gone from the store
        return comic_id


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _quarantine_table(bad) -> str:
    rows = [f"| {_md(b.name)} | `{b.comic_id}` | {_md(b.error)} |" for b in bad]
    return ("| comic | partition key | error |\n|---|---|---|\n" + "\n".join(rows)) if rows else "none"


@dg.asset(
    key=STAGE3_PANEL_EMBEDDINGS,
    group_name="stage3",
    partitions_def=comics_partitions,
    deps=[STAGE3_STORE],
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=200),
    output_required=False,  # one materialization per valid comic, each with its own metadata
    description=(
        "One comic of the Stage 3 store, validated against the input contract (shapes, dims, "
        "finite values, prefix masks, ids). Records its original name, pages, panels, modalities, "
        "dim, dtype and a content hash per comic. A run over many comics validates each on its "
        "own: every valid comic is materialized; a bad one is quarantined with the comic, array "
        "and problem named (left out of splits, tasks and embeddings until it validates again) "
        "and the others go on. A run whose comics are all bad fails. No partitions yet (a fresh "
        "home)? Materialize stage3_store: within 30 s new_comics_sensor adds one partition per "
        "comic and validates them all in one run; then Materialize all -> All partitions."
    ),
)
def stage3_panel_embeddings(context: dg.AssetExecutionContext, stage3: Stage3StoreResource):
    store = stage3.open()
    quarantine = Quarantine(stage3.storage.root())
    bad = []
    for comic_id in context.partition_keys:
        try:
            summary = store.comic(comic_id).validate()
        except (Stage3StoreError, OSError) as error:  # one bad comic never blocks the others
            record = quarantine.put(comic_id, _name_of(store, comic_id), str(error))
            bad.append(record)
            context.log.error(f"quarantined {comic_id}: {error}")
            # visible on the comic's partition in the UI (its events), beside its last good version
            yield dg.AssetObservation(
                asset_key=context.asset_key, partition=comic_id,
                metadata={"quarantined": True, "comic": record.name, "error": record.error},
            )
            continue
        quarantine.clear(comic_id)
        context.log.info(f"{summary.name} ({comic_id}): {summary.n_pages} pages, "
                         f"{summary.n_panels} panels, {', '.join(summary.modalities)}")
        yield dg.AssetMaterialization(
            asset_key=context.asset_key, partition=comic_id,
            metadata={
                "comic": summary.name,
                "pages": summary.n_pages,
                "panels": summary.n_panels,
                "modalities": ", ".join(summary.modalities),
                "dim": store.dim,
                "dtype": summary.dtype,
                "content_hash": summary.content_hash,
                "store": dg.MetadataValue.path(stage3.store_url()),
            },
        )
    if bad and len(bad) == len(context.partition_keys):
        raise dg.Failure(
            description=f"Every comic of this run ({len(bad)}) failed validation:\n"
            + "\n".join(b.error for b in bad),
            metadata={"quarantined_comics": dg.MetadataValue.md(_quarantine_table(bad))},
        )
