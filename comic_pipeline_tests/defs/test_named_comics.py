"""Issue 11 through the Dagster layer: real collection names, quarantined comics, vanished comics.

Names in the legacy layout go through the whole graph in the prebuilt home (its store is
pipelines.write_named_tiny_store; test_pipeline.py asserts names, grouping and page order there).
Here the native layout does, with every modality, a broken comic and a vanished one: sensor,
store, validation, splits, all seven tasks and the embeddings, made by the prebuilt home's
champion. Training is left out on purpose: it would be a second training in the suite, and it
reads comics only through the task datasets' pins, which are checked here.
"""

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import zarr

from comic_pipeline import corpus, home, schema
from comic_pipeline.comic_names import comic_key
from comic_pipeline.defs.automation import new_comics_sensor
from comic_pipeline.defs.datasets import PINS_ATTR
from comic_pipeline.defs.keys import COMIC_SPLITS, TASK_KEYS
from comic_pipeline.defs.report import materialization_metadata
from comic_pipeline.embedding_store import ContextualizedStore
from comic_pipeline.page_search import PageSearch
from comic_pipeline.quarantine import Quarantine
from comic_pipeline_tests.named_stores import COMIC_NAMES

from .conftest import DAGSTER_FOLDER, RANGE_END, RANGE_START, copy_home, make_home, open_pipeline

NATIVE = dataclasses.replace(corpus.SIZES["tiny"], n_comics=len(COMIC_NAMES))
TASKS_AND_SPLITS = dg.AssetSelection.assets(COMIC_SPLITS) | dg.AssetSelection.groups("tasks")


def _sensor(pipeline):
    with dg.build_sensor_context(instance=pipeline.instance, resources=pipeline.resources) as context:
        return new_comics_sensor(context)


def _home_with_a_champion(prebuilt_home: Path, root: Path) -> Path:
    """The prebuilt home's champion (MLflow, refs) in a home that has never seen a comic: a new
    Dagster instance and no output store."""
    copy_home(prebuilt_home, root)
    shutil.rmtree(root / DAGSTER_FOLDER)
    shutil.rmtree(home.contextualized_store_url(str(root)))
    return root


def test_a_named_native_store_with_a_bad_and_a_vanished_comic(prebuilt_home, tmp_path):
    url = str(tmp_path / "native.zarr")
    keys = corpus.write_demo_store(url, NATIVE, names=COMIC_NAMES)  # every modality
    names = dict(zip(keys, COMIC_NAMES))
    pages = {name: corpus.generate_comic(NATIVE, i, name).page_ids for i, name in enumerate(COMIC_NAMES)}
    bad_name = "Calvin & Hobbes"  # breaks: a NaN in a valid slot of its second page
    bad = comic_key(bad_name)
    zarr.open_group(url, mode="r+")[f"comics/{bad_name}/panel_embeddings"][1, 0, 3] = np.nan
    good = sorted(set(keys) - {bad})

    root = _home_with_a_champion(prebuilt_home, tmp_path / "home")
    with open_pipeline(root, stage3_url=url) as pipeline:
        instance = pipeline.instance
        # the sensor registers every comic under the key of its name and validates them in ONE run
        result = _sensor(pipeline)
        (added,) = result.dynamic_partitions_requests
        assert sorted(added.partition_keys) == sorted(keys) == sorted(comic_key(n) for n in COMIC_NAMES)
        (run,) = result.run_requests
        assert (run.tags[RANGE_START], run.tags[RANGE_END]) == (min(keys), max(keys))
        instance.add_dynamic_partitions("comics", list(added.partition_keys))

        assert pipeline.materialize(["stage3_store"]).success
        described = materialization_metadata(instance, dg.AssetKey("stage3_store"))
        assert (described["layout"], described["comics"], described["demo"]) == ("native", 20, False)
        assert described["modalities"] == "caption, fused, text, visual"

        # the bad comic is quarantined; the other 19 are validated, each under its original name
        validation = pipeline.materialize(run.asset_selection, tags=run.tags)
        validated = {m.partition: m.metadata for m in validation.asset_materializations_for_node("stage3_panel_embeddings")}
        assert sorted(validated) == good
        for key in good:
            assert validated[key]["comic"].value == names[key]
            assert validated[key]["pages"].value == len(pages[names[key]])
        (observed,) = validation.asset_observations_for_node("stage3_panel_embeddings")
        assert observed.partition == bad and observed.metadata["comic"].value == bad_name
        (record,) = Quarantine(str(root)).records().values()
        assert (record.comic_id, record.name) == (bad, bad_name)
        assert record.error.startswith(f"comic {bad_name!r}, array 'panel_embeddings': 1 valid slot(s) "
                                       f"hold NaN or Inf, first on page '{bad_name}/page_2.jpg'")
        assert observed.metadata["error"].value == record.error

        # every task is generated from the 19 good comics, each pinned to what was validated
        assert pipeline.materialize(TASKS_AND_SPLITS).success
        assert sum(pipeline.stored(COMIC_SPLITS).counts.values()) == 19
        storage = pipeline.resources["storage"]
        for name, key in TASK_KEYS.items():
            ref = pipeline.stored(key)
            assert ref.skipped is None, (name, ref.skipped)
            pins = schema.load_task_dataset(storage.path(ref.path)).attrs[PINS_ATTR]
            assert set(pins) <= set(good) and all(pins[k] == validated[k]["content_hash"].value for k in pins)

        # the embeddings (the backfill a user launches), by the champion, under the original names
        embedded = pipeline.materialize(["contextualized_embeddings"], tags=run.tags)
        assert sorted(m.partition for m in embedded.asset_materializations_for_node("contextualized_embeddings")) == good
        (skipped,) = embedded.asset_observations_for_node("contextualized_embeddings")
        assert skipped.partition == bad and skipped.metadata["skipped"].value == f"quarantined: {record.error}"
        output = ContextualizedStore.open(storage.contextualized_url())
        assert output.comic_names() == {key: names[key] for key in good}
        champion = pipeline.tracking().champion_version()
        for key in good:
            comic = output.read(key)  # its own pages, in natural order (page_2 before page_10)
            assert comic.attrs["comic_name"] == names[key] and comic.page_ids == pages[names[key]]
            assert comic.strip_embeddings.shape[0] == len(pages[names[key]])
            assert comic.attrs["model_version"] == champion
        assert any(len(p) == 10 for p in pages.values())
        tintin = "Tintin - L'Île noire"
        hits = PageSearch(output).nearest_pages((tintin, 0), k=8)
        assert len(hits) == 8 and all(names[k] == n for k, n in zip(hits["comic_id"], hits["comic_name"]))

        # a comic vanishes from the store: the sensor retires it; splits and tasks go on without it
        gone = "Batman: Year One"
        shutil.rmtree(Path(url) / "comics" / gone)
        result = _sensor(pipeline)
        assert isinstance(result, dg.SensorResult) and not result.run_requests
        (retire,) = result.dynamic_partitions_requests
        assert isinstance(retire, dg.DeleteDynamicPartitionsRequest)
        assert list(retire.partition_keys) == [comic_key(gone)]
        instance.delete_dynamic_partition("comics", comic_key(gone))
        assert pipeline.materialize(TASKS_AND_SPLITS).success
        assert sum(pipeline.stored(COMIC_SPLITS).counts.values()) == 18


def test_sensor_says_when_a_configured_store_does_not_exist(tmp_path, migrated_mlflow_db):
    root = make_home(tmp_path / "home", migrated_mlflow_db)
    with open_pipeline(root, stage3_url=str(tmp_path / "nowhere.zarr")) as pipeline:
        skip = _sensor(pipeline)
        assert isinstance(skip, dg.SkipReason)
        assert skip.skip_message == (f"The configured Stage 3 store {tmp_path / 'nowhere.zarr'} does not "
                                     "exist (check COMIC_STAGE3_STORE or the stage3 resource's url).")
