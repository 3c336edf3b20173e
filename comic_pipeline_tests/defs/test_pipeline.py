"""materialize() tests of the asset graph on the tiny corpus, with temporary stores and MLflow."""

from __future__ import annotations

import dagster as dg
import mlflow
import numpy as np
import pytest

from comic_pipeline import schema, tasks
from comic_pipeline.defs.automation import new_comics_sensor
from comic_pipeline.defs.evaluation import EVALUATION_KEYS
from comic_pipeline.defs.lineage import latest_metadata
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, build_resources
from comic_pipeline.defs.tasks import TASK_KEYS
from comic_pipeline.embedding_store import ContextualizedStore

from .conftest import TINY_COMICS, make_home, start_pipeline, training_run_config


def _metadata(instance, key, partition=None):
    return latest_metadata(instance, key, partition)


def test_demo_store_and_validation_partitions(trained_pipeline):
    instance = trained_pipeline.instance
    store = _metadata(instance, dg.AssetKey("stage3_store"))
    assert store["comics"] == TINY_COMICS and store["demo"] is True and store["layout"] == "native"
    validated = instance.get_materialized_partitions(dg.AssetKey("stage3_panel_embeddings"))
    assert validated == set(trained_pipeline.comic_ids)


def test_splits_and_task_datasets_are_recorded(trained_pipeline):
    instance = trained_pipeline.instance
    splits = _metadata(instance, dg.AssetKey("comic_splits"))
    assert splits["train_comics"] + splits["val_comics"] + splits["test_comics"] == TINY_COMICS
    assert min(splits["train_comics"], splits["val_comics"], splits["test_comics"]) > 0
    for name, key in TASK_KEYS.items():
        task = _metadata(instance, key)
        assert "skipped" not in task, (name, task)
        assert task["train_samples"] > 0 and task["test_samples"] > 0, name
        assert task["chance"] == pytest.approx(tasks.TASKS[name].chance(), nan_ok=True) or name == "reading_order"
        dataset = schema.load_task_dataset(task["path"])
        assert dataset.task == name


def test_training_is_tracked_in_one_mlflow_run_with_a_registered_version(trained_pipeline):
    meta = _metadata(trained_pipeline.instance, dg.AssetKey("sequence_model"))
    tracking = trained_pipeline.tracking()
    run = tracking.client().get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster_asset_key"] == "sequence_model"
    assert "dagster_run_id" in run.data.tags and "code_version" in run.data.tags
    assert "lr" in run.data.params
    assert any(name.startswith("val_accuracy_") for name in run.data.metrics)
    version = tracking.client().get_model_version(tracking.registered_model_name, meta["model_version"])
    assert version.run_id == meta["mlflow_run_id"]
    assert meta["model_uri"] == f"models:/{tracking.registered_model_name}/{meta['model_version']}"


def test_evaluation_metrics_gates_and_champion(trained_pipeline):
    instance = trained_pipeline.instance
    tracking = trained_pipeline.tracking()
    model = _metadata(instance, dg.AssetKey("sequence_model"))
    run_metrics = tracking.client().get_run(model["mlflow_run_id"]).data.metrics
    for name, key in EVALUATION_KEYS.items():
        m = _metadata(instance, key)
        for field in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "chance", "best_shortcut",
                      "n_samples", "model_version"):
            assert field in m, (name, field)
        assert m["model_version"] == model["model_version"]
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
        assert f"test_{name}_accuracy" in run_metrics
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(key, "beats_chance"), dg.AssetCheckKey(key, "beats_shortcuts")])
        assert {c.status.value for c in checks.values()} == {"SUCCEEDED"}, name
    reading = _metadata(instance, EVALUATION_KEYS["reading_order"])
    assert {"kendall_tau", "pairwise_accuracy", "exact_match"} <= set(reading)
    summary = _metadata(instance, dg.AssetKey(["evaluation", "summary"]))
    assert "| sequence_filling |" in summary["summary"] and "data:image/png;base64," in summary["summary"]
    assert summary["strip_view_recall_at_1"] > summary["strip_view_recall_at_1_chance"]
    artifacts = {a.path for a in tracking.client().list_artifacts(model["mlflow_run_id"], "evaluation")}
    assert {"evaluation/summary.md", "evaluation/test_accuracy.png", "evaluation/training_curves.png"} <= artifacts
    assert tracking.champion_version() == model["model_version"]


def test_contextualized_embeddings_are_stamped_with_the_champion(trained_pipeline):
    result = trained_pipeline.materialize_all_comics(["contextualized_embeddings"])
    assert result.success
    tracking = trained_pipeline.tracking()
    url = trained_pipeline.resources["storage"].contextualized_url()
    store = ContextualizedStore.open(url)
    assert store.comic_ids() == sorted(trained_pipeline.comic_ids)
    assert set(store.model_versions().values()) == {tracking.champion_version()}
    comic = store.read(trained_pipeline.comic_ids[0])
    assert not np.any(comic.panel_embeddings[~comic.panel_mask])  # padded slots are zero
    assert comic.strip_embeddings.shape[0] == comic.panel_mask.shape[0]


def test_random_model_fails_the_gates_and_does_not_become_champion(trained_pipeline):
    tracking = trained_pipeline.tracking()
    champion_before = tracking.champion_version()
    result = trained_pipeline.materialize(
        dg.AssetSelection.assets("sequence_model", "champion_model") | dg.AssetSelection.groups("evaluation"),
        run_config=training_run_config(max_steps=0), raise_on_error=False,
    )
    assert not result.success
    new_version = _metadata(trained_pipeline.instance, dg.AssetKey("sequence_model"))["model_version"]
    assert new_version != champion_before
    assert tracking.champion_version() == champion_before
    # champion_model alone cannot bypass the failed gates either
    alone = trained_pipeline.materialize(["champion_model"], raise_on_error=False)
    assert not alone.success and tracking.champion_version() == champion_before


def test_training_refuses_to_run_untracked(tmp_path, migrated_mlflow_db):
    with dg.instance_for_test() as instance:
        pipeline = start_pipeline(tmp_path / "home", migrated_mlflow_db, instance, n_comics=6)
        storage = pipeline.resources["storage"]
        resources = {**pipeline.resources,
                     "mlflow_tracking": MLflowTracking(storage=storage, tracking_uri="http://127.0.0.1:9")}
        pipeline.materialize_all_comics(["stage3_panel_embeddings"])
        pipeline.materialize(dg.AssetSelection.assets("comic_splits") | dg.AssetSelection.groups("tasks"))
        result = pipeline.materialize(["sequence_model"], run_config=training_run_config(),
                                      resources=resources, raise_on_error=False)
        assert not result.success
        failure = result.failure_data_for_node("sequence_model")
        assert "unreachable" in str(failure.error) and "untracked" in str(failure.error)


def _evaluate_sensor(instance, resources):
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        return new_comics_sensor(context)


def test_new_comics_sensor_adds_partitions_and_requests_runs(tmp_path, migrated_mlflow_db):
    import dataclasses

    from comic_pipeline import corpus

    with dg.instance_for_test() as instance:
        root = make_home(tmp_path / "home", migrated_mlflow_db)
        resources = build_resources(PipelineStorage(home=str(root)))
        assert isinstance(_evaluate_sensor(instance, resources), dg.SkipReason)  # no store yet
        corpus.write_demo_store(resources["stage3"].store_url(),
                                dataclasses.replace(corpus.SIZES["tiny"], n_comics=3))
        result = _evaluate_sensor(instance, resources)
        assert isinstance(result, dg.SensorResult)
        (request,) = result.dynamic_partitions_requests
        assert sorted(request.partition_keys) == resources["stage3"].open().comic_ids()
        assert sorted(r.run_key for r in result.run_requests) == [
            f"new-comic:{c}" for c in sorted(request.partition_keys)]
        # no champion yet: validation only
        assert all(r.asset_selection == [dg.AssetKey("stage3_panel_embeddings")] for r in result.run_requests)
        instance.add_dynamic_partitions("comics", list(request.partition_keys))
        assert isinstance(_evaluate_sensor(instance, resources), dg.SkipReason)


def _check_result(pipeline, check_name: str):
    from comic_pipeline.defs.embeddings import embeddings_made_by_champion

    result = pipeline.materialize(
        dg.AssetSelection.checks(embeddings_made_by_champion), raise_on_error=False
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_a_new_champion_marks_old_embeddings_stale_and_a_backfill_refreshes_them(trained_pipeline):
    pipeline = trained_pipeline
    if not pipeline.instance.get_materialized_partitions(dg.AssetKey("contextualized_embeddings")):
        assert pipeline.materialize_all_comics(["contextualized_embeddings"]).success
    assert _check_result(pipeline, "embeddings_made_by_champion").passed
    old_champion = pipeline.tracking().champion_version()
    retrain = pipeline.materialize(
        dg.AssetSelection.assets("sequence_model", "champion_model") | dg.AssetSelection.groups("evaluation"),
        run_config=training_run_config(seed=1),
    )
    assert retrain.success
    new_champion = pipeline.tracking().champion_version()
    assert new_champion != old_champion
    stale = _check_result(pipeline, "embeddings_made_by_champion")
    assert not stale.passed
    assert stale.metadata["stale_comics"].value == len(pipeline.comic_ids)
    assert pipeline.materialize_all_comics(["contextualized_embeddings"]).success  # the one backfill
    assert _check_result(pipeline, "embeddings_made_by_champion").passed
    url = pipeline.resources["storage"].contextualized_url()
    assert set(ContextualizedStore.open(url).model_versions().values()) == {new_champion}


def _embed_range(instance_ref, home: str, comics: list[str]) -> bool:
    """One Dagster run in its own process, as a sensor run and a backfill run would be."""
    import torch

    from comic_pipeline.definitions import defs
    from comic_pipeline.demo import graph_definitions

    torch.set_num_threads(1)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = dg.materialize(
            graph_definitions(defs()), selection=["contextualized_embeddings"], instance=instance,
            resources=build_resources(PipelineStorage(home=home)), raise_on_error=False,
            tags={"dagster/asset_partition_range_start": comics[0],
                  "dagster/asset_partition_range_end": comics[-1]},
        )
        return result.success


def test_two_embedding_runs_over_different_comics_at_once_both_complete(trained_pipeline):
    import multiprocessing

    pipeline = trained_pipeline
    half = len(pipeline.comic_ids) // 2
    ranges = [pipeline.comic_ids[:half], pipeline.comic_ids[half:]]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        outcomes = pool.starmap(
            _embed_range, [(pipeline.instance.get_ref(), str(pipeline.home), r) for r in ranges]
        )
    assert outcomes == [True, True]
    store = ContextualizedStore.open(pipeline.resources["storage"].contextualized_url())
    champion = pipeline.tracking().champion_version()
    assert store.comic_ids() == sorted(pipeline.comic_ids)
    for comic_id in pipeline.comic_ids:
        comic = store.read(comic_id)
        assert comic.attrs["model_version"] == champion
        assert comic.panel_embeddings.shape[:2] == comic.panel_mask.shape
        assert np.isfinite(comic.strip_embeddings).all()


def test_a_comic_added_to_the_store_is_found_and_embedded(trained_pipeline):
    """Runs last: it adds a comic to the shared store."""
    import dataclasses

    from comic_pipeline import corpus, store

    pipeline = trained_pipeline
    config = dataclasses.replace(corpus.SIZES["tiny"], n_comics=TINY_COMICS + 1)
    new = corpus.generate_comic(config, TINY_COMICS)  # the next comic of the same generator
    store.write_native_comic(pipeline.resources["stage3"].store_url(), new.comic_id,
                             page_ids=new.page_ids, title=new.title, arrays=new.arrays)
    result = _evaluate_sensor(pipeline.instance, pipeline.resources)
    (request,) = result.run_requests
    assert request.partition_key == new.comic_id
    assert request.asset_selection == [dg.AssetKey("stage3_panel_embeddings"), dg.AssetKey("contextualized_embeddings")]
    pipeline.instance.add_dynamic_partitions("comics", [new.comic_id])
    run = pipeline.materialize(request.asset_selection, tags={"dagster/partition": new.comic_id})
    assert run.success
    comic = ContextualizedStore.open(pipeline.resources["storage"].contextualized_url()).read(new.comic_id)
    assert comic.attrs["model_version"] == pipeline.tracking().champion_version()
    assert comic.page_ids == new.page_ids
