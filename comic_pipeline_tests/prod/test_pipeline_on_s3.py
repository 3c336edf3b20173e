"""The production profile for real: Dagster's instance on PostgreSQL, the home and both Zarr stores
on S3 (moto), MLflow through its tracking server (PostgreSQL backend, S3 artifacts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from fsspec.core import url_to_fs

from comic_pipeline import fileio, schema
from comic_pipeline.dagster_storage import postgres_storage_config
from comic_pipeline.definitions import defs
from comic_pipeline.demo import graph_definitions
from comic_pipeline.defs.keys import TASK_KEYS
from comic_pipeline.defs.report import materialization_metadata
from comic_pipeline.defs.resources import (
    MLflowTracking, PipelineStorage, RefIOManager, Stage3StoreResource, TorchDevice,
)
from comic_pipeline.embedding_store import ContextualizedStore
from comic_pipeline.tracking import load_model_uri
from comic_pipeline_tests.pipelines import (
    CHECKPOINT, NAMED_ROWS, NAMED_STORE, TINY_TRAINING, run_at_once, write_named_tiny_store,
)

# the first test also sets up the trained home, three servers and the whole graph on S3: on two
# cores shared with the browser lane that can pass 900 s (setup.cfg's default)
pytestmark = [pytest.mark.prod, pytest.mark.timeout(1800)]

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def postgres_instance_overrides(services) -> dict:
    """deploy/dagster.yaml's storage on the session's PostgreSQL (the event log pooled)."""
    return postgres_storage_config(services.dagster_postgres_db())


def s3_resources(home_url: str, mlflow_uri: str) -> dict:
    storage = PipelineStorage(home=home_url)
    return {
        "io_manager": RefIOManager(storage=storage),  # the refs on the edges land on S3 too
        "storage": storage,
        "stage3": Stage3StoreResource(storage=storage, url=fileio.join(home_url, NAMED_STORE),
                                      metadata_url=fileio.join(home_url, NAMED_ROWS)),
        "torch_device": TorchDevice(),
        "mlflow_tracking": MLflowTracking(storage=storage, tracking_uri=mlflow_uri,
                                          experiment_name="prod-s3", registered_model_name="comic-sequence-model"),
    }


def materialize(resources, instance, selection, run_config=None, tags=None):
    return dg.materialize(assets=graph_definitions(defs()), resources=resources, selection=selection,
                          instance=instance, run_config=run_config, tags=tags)


def embed_range(instance_ref, home_url: str, mlflow_uri: str, comic_ids: list[str]) -> bool:
    """One embedding run over `comic_ids`, in a process of its own (as a run worker would be)."""
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = materialize(s3_resources(home_url, mlflow_uri), instance, ["contextualized_embeddings"],
                             tags={RANGE_START: comic_ids[0], RANGE_END: comic_ids[-1]})
        return result.success


@dataclass
class S3Pipeline:
    home: str
    instance: dg.DagsterInstance
    resources: dict
    comic_ids: list[str]
    services: object


@pytest.fixture(scope="module")
def s3_pipeline(prod_services, prebuilt_home):
    home_url = f"s3://{prod_services.new_bucket('home')}/comic-pipeline"
    # The local prebuilt home trained on the same corpus (the whole tiny one as a legacy store of
    # named comics, written here too: fewer comics leave too few test samples for every gate),
    # config and code: its finished checkpoint on S3 makes sequence_model resume at its end (what a
    # crashed run's successor does) instead of training the same weights again; the run still
    # registers and logs every epoch's curves.
    with open(Path(prebuilt_home).joinpath(*CHECKPOINT), "rb") as handle:
        fileio.atomic_write_bytes(fileio.join(home_url, *CHECKPOINT), handle.read())
    resources = s3_resources(home_url, prod_services.mlflow_uri)
    with dg.instance_for_test(overrides=postgres_instance_overrides(prod_services)) as instance:
        instance.wipe()  # the session's `dagster` database may hold another module's runs
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PooledPostgresEventLogStorage"
        write_named_tiny_store(resources["stage3"].store_url(), resources["stage3"].metadata_url)
        materialize(resources, instance, ["stage3_store"])
        comic_ids = resources["stage3"].open().comic_ids()
        instance.add_dynamic_partitions("comics", comic_ids)
        keys = list(instance.get_dynamic_partitions("comics"))
        assert materialize(resources, instance, ["stage3_panel_embeddings"],
                           tags={RANGE_START: keys[0], RANGE_END: keys[-1]}).success
        graph = dg.AssetSelection.assets("comic_splits", "sequence_model", "champion_model") | \
            dg.AssetSelection.groups("tasks", "evaluation")
        assert materialize(resources, instance, graph,
                           run_config={"ops": {"sequence_model": {"config": TINY_TRAINING}}}).success
        trained = materialization_metadata(instance, dg.AssetKey("sequence_model"))
        assert trained["resumed_from_epoch"] == trained["epochs_run"] > 0, trained  # the same fingerprint
        assert materialize(resources, instance, ["contextualized_embeddings"],
                           tags={RANGE_START: keys[0], RANGE_END: keys[-1]}).success
        yield S3Pipeline(home_url, instance, resources, comic_ids, prod_services)


def test_every_file_the_graph_wrote_is_on_s3_under_the_home(s3_pipeline):
    instance = s3_pipeline.instance
    splits_path = materialization_metadata(instance, dg.AssetKey("comic_splits"))["path"]
    assert splits_path.startswith(s3_pipeline.home + "/")
    task_paths = [materialization_metadata(instance, key).get("path") for key in TASK_KEYS.values()
                  if instance.get_latest_materialization_event(key) is not None]
    assert task_paths and all(str(p).startswith(s3_pipeline.home + "/") for p in task_paths if p)
    for path in filter(None, task_paths):
        dataset = schema.load_task_dataset(path)  # the npz on S3 reads back whole
        assert dataset.splits
    fs, root = url_to_fs(s3_pipeline.home)
    fs.invalidate_cache()
    leftovers = [p for p in fs.find(root) if "/.tmp-" in p]
    assert leftovers == []  # no temporary sibling survives on S3


def _children(url: str, comic_id: str) -> list[str]:
    fs, path = url_to_fs(fileio.join(url, "comics", comic_id))
    fs.invalidate_cache()
    return sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False))


def test_champion_alias_is_set_through_the_tracking_server_and_loads(s3_pipeline):
    tracking = s3_pipeline.resources["mlflow_tracking"].tracking()
    assert tracking.tracking_uri == s3_pipeline.services.mlflow_uri
    champion = tracking.champion_version()
    assert champion is not None
    model = load_model_uri("models:/comic-sequence-model@champion", tracking.tracking_uri)
    assert model.config.d_model > 0
    # the run that resumed a finished checkpoint still carries the curves of every epoch
    history = tracking.client().get_metric_history(tracking.run_id_of(champion), "val_mean_accuracy")
    epochs = materialization_metadata(s3_pipeline.instance, dg.AssetKey("sequence_model"))["epochs_run"]
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))


def test_embeddings_land_on_s3_and_read_back(s3_pipeline):
    url = s3_pipeline.resources["storage"].contextualized_url()
    assert url.startswith("s3://")
    store = ContextualizedStore.open(url)
    validated = sorted(s3_pipeline.comic_ids)
    assert store.comic_ids() == validated
    champion = s3_pipeline.resources["mlflow_tracking"].tracking().champion_version()
    assert set(store.model_versions().values()) == {champion}
    comic = store.read(validated[0])
    assert comic.panel_embeddings.shape[:2] == comic.panel_mask.shape
    assert not np.any(comic.panel_embeddings[~comic.panel_mask])
    assert np.isfinite(comic.strip_embeddings).all()
    # each comic group on S3 is its pointer and one committed version, nothing else
    for comic_id in validated[:3]:
        assert _children(url, comic_id) == sorted(["zarr.json", store.attrs(comic_id)["current"]])


def test_two_embedding_runs_over_overlapping_comics_at_once_stay_correct(s3_pipeline):
    ids = s3_pipeline.comic_ids
    keys = list(s3_pipeline.instance.get_dynamic_partitions("comics"))
    ranges = [keys[:6], keys[3:9]]  # 3 comics written by both runs at once
    outcomes = run_at_once(embed_range, [(s3_pipeline.instance.get_ref(), s3_pipeline.home,
                                          s3_pipeline.services.mlflow_uri, r) for r in ranges])
    assert outcomes == [True, True]
    url = s3_pipeline.resources["storage"].contextualized_url()
    store = ContextualizedStore.open(url)
    assert store.comic_ids() == sorted(ids)
    for comic_id in ids:
        comic = store.read(comic_id)
        assert comic.panel_embeddings.shape[:2] == comic.panel_mask.shape
        assert np.isfinite(comic.strip_embeddings).all()
        # the pointer names a whole version; a displaced one waits for the collector's grace
        # period; no temporary object is left behind
        children = _children(url, comic_id)
        assert "zarr.json" in children and store.attrs(comic_id)["current"] in children
        assert all(child == "zarr.json" or child.startswith("v") for child in children), children
