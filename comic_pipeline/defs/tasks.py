"""Book-level splits and the seven task datasets (index-based samples into the Stage 3 store)."""


import hashlib
import io

import dagster as dg
from pydantic import Field

from comic_pipeline import fileio, schema, tasks
from comic_pipeline.defs.keys import COMIC_SPLITS, STAGE3_PANEL_EMBEDDINGS, TASK_KEYS, comics_partitions
from comic_pipeline.defs.datasets import PINS_ATTR, read_splits
from comic_pipeline.defs.refs import SplitsRef, TaskDatasetRef
from comic_pipeline.defs.resources import PipelineStorage, Stage3StoreResource
from comic_pipeline.quarantine import Quarantine
from comic_pipeline.splits import assign_splits


class SplitConfig(dg.Config):
    train: float = Field(default=0.8, description="Fraction of comics in train.")
    val: float = Field(default=0.1, description="Fraction of comics in val.")
    test: float = Field(default=0.1, description="Fraction of comics in test.")


@dg.asset(
    key=COMIC_SPLITS,
    group_name="tasks",
    deps=[STAGE3_PANEL_EMBEDDINGS],
    description=(
        "Book-level train/val/test assignment of every validated comic, from a stable hash of the "
        "comic id: a comic keeps its split whenever it arrives and never sits in two splits."
    ),
)
def comic_splits(
    context: dg.AssetExecutionContext, config: SplitConfig, storage: PipelineStorage
) -> dg.Output[SplitsRef]:
    # Which comics passed validation is partition status, not data: the instance knows it.
    registered = set(context.instance.get_dynamic_partitions(comics_partitions.name))
    validated = context.instance.get_materialized_partitions(STAGE3_PANEL_EMBEDDINGS)
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
    import pandas as pd  # here, not with the definitions every run process loads

    split_of = assign_splits(comic_ids, fractions=(config.train, config.val, config.test))
    table = pd.DataFrame({"comic_id": comic_ids, "split": [split_of[c] for c in comic_ids]})
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
    relative = f"splits/comic_splits-{digest}.parquet"
    path = storage.path(relative)
    fileio.atomic_write_bytes(path, buffer.getvalue())
    counts = table["split"].value_counts().reindex(list(schema.SPLITS), fill_value=0)
    preview = table.groupby("split")["comic_id"].apply(lambda ids: ", ".join(ids[:8]) + (" …" if len(ids) > 8 else ""))
    return dg.Output(
        SplitsRef(path=relative, fingerprint=digest,
                  counts={split: int(counts[split]) for split in schema.SPLITS}),
        metadata={
            "path": dg.MetadataValue.path(path),
            "fingerprint": digest,
            "comics": len(comic_ids),
            **{f"{split}_comics": int(counts[split]) for split in schema.SPLITS},
            "preview": dg.MetadataValue.md(
                "| split | comics | examples |\n|---|---|---|\n"
                + "\n".join(f"| {s} | {int(counts[s])} | {preview.get(s, '')} |" for s in schema.SPLITS)
            ),
        },
        data_version=dg.DataVersion(digest),
    )


class TaskGenerationConfig(dg.Config):
    seed: int = Field(default=0, description="Generation seed: the same seed, the same datasets.")
    samples_per_page: int = Field(default=4, description="Samples drawn from each eligible page.")
    distractors: str = Field(default="hard", description="hard (same comic, other pages) or easy "
                             "(other comics); text_cloze always makes both variants.")
    match_similarity: bool = Field(default=True, description="Match distractors to the answer's "
                                   "similarity to the context (the demo corpus's shortcut bar). Off for "
                                   "real comics, where a line's likeness to its context is content: "
                                   "comics_run turns it off. Slot matching stays on either way.")


@dg.multi_asset(
    outs={
        name: dg.AssetOut(
            key=key, group_name="tasks", is_required=False,
            description=f"{tasks.TASKS[name].description} Index-based samples per split "
            "(references into the Stage 3 store, not copies).",
        )
        for name, key in TASK_KEYS.items()
    },
    ins={"comic_splits": dg.AssetIn(COMIC_SPLITS)},
    can_subset=True,
)
def task_datasets(
    context: dg.AssetExecutionContext,
    config: TaskGenerationConfig,
    stage3: Stage3StoreResource,
    storage: PipelineStorage,
    comic_splits: SplitsRef,
):
    """One step generates every selected task, so the store is read once."""
    split_of = read_splits(storage, comic_splits)
    store = stage3.open()
    features, content_hashes = store.load_pinned(sorted(split_of))  # pinned in every dataset
    task_config = tasks.TaskConfig(
        seed=config.seed, samples_per_page=config.samples_per_page, distractors=config.distractors,
        match_similarity=config.match_similarity,
    )
    for name, key in TASK_KEYS.items():
        if key not in context.selected_asset_keys:
            continue
        spec = tasks.TASKS[name]
        try:
            dataset = tasks.generate_task(name, features, split_of, task_config)
        except tasks.TaskSkipped as skipped:
            context.log.warning(f"{name} skipped: {skipped.reason}")
            ref = TaskDatasetRef(task=name, path=None, fingerprint=None, n_options=spec.n_options,
                                 chance=spec.chance(), splits_fingerprint=comic_splits.fingerprint,
                                 skipped=skipped.reason)
            yield dg.Output(ref, output_name=name, metadata={"skipped": skipped.reason},
                            data_version=dg.DataVersion("skipped"))
            continue
        used = dict.fromkeys(dataset.comic_ids)
        dataset.attrs[PINS_ATTR] = {str(comic_id): content_hashes[comic_id] for comic_id in used}
        relative, digest = _save(storage, name, dataset)
        chance = float(dataset.attrs.get("chance", spec.chance()))
        ref = TaskDatasetRef(task=name, path=relative, fingerprint=digest, n_options=dataset.n_options,
                             chance=chance, splits_fingerprint=comic_splits.fingerprint)
        counts = {f"{split}_samples": dataset.n_samples(split) for split in schema.SPLITS}
        yield dg.Output(
            ref,
            output_name=name,
            metadata={
                "path": dg.MetadataValue.path(storage.path(relative)),
                "fingerprint": digest,
                **counts,
                "n_options": dataset.n_options,
                "chance": chance,
                "distractor_policy": str(dataset.attrs.get("distractor_policy", config.distractors)),
                "similarity_matched": bool(dataset.attrs.get("similarity_matched", config.match_similarity)),
                **({"slot_oracle_accuracy": float(dataset.attrs["slot_oracle_accuracy"])}
                   if "slot_oracle_accuracy" in dataset.attrs else {}),  # ~chance: no slot shortcut
                "seed": config.seed,
                "splits_fingerprint": comic_splits.fingerprint,
            },
            data_version=dg.DataVersion(digest),
        )


def _save(storage: PipelineStorage, name: str, dataset: schema.TaskDataset) -> tuple[str, str]:
    """Write under a content-addressed name, so every ref ever made still finds its file.
    Returns (path relative to the home, fingerprint)."""
    digest = dataset.fingerprint()
    relative = f"tasks/{name}/{name}-{digest}.npz"
    if not fileio.exists(storage.path(relative)):
        schema.save_task_dataset(storage.path(relative), dataset)
    return relative, digest
