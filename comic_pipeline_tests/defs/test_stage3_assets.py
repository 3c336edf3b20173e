"""stage3 assets against configured stores: the legacy layout, and a bad comic."""

import dagster as dg
import numpy as np
import zarr

from comic_pipeline import store as stage3_store_module
from comic_pipeline.defs.resources import PipelineStorage, Stage3StoreResource, build_resources
from comic_pipeline.quarantine import Quarantine
from comic_pipeline_tests.test_store import build_legacy_store

from .conftest import Pipeline, make_home


def _pipeline(tmp_path, migrated_mlflow_db, instance, stage3: Stage3StoreResource) -> Pipeline:
    root = make_home(tmp_path / "home", migrated_mlflow_db)
    storage = PipelineStorage(home=str(root))
    resources = {**build_resources(storage), "stage3": stage3.model_copy(update={"storage": storage})}
    return Pipeline(root, instance, resources, [])


def test_a_legacy_store_is_described_and_validated_per_comic(tmp_path, migrated_mlflow_db):
    url, metadata_url, truth = build_legacy_store(tmp_path, {"series/vol1": 5, "other": 3})
    with dg.instance_for_test() as instance:
        pipeline = _pipeline(tmp_path, migrated_mlflow_db, instance,
                             Stage3StoreResource(storage=PipelineStorage(), url=url, metadata_url=metadata_url))
        pipeline.materialize(["stage3_store"])
        described = instance.get_latest_materialization_event(dg.AssetKey("stage3_store"))
        metadata = described.asset_materialization.metadata
        assert metadata["layout"].value == "legacy" and metadata["demo"].value is False
        assert metadata["comics"].value == 2
        instance.add_dynamic_partitions("comics", sorted(truth))
        result = pipeline.materialize_all_comics(["stage3_panel_embeddings"])
        assert result.success
        assert instance.get_materialized_partitions(dg.AssetKey("stage3_panel_embeddings")) == set(truth)
        assert not (tmp_path / "home" / "stage3_demo.zarr").exists()  # a configured store is not overwritten


def test_a_bad_comic_fails_validation_naming_comic_and_array(tmp_path, migrated_mlflow_db):
    url = str(tmp_path / "bad.zarr")
    stage3_store_module.create_native_store(url, dim=8, max_panels=4)
    good = {"panel_embeddings": np.ones((2, 4, 8), np.float32),
            "panel_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)}
    stage3_store_module.write_native_comic(url, "good-comic", page_ids=["p1", "p2"], title="ok", arrays=good)
    # Stage 3 wrote a NaN into a valid panel: bypass our writer's checks the way a foreign writer would
    zarr.open_group(url, mode="r+")["comics/good-comic/panel_embeddings"][1, 2, 3] = np.nan
    with dg.instance_for_test() as instance:
        pipeline = _pipeline(tmp_path, migrated_mlflow_db, instance,
                             Stage3StoreResource(storage=PipelineStorage(), url=url))
        instance.add_dynamic_partitions("comics", ["good-comic"])
        result = pipeline.materialize(["stage3_panel_embeddings"], raise_on_error=False,
                                      tags={"dagster/partition": "good-comic"})
        assert not result.success
        error = str(result.failure_data_for_node("stage3_panel_embeddings").error)
        assert "good-comic" in error and "panel_embeddings" in error
        assert not instance.get_materialized_partitions(dg.AssetKey("stage3_panel_embeddings"))


def test_one_bad_comic_in_a_many_comic_run_leaves_the_others_validated(tmp_path, migrated_mlflow_db):
    url = str(tmp_path / "mixed.zarr")
    stage3_store_module.create_native_store(url, dim=8, max_panels=4)
    arrays = {"panel_embeddings": np.ones((2, 4, 8), np.float32),
              "panel_mask": np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)}
    for comic_id in ("a-good", "b-bad", "c-good"):
        stage3_store_module.write_native_comic(url, comic_id, page_ids=["p1", "p2"], title=comic_id,
                                               arrays=arrays)
    zarr.open_group(url, mode="r+")["comics/b-bad/panel_embeddings"][0, 1, 2] = np.inf
    with dg.instance_for_test() as instance:
        pipeline = _pipeline(tmp_path, migrated_mlflow_db, instance,
                             Stage3StoreResource(storage=PipelineStorage(), url=url))
        instance.add_dynamic_partitions("comics", ["a-good", "b-bad", "c-good"])
        result = pipeline.materialize_all_comics(["stage3_panel_embeddings"], raise_on_error=False)
        assert result.success  # the bad comic is quarantined, not a failed run for the good ones
        (observed,) = result.asset_observations_for_node("stage3_panel_embeddings")
        assert observed.partition == "b-bad"
        assert "b-bad" in observed.metadata["error"].value and "panel_embeddings" in observed.metadata["error"].value
        assert instance.get_materialized_partitions(dg.AssetKey("stage3_panel_embeddings")) == {"a-good", "c-good"}
        assert set(Quarantine(pipeline.resources["storage"].root()).records()) == {"b-bad"}
