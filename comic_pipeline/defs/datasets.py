"""Reading what a ref names: the splits table and the task datasets, each checked against the
fingerprint its ref carries (a ref never silently points at other data)."""

from typing import Mapping

import dagster as dg

from comic_pipeline import fileio, schema
from comic_pipeline.defs.refs import SplitsRef, TaskDatasetRef
from comic_pipeline.defs.resources import PipelineStorage, Stage3StoreResource
from comic_pipeline.store import Stage3Changed

PINS_ATTR = "stage3_content_hashes"  # TaskDataset.attrs: {comic key: Stage 3 content hash} it was made from


def read_splits(storage: PipelineStorage, splits: SplitsRef) -> dict[str, str]:
    """comic id -> split, from the table `splits` names."""
    import pandas as pd  # here, not with the definitions every run process loads

    with fileio.open_binary(storage.path(splits.path)) as handle:
        table = pd.read_parquet(handle)
    return dict(zip(table["comic_id"], table["split"]))


def load_task_dataset(storage: PipelineStorage, ref: TaskDatasetRef) -> schema.TaskDataset:
    if ref.skipped is not None:
        raise ValueError(f"{ref.task} was skipped ({ref.skipped}): there is no dataset to load")
    dataset = schema.load_task_dataset(storage.path(ref.path))
    if dataset.fingerprint() != ref.fingerprint:
        raise dg.Failure(f"{ref.task}: {ref.path} holds dataset {dataset.fingerprint()}, not "
                         f"{ref.fingerprint} as its ref says: the home was changed by hand.")
    return dataset


def load_task_datasets(
    storage: PipelineStorage, task_refs: Mapping[str, TaskDatasetRef]
) -> tuple[dict[str, schema.TaskDataset], dict[str, str]]:
    """The datasets `task_refs` name, and the skip reason of the skipped tasks."""
    datasets = {name: load_task_dataset(storage, ref) for name, ref in task_refs.items()
                if ref.skipped is None}
    skipped = {name: ref.skipped for name, ref in task_refs.items() if ref.skipped is not None}
    return datasets, skipped


def pinned_features(stage3: Stage3StoreResource, datasets: Mapping[str, schema.TaskDataset]
                    ) -> schema.PageFeatures:
    """The Stage 3 features of every comic the datasets index, checked against the content
    hashes the datasets were generated from: a comic Stage 3 rewrote since fails, by name."""
    first = next(iter(datasets.values()))
    comic_ids = [str(comic_id) for comic_id in dict.fromkeys(first.comic_ids)]
    pins: dict[str, str] = {}
    for dataset in datasets.values():
        pins.update(dataset.attrs.get(PINS_ATTR, {}))
    try:
        features, _ = stage3.open().load_pinned(comic_ids, pins or None)  # old datasets: no pins
    except Stage3Changed as error:
        raise dg.Failure(description=str(error)) from error
    return features
