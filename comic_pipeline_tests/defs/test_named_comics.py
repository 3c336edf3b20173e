"""Issue 11 through the Dagster layer: real collection names, quarantined comics, vanished comics."""

import json

import dagster as dg
import zarr

from comic_pipeline.comic_names import comic_key
from comic_pipeline.defs.automation import new_comics_sensor
from comic_pipeline.defs.resources import PipelineStorage, Stage3StoreResource, build_resources
from comic_pipeline.quarantine import Quarantine
from comic_pipeline_tests.named_stores import COMIC_NAMES, legacy_named_store

from .conftest import RANGE_END, RANGE_START, Pipeline, make_home


def _pipeline(tmp_path, migrated_mlflow_db, instance, url, metadata_url) -> Pipeline:
    root = make_home(tmp_path / "home", migrated_mlflow_db)
    storage = PipelineStorage(home=str(root))
    stage3 = Stage3StoreResource(storage=storage, url=url, metadata_url=metadata_url)
    return Pipeline(root, instance, {**build_resources(storage), "stage3": stage3}, [])


def _sensor(pipeline):
    with dg.build_sensor_context(instance=pipeline.instance, resources=pipeline.resources) as context:
        return new_comics_sensor(context)


def test_named_legacy_store_with_a_bad_and_a_vanished_comic(tmp_path, migrated_mlflow_db):
    named = legacy_named_store(tmp_path)
    bad_name = "Calvin & Hobbes"
    bad_row = None
    with open(named.metadata_url) as handle:
        records = json.load(handle)
    bad_row = next(r["sequence_index"] for r in records if r["canonical_id"] == f"{bad_name}/page_2.jpg")
    zarr.open_group(named.url, mode="r+")["panel_embeddings"][bad_row, 0, 3] = float("nan")

    with dg.instance_for_test() as instance:
        pipeline = _pipeline(tmp_path, migrated_mlflow_db, instance, named.url, named.metadata_url)
        # the sensor registers every comic under its key and validates them all in ONE run
        result = _sensor(pipeline)
        (added,) = result.dynamic_partitions_requests
        assert sorted(added.partition_keys) == sorted(named.keys())
        (run,) = result.run_requests
        assert (run.tags[RANGE_START], run.tags[RANGE_END]) == (min(named.keys()), max(named.keys()))
        instance.add_dynamic_partitions("comics", sorted(named.keys()))

        pipeline.materialize(["stage3_store"])
        described = instance.get_latest_materialization_event(dg.AssetKey("stage3_store"))
        assert described.asset_materialization.metadata["comics"].value == 20

        # one run validates all 20 comics: the bad one is quarantined, the other 19 go on, each
        # with its own materialization carrying its original name
        keys = sorted(named.keys())
        result = pipeline.materialize(["stage3_panel_embeddings"], tags={RANGE_START: keys[0], RANGE_END: keys[-1]})
        assert result.success
        materialized = {m.partition: m.metadata
                        for m in result.asset_materializations_for_node("stage3_panel_embeddings")}
        assert len(materialized) == 19 and comic_key(bad_name) not in materialized
        tintin = "Tintin - L'Île noire"
        assert materialized[comic_key(tintin)]["comic"].value == tintin
        (observed,) = result.asset_observations_for_node("stage3_panel_embeddings")
        assert observed.partition == comic_key(bad_name)
        assert observed.metadata["comic"].value == bad_name and "NaN or Inf" in observed.metadata["error"].value
        (record,) = Quarantine(str(pipeline.home)).records().values()
        assert (record.comic_id, record.name) == (comic_key(bad_name), bad_name)
        assert record.error.startswith(f"comic {bad_name!r}, array 'panel_embeddings': 1 valid slot(s) "
                                       f"hold NaN or Inf, first on page '{bad_name}/page_2.jpg'")

        pipeline.materialize(["comic_splits"])
        splits = instance.get_latest_materialization_event(dg.AssetKey("comic_splits"))
        assert splits.asset_materialization.metadata["comics"].value == 19  # the bad one is left out

        # a comic vanishes from the store: the sensor retires its partition
        gone = "Batman: Year One"
        with open(named.metadata_url, "w") as handle:
            json.dump([r for r in records if not r["canonical_id"].startswith(gone + "/")], handle)
        result = _sensor(pipeline)
        assert isinstance(result, dg.SensorResult) and not result.run_requests
        (retire,) = result.dynamic_partitions_requests
        assert isinstance(retire, dg.DeleteDynamicPartitionsRequest)
        assert list(retire.partition_keys) == [comic_key(gone)]


def test_sensor_says_when_a_configured_store_does_not_exist(tmp_path, migrated_mlflow_db):
    with dg.instance_for_test() as instance:
        pipeline = _pipeline(tmp_path, migrated_mlflow_db, instance, str(tmp_path / "nowhere.zarr"), None)
        skip = _sensor(pipeline)
        assert isinstance(skip, dg.SkipReason)
        assert "configured Stage 3 store" in skip.skip_message and "does not exist" in skip.skip_message
        assert "demo corpus" not in skip.skip_message
    assert len(COMIC_NAMES) == 20
