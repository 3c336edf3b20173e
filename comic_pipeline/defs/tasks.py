"""Book-level splits and the seven task datasets (index-based samples into the Stage 3 store)."""


import hashlib
import io

import dagster as dg
import pandas as pd
from pydantic import Field

from comic_pipeline import fileio, schema, tasks
from comic_pipeline.defs.lineage import latest_metadata
from comic_pipeline.defs.resources import PipelineStorage, Stage3StoreResource
from comic_pipeline.defs.stage3 import comics_partitions, stage3_panel_embeddings
from comic_pipeline.quarantine import Quarantine

TASK_KEYS = {name: dg.AssetKey(["tasks", name]) for name in schema.TASK_NAMES}


class SplitConfig(dg.Config):
    train: float = Field(default=0.8, description="Fraction of comics in train.")
    val: float = Field(default=0.1, description="Fraction of comics in val.")
    test: float = Field(default=0.1, description="Fraction of comics in test.")


@dg.asset(
    group_name="tasks",
    deps=[stage3_panel_embeddings],
    description=(
        "Book-level train/val/test assignment of every validated comic, from a stable hash of the "
        "comic id: a comic keeps its split whenever it arrives and never sits in two splits."
    ),
)
def comic_splits(
    context: dg.AssetExecutionContext, config: SplitConfig, storage: PipelineStorage
) -> dg.MaterializeResult:
    registered = set(context.instance.get_dynamic_partitions(comics_partitions.name))
    validated = context.instance.get_materialized_partitions(stage3_panel_embeddings.key)
    quarantined = set(Quarantine(storage.root()).records())  # failed their last validation
    comic_ids = sorted((registered & set(validated)) - quarantined)
    if not comic_ids:
        raise dg.Failure(
            "No validated comics: materialize stage3_panel_embeddings first (new_comics_sensor "
            "adds one partition per comic of the store)."
        )
    unvalidated = sorted(registered - set(validated))
    if unvalidated:
        context.log.warning(f"{len(unvalidated)} registered comics are not validated yet and are "
                            f"left out: {unvalidated[:10]}")
    split_of = tasks.assign_splits(comic_ids, fractions=(config.train, config.val, config.test))
    table = pd.DataFrame({"comic_id": comic_ids, "split": [split_of[c] for c in comic_ids]})
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
    path = storage.path("splits", f"comic_splits-{digest}.parquet")
    fileio.atomic_write_bytes(path, buffer.getvalue())
    counts = table["split"].value_counts().reindex(list(schema.SPLITS), fill_value=0)
    preview = table.groupby("split")["comic_id"].apply(lambda ids: ", ".join(ids[:8]) + (" …" if len(ids) > 8 else ""))
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(path),
            "comics": len(comic_ids),
            **{f"{split}_comics": int(counts[split]) for split in schema.SPLITS},
            "preview": dg.MetadataValue.md(
                "| split | comics | examples |\n|---|---|---|\n"
                + "\n".join(f"| {s} | {int(counts[s])} | {preview.get(s, '')} |" for s in schema.SPLITS)
            ),
        },
        data_version=dg.DataVersion(digest),
    )


def read_splits(instance: dg.DagsterInstance) -> dict[str, str]:
    """comic id -> split, from the file the latest comic_splits materialization wrote."""
    path = latest_metadata(instance, comic_splits.key)["path"]
    with fileio.open_binary(path) as handle:
        table = pd.read_parquet(handle)
    return dict(zip(table["comic_id"], table["split"]))


class TaskGenerationConfig(dg.Config):
    seed: int = Field(default=0, description="Generation seed: the same seed, the same datasets.")
    samples_per_page: int = Field(default=4, description="Samples drawn from each eligible page.")
    distractors: str = Field(default="hard", description="hard (same comic, other pages) or easy "
                             "(other comics); text_cloze always makes both variants.")


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            key, group_name="tasks", deps=[comic_splits],
            description=f"{tasks.TASKS[name].description} Index-based samples per split "
            "(references into the Stage 3 store, not copies).",
        )
        for name, key in TASK_KEYS.items()
    ],
    can_subset=True,
)
def task_datasets(
    context: dg.AssetExecutionContext,
    config: TaskGenerationConfig,
    stage3: Stage3StoreResource,
    storage: PipelineStorage,
):
    """One step generates every selected task, so the store is read once."""
    split_of = read_splits(context.instance)
    store = stage3.open()
    features = store.load_features(sorted(split_of))
    task_config = tasks.TaskConfig(
        seed=config.seed, samples_per_page=config.samples_per_page, distractors=config.distractors
    )
    for name, key in TASK_KEYS.items():
        if key not in context.selected_asset_keys:
            continue
        try:
            dataset = tasks.generate_task(name, features, split_of, task_config)
        except tasks.TaskSkipped as skipped:
            context.log.warning(f"{name} skipped: {skipped.reason}")
            yield dg.MaterializeResult(
                asset_key=key, metadata={"skipped": skipped.reason},
                data_version=dg.DataVersion("skipped"),
            )
            continue
        buffer_path, digest = _save(storage, name, dataset)
        counts = {f"{split}_samples": dataset.n_samples(split) for split in schema.SPLITS}
        yield dg.MaterializeResult(
            asset_key=key,
            metadata={
                "path": dg.MetadataValue.path(buffer_path),
                **counts,
                "n_options": dataset.n_options,
                "chance": float(dataset.attrs["chance"]),
                "distractor_policy": str(dataset.attrs.get("distractor_policy", config.distractors)),
                "seed": config.seed,
            },
            data_version=dg.DataVersion(digest),
        )


def _save(storage: PipelineStorage, name: str, dataset: schema.TaskDataset) -> tuple[str, str]:
    """Write under a content-addressed name so a reader of an older record still finds its file."""
    digest = dataset.fingerprint()
    path = storage.path("tasks", name, f"{name}-{digest}.npz")
    if not fileio.exists(path):
        schema.save_task_dataset(path, dataset)
    return path, digest


def load_task_datasets(instance: dg.DagsterInstance) -> tuple[dict[str, schema.TaskDataset], dict[str, str]]:
    """The datasets the latest task materializations wrote, and the skip reason of the others."""
    datasets, skipped = {}, {}
    for name, key in TASK_KEYS.items():
        metadata = latest_metadata(instance, key)
        if "skipped" in metadata:
            skipped[name] = metadata["skipped"]
        else:
            datasets[name] = schema.load_task_dataset(metadata["path"])
    return datasets, skipped
