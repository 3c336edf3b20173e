"""The asset graph on the tiny corpus: each test on its own copy of a prebuilt home (or a new one).

What travels along the edges is checked through the refs the IO manager stored; what the UI shows
through materialization metadata and check results.
"""

from __future__ import annotations

import dataclasses
import json

import dagster as dg
import numpy as np
import pytest
import torch
import zarr

from comic_pipeline import corpus, schema, tasks
from comic_pipeline.definitions import defs
from comic_pipeline.defs.automation import new_comics_sensor
from comic_pipeline.defs.embeddings import embeddings_made_by_champion
from comic_pipeline.defs.keys import (
    CHAMPION_MODEL, COMIC_SPLITS, EVALUATION_KEYS, EVALUATION_SUMMARY, SEQUENCE_MODEL, TASK_KEYS,
)
from comic_pipeline.defs.refs import EvaluationReport, ModelRef, SplitsRef, TaskDatasetRef
from comic_pipeline.defs.report import materialization_metadata, summary_table
from comic_pipeline.defs.resources import MLflowTracking
from comic_pipeline.demo import graph_definitions
from comic_pipeline.comic_names import comic_key
from comic_pipeline.embedding_store import ContextualizedStore
from comic_pipeline.page_search import PageSearch
from comic_pipeline.quarantine import Quarantine

from comic_pipeline_tests.pipelines import run_at_once

from .conftest import (
    FUSED_ONLY_SKIPS, RANGE_END, RANGE_START, TINY_COMICS, TINY_NAMES, TRAINING_GRAPH, home_resources,
    start_pipeline, training_run_config,
)


def test_named_store_partitions_and_validation(trained_pipeline):
    """The prebuilt home's store is a legacy one whose comics are named as a collection names
    them (TINY_NAMES): each is a partition under comic_key(name), validated with its name in its
    own metadata."""
    instance = trained_pipeline.instance
    described = materialization_metadata(instance, dg.AssetKey("stage3_store"))
    assert described["comics"] == TINY_COMICS and described["demo"] is False and described["layout"] == "legacy"
    assert described["modalities"] == "fused"
    assert described["quarantined_comics"] == "none"
    keys = {comic_key(name): name for name in TINY_NAMES}
    assert len(keys) == TINY_COMICS and sum(key != name for key, name in keys.items()) >= 20
    assert sorted(instance.get_dynamic_partitions("comics")) == sorted(keys) == trained_pipeline.comic_ids
    validated = instance.get_materialized_partitions(dg.AssetKey("stage3_panel_embeddings"))
    assert validated == set(keys)
    for key, name in keys.items():
        metadata = materialization_metadata_of_partition(instance, key)
        assert metadata["comic"] == name and metadata["pages"] == len(_pages_of(name)), key


def test_splits_and_task_datasets_travel_as_refs(trained_pipeline):
    splits = trained_pipeline.stored(COMIC_SPLITS)
    assert isinstance(splits, SplitsRef) and sum(splits.counts.values()) == TINY_COMICS
    assert min(splits.counts.values()) > 0
    storage = trained_pipeline.resources["storage"]
    for name, key in TASK_KEYS.items():
        ref = trained_pipeline.stored(key)
        assert isinstance(ref, TaskDatasetRef) and ref.splits_fingerprint == splits.fingerprint
        if name in FUSED_ONLY_SKIPS:  # the legacy store holds no text, visual or caption
            assert ref.skipped == FUSED_ONLY_SKIPS[name] and ref.path is None, (name, ref)
            assert materialization_metadata(trained_pipeline.instance, key)["skipped"] == ref.skipped
            continue
        assert ref.skipped is None, (name, ref)
        dataset = schema.load_task_dataset(storage.path(ref.path))
        assert dataset.task == name and dataset.fingerprint() == ref.fingerprint
        assert dataset.n_samples("train") > 0 and dataset.n_samples("test") > 0, name
        assert ref.n_options == dataset.n_options == tasks.TASKS[name].n_options
        metadata = materialization_metadata(trained_pipeline.instance, key)
        assert metadata["fingerprint"] == ref.fingerprint and metadata["test_samples"] > 0


def test_training_is_tracked_in_one_mlflow_run_and_its_ref_names_its_datasets(trained_pipeline):
    model = trained_pipeline.stored(SEQUENCE_MODEL)
    assert isinstance(model, ModelRef)
    assert model.fingerprints() == {n: trained_pipeline.stored(k).fingerprint for n, k in TASK_KEYS.items()}
    tracking = trained_pipeline.tracking()
    run = tracking.client().get_run(model.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster_asset_key"] == "sequence_model"
    assert "dagster_run_id" in run.data.tags and "code_version" in run.data.tags
    assert "lr" in run.data.params
    assert run.data.params["dataset_sequence_filling"] == model.datasets["sequence_filling"].fingerprint
    assert any(name.startswith("val_accuracy_") for name in run.data.metrics)
    version = tracking.client().get_model_version(tracking.registered_model_name, model.version)
    assert version.run_id == model.run_id
    assert model.uri == f"models:/{tracking.registered_model_name}/{model.version}"


def test_evaluation_report_gates_and_champion(trained_pipeline):
    instance = trained_pipeline.instance
    tracking = trained_pipeline.tracking()
    model = trained_pipeline.stored(SEQUENCE_MODEL)
    report = trained_pipeline.stored(EVALUATION_SUMMARY)
    assert isinstance(report, EvaluationReport) and report.model == model
    assert report.problems_for(model, ("beats_chance", "beats_shortcuts")) == []
    run_metrics = tracking.client().get_run(model.run_id).data.metrics
    for name, key in EVALUATION_KEYS.items():
        task = trained_pipeline.stored(key)
        assert task == report.tasks[name]
        assert task.model_version == model.version
        assert task.dataset_fingerprint == model.datasets[name].fingerprint
        checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(key, "beats_chance"), dg.AssetCheckKey(key, "beats_shortcuts")])
        assert {c.status.value for c in checks.values()} == {"SUCCEEDED"}, name
        m = materialization_metadata(instance, key)
        if name in FUSED_ONLY_SKIPS:  # reported with its reason; its gates pass, saying why
            assert task.skipped == m["skipped"] == FUSED_ONLY_SKIPS[name]
            assert f"| {name} | – | skipped | – | – | – | {FUSED_ONLY_SKIPS[name]} |" in \
                materialization_metadata(instance, EVALUATION_SUMMARY)["summary"]
            continue
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
        assert m["accuracy"] == pytest.approx(task.metrics["accuracy"], abs=1e-4)
        assert f"test_{name}_accuracy" in run_metrics
    assert {"kendall_tau", "pairwise_accuracy", "exact_match"} <= set(report.tasks["reading_order"].metrics)
    summary = materialization_metadata(instance, EVALUATION_SUMMARY)
    assert "| sequence_filling |" in summary["summary"] and "data:image/png;base64," in summary["summary"]
    assert summary["blocking_gates"] == "all passed"
    assert report.strip["view_recall_at_1"] > report.strip["view_recall_at_1_chance"]
    artifacts = {a.path for a in tracking.client().list_artifacts(model.run_id, "evaluation")}
    assert {"evaluation/summary.md", "evaluation/test_accuracy.png", "evaluation/training_curves.png"} <= artifacts
    assert tracking.champion_version() == model.version == trained_pipeline.stored(CHAMPION_MODEL).version
    table = summary_table(instance, trained_pipeline.resources["io_manager"])
    assert f"champion: {model.version}" in table and "sequence_filling" in table


def _pages_of(name: str) -> list[str]:
    """The page ids the generator gave comic `name` of the prebuilt home, in reading order."""
    index = TINY_NAMES.index(name)
    return corpus.generate_comic(corpus.SIZES["tiny"], index, name).page_ids


def test_contextualized_embeddings_are_stamped_with_the_champion(trained_pipeline):
    url = trained_pipeline.resources["storage"].contextualized_url()
    contextualized = ContextualizedStore.open(url)
    assert contextualized.comic_ids() == sorted(trained_pipeline.comic_ids)
    assert set(contextualized.model_versions().values()) == {trained_pipeline.tracking().champion_version()}
    comic = contextualized.read(trained_pipeline.comic_ids[0])
    assert not np.any(comic.panel_embeddings[~comic.panel_mask])  # padded slots are zero
    assert comic.strip_embeddings.shape[0] == comic.panel_mask.shape[0]



def test_a_backfill_run_reads_stage3_in_processes_and_writes_what_threads_write(trained_pipeline):
    """48 comics in one run: a reader process and reader threads only (reader_processes: 0)
    write the same embeddings and stamps."""
    pipeline = trained_pipeline
    output = ContextualizedStore.open(pipeline.resources["storage"].contextualized_url())
    runs = {}
    for label, config in (("processes", {"reader_processes": 1}), ("threads", {"reader_processes": 0})):
        run = pipeline.materialize_all_comics(
            ["contextualized_embeddings"],
            run_config={"ops": {"contextualized_embeddings": {"config": config}}})
        assert run.success
        messages = [entry.user_message for entry in pipeline.instance.all_logs(run.run_id)]
        said = [m for m in messages if "Stage 3 read by" in m]
        assert said and ("reader process(es)" in said[0]) == (label == "processes"), said
        runs[label] = {key: output.read(key) for key in pipeline.comic_ids}
    for key in pipeline.comic_ids:
        by_processes, by_threads = runs["processes"][key], runs["threads"][key]
        np.testing.assert_array_equal(by_processes.panel_embeddings, by_threads.panel_embeddings)
        np.testing.assert_array_equal(by_processes.strip_embeddings, by_threads.strip_embeddings)
        for attr in ("stage3_content_hash", "page_ids", "comic_name", "model_version"):
            assert by_processes.attrs[attr] == by_threads.attrs[attr]


def test_the_output_keeps_names_groups_pages_per_comic_and_in_natural_order(trained_pipeline):
    output = ContextualizedStore.open(trained_pipeline.resources["storage"].contextualized_url())
    keys = {comic_key(name): name for name in TINY_NAMES}
    assert output.comic_names() == keys
    matrix, table = PageSearch(output).strip_matrix()
    for key, name in keys.items():  # the legacy store's rows were shuffled across comics
        comic = output.read(key)
        pages = _pages_of(name)  # "<name>/page_1.jpg", ... "page_10.jpg" last, not second
        assert comic.attrs["comic_name"] == name and comic.page_ids == pages, key
        assert comic.strip_embeddings.shape[0] == comic.panel_mask.shape[0] == len(pages)
        rows = table[table["comic_id"] == key]  # one comic's pages: together, in reading order
        assert rows.index.tolist() == list(range(rows.index[0], rows.index[0] + len(pages)))
        assert rows["page_id"].tolist() == pages and set(rows["comic_name"]) == {name}
    assert any(page.endswith("/page_10.jpg") for page in table["page_id"])
    # Stage 5 finds a page by the comic's original name, and every hit carries its comic's name
    tintin = "Tintin - L'Île noire"
    hits = PageSearch(output).nearest_pages((tintin, 1), k=len(_pages_of(tintin)) + 5)
    assert all(keys[key] == name for key, name in zip(hits["comic_id"], hits["comic_name"]))
    assert (tintin, f"{tintin}/page_2.jpg") not in set(zip(hits["comic_name"], hits["page_id"]))
    assert len(matrix) == len(table) == sum(len(_pages_of(name)) for name in TINY_NAMES)


def test_new_splits_do_not_change_what_the_existing_model_is_evaluated_on(trained_pipeline):
    """Re-splitting regenerates the task datasets; evaluating the model that already exists still
    scores exactly the datasets it trained on (named in its ModelRef), with the same figures."""
    pipeline = trained_pipeline
    model = pipeline.stored(SEQUENCE_MODEL)
    before = pipeline.stored(EVALUATION_SUMMARY)
    splits_before = pipeline.stored(COMIC_SPLITS)
    fractions = {"ops": {"comic_splits": {"config": {"train": 0.5, "val": 0.2, "test": 0.3}}}}
    assert pipeline.materialize(dg.AssetSelection.assets(COMIC_SPLITS) | dg.AssetSelection.groups("tasks"),
                                run_config=fractions).success
    splits_after = pipeline.stored(COMIC_SPLITS)
    assert splits_after.fingerprint != splits_before.fingerprint
    generated = [name for name in TASK_KEYS if name not in FUSED_ONLY_SKIPS]
    new_tasks = {name: pipeline.stored(TASK_KEYS[name]) for name in generated}
    assert all(new_tasks[n].fingerprint != model.datasets[n].fingerprint for n in generated)

    assert pipeline.materialize(dg.AssetSelection.groups("evaluation")).success
    after = pipeline.stored(EVALUATION_SUMMARY)
    assert after.model == model
    assert {name for name, report in after.tasks.items() if report.skipped} == set(FUSED_ONLY_SKIPS)
    for name in generated:
        report = after.tasks[name]
        assert report.dataset_fingerprint == model.datasets[name].fingerprint, name
        assert report.metrics["n_samples"] == before.tasks[name].metrics["n_samples"], name
        assert report.metrics["accuracy"] == pytest.approx(before.tasks[name].metrics["accuracy"], abs=1e-6)


def test_a_random_model_fails_the_gates_and_champion_model_alone_refuses_it(trained_pipeline):
    pipeline = trained_pipeline
    tracking = pipeline.tracking()
    champion_before = tracking.champion_version()
    result = pipeline.materialize(
        dg.AssetSelection.assets("sequence_model", "champion_model") | dg.AssetSelection.groups("evaluation"),
        run_config=training_run_config(max_steps=0), raise_on_error=False,
    )
    assert not result.success
    untrained = pipeline.stored(SEQUENCE_MODEL)
    assert untrained.version != champion_before
    assert tracking.champion_version() == champion_before
    report = pipeline.stored(EVALUATION_SUMMARY)
    assert report.model.version == untrained.version  # the failed gates are on record
    # champion_model alone cannot bypass the failed gates, and says which gates failed
    alone = pipeline.materialize(["champion_model"], raise_on_error=False)
    assert not alone.success and tracking.champion_version() == champion_before
    error = str(alone.failure_data_for_node("champion_model").error)
    assert f"Model version {untrained.version} cannot become champion" in error
    assert "gate beats_chance failed" in error or "gate beats_shortcuts failed" in error
    assert pipeline.stored(CHAMPION_MODEL).version == champion_before  # downstream still sees the old one


def test_comics_evaluation_on_a_store_without_comics_folds_scores_nothing_and_says_so(trained_pipeline, monkeypatch):
    # "Materialize all" on the demo corpus includes the comics group: it must not fail the run
    monkeypatch.delenv("COMICS_FOLDS", raising=False)
    result = trained_pipeline.materialize(["comics_evaluation"])
    (materialized,) = result.asset_materializations_for_node("comics_evaluation")
    assert "nothing scored: no COMICS fold files" in materialized.metadata["skipped"].value
    assert all(check.passed for check in result.get_asset_check_evaluations())


def test_training_refuses_to_run_untracked(empty_pipeline):
    pipeline = start_pipeline(empty_pipeline, n_comics=6)
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


def test_new_comics_sensor_adds_partitions_and_requests_one_validation_run(empty_pipeline):
    pipeline = empty_pipeline
    instance, resources = pipeline.instance, pipeline.resources
    assert isinstance(_evaluate_sensor(instance, resources), dg.SkipReason)  # no store yet
    corpus.write_demo_store(resources["stage3"].store_url(),
                            dataclasses.replace(corpus.SIZES["tiny"], n_comics=5))
    result = _evaluate_sensor(instance, resources)
    assert isinstance(result, dg.SensorResult)
    (added,) = result.dynamic_partitions_requests
    comic_ids = resources["stage3"].open().comic_ids()
    assert list(added.partition_keys) == comic_ids
    (request,) = result.run_requests  # one run per tick, not one per comic
    assert request.asset_selection == [dg.AssetKey("stage3_panel_embeddings")]  # no champion yet
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == (comic_ids[0], comic_ids[-1])
    instance.add_dynamic_partitions("comics", list(added.partition_keys))
    assert isinstance(_evaluate_sensor(instance, resources), dg.SkipReason)
    # the run it requested validates every comic of the range
    assert pipeline.materialize(request.asset_selection, tags=request.tags).success
    assert instance.get_materialized_partitions(dg.AssetKey("stage3_panel_embeddings")) == set(comic_ids)
    first = materialization_metadata_of_partition(instance, comic_ids[0])
    assert first["pages"] == resources["stage3"].open().comic(comic_ids[0]).validate().n_pages  # per comic


def materialization_metadata_of_partition(instance, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("stage3_panel_embeddings"), asset_partitions=[partition]),
        limit=1).records
    return {k: v.value for k, v in records[0].event_log_entry.asset_materialization.metadata.items()}


def _stale_check(pipeline):
    result = pipeline.materialize(dg.AssetSelection.checks(embeddings_made_by_champion), raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_a_new_champion_marks_old_embeddings_stale_and_a_backfill_refreshes_them(trained_pipeline):
    pipeline = trained_pipeline
    assert _stale_check(pipeline).passed
    old_champion = pipeline.tracking().champion_version()
    retrain = pipeline.materialize(
        TRAINING_GRAPH - dg.AssetSelection.assets(COMIC_SPLITS) - dg.AssetSelection.groups("tasks"),
        # this test is about staleness: a small regression of the retrained model may not stop it
        run_config={**training_run_config(seed=1),
                     "ops": {**training_run_config(seed=1)["ops"],
                             "champion_model": {"config": {"allow_regression": True}}}},
    )
    assert retrain.success
    new_champion = pipeline.tracking().champion_version()
    assert new_champion != old_champion
    promoted = materialization_metadata(pipeline.instance, CHAMPION_MODEL)
    assert promoted["stale_comics"] == len(pipeline.comic_ids)
    assert "contextualized_embeddings" in promoted["refresh"]
    assert "| sequence_filling |" in promoted["comparisons"]
    stale = _stale_check(pipeline)
    assert not stale.passed
    assert stale.metadata["stale_comics"].value == len(pipeline.comic_ids)
    assert pipeline.materialize_all_comics(["contextualized_embeddings"]).success  # the one backfill
    assert _stale_check(pipeline).passed
    url = pipeline.resources["storage"].contextualized_url()
    assert set(ContextualizedStore.open(url).model_versions().values()) == {new_champion}


def test_retraining_on_unchanged_data_code_and_config_registers_no_new_version(trained_pipeline):
    pipeline = trained_pipeline
    tracking = pipeline.tracking()
    before = pipeline.stored(SEQUENCE_MODEL)
    champion = tracking.champion_version()
    runs = len(tracking.client().search_runs([tracking.experiment_id()]))
    versions = len(tracking.client().search_model_versions(f"name = '{tracking.registered_model_name}'"))
    again = pipeline.materialize(
        TRAINING_GRAPH - dg.AssetSelection.assets(COMIC_SPLITS) - dg.AssetSelection.groups("tasks"),
        run_config=training_run_config(),  # what the prebuilt home trained with
    )
    assert again.success
    metadata = materialization_metadata(pipeline.instance, SEQUENCE_MODEL)
    assert metadata["unchanged"] is True and f"model version {before.version}" in metadata["note"]
    assert pipeline.stored(SEQUENCE_MODEL) == before
    assert len(tracking.client().search_runs([tracking.experiment_id()])) == runs
    assert len(tracking.client().search_model_versions(f"name = '{tracking.registered_model_name}'")) == versions
    assert tracking.champion_version() == champion
    assert materialization_metadata(pipeline.instance, CHAMPION_MODEL)["stale_comics"] == 0
    assert _stale_check(pipeline).passed

    changed = pipeline.materialize(["sequence_model"], run_config=training_run_config(epochs=1))
    assert changed.success
    assert materialization_metadata(pipeline.instance, SEQUENCE_MODEL)["unchanged"] is False
    assert pipeline.stored(SEQUENCE_MODEL).version != before.version


def test_a_changed_or_a_quarantined_comic_never_takes_the_others_down(trained_pipeline):
    pipeline = trained_pipeline
    changed, bad = pipeline.comic_ids[:2]
    embeddings = zarr.open_group(pipeline.resources["stage3"].store_url(), mode="r+")["panel_embeddings"]
    # Stage 3 rewrites one comic with valid but different content: what was made from it is stale
    row = _first_row(pipeline, changed)
    embeddings[row, 0] = embeddings[row, 0] + 1.0
    retrain = pipeline.materialize(["sequence_model"], run_config=training_run_config(epochs=1),
                                   raise_on_error=False)
    assert not retrain.success
    error = str(retrain.failure_data_for_node("sequence_model").error)
    assert f"(key {changed!r}): pinned" in error and "changed since it was pinned" in error, error[:800]

    # another comic breaks and its re-validation quarantines it
    embeddings[_first_row(pipeline, bad), 0, 0] = np.nan
    pipeline.materialize(["stage3_panel_embeddings"], tags={"dagster/partition": bad}, raise_on_error=False)
    assert set(Quarantine(str(pipeline.home)).records()) == {bad}

    embed = pipeline.materialize_all_comics(["contextualized_embeddings"], raise_on_error=False)
    assert not embed.success  # the changed comic is named and its partition shows failed ...
    error = str(embed.failure_data_for_node("contextualized_embeddings").error)
    assert f"1 of {TINY_COMICS - 1} comics were not embedded" in error and changed in error
    # ... while every other comic is written, each with its own metadata
    written = {m.partition: m.metadata for m in embed.asset_materializations_for_node("contextualized_embeddings")}
    assert set(written) == set(pipeline.comic_ids) - {changed, bad}
    assert len({m["pages"].value for m in written.values()}) > 1  # per comic, not run totals
    (skipped,) = embed.asset_observations_for_node("contextualized_embeddings")
    assert skipped.partition == bad and skipped.metadata["skipped"].value.startswith("quarantined: ")

    # re-validated, the changed comic is embedded again
    assert pipeline.materialize(["stage3_panel_embeddings"], tags={"dagster/partition": changed}).success
    assert pipeline.materialize(["contextualized_embeddings"], tags={"dagster/partition": changed}).success


def test_an_embedding_run_that_dies_midway_keeps_the_comics_it_wrote_materialized(trained_pipeline,
                                                                                  monkeypatch):
    """Each comic's materialization is recorded when its commit lands, not at the end of the
    run: a run whose device dies midway still shows, in Dagster, every comic it wrote."""
    from comic_pipeline import inference

    pipeline = trained_pipeline
    real_embed, batches = inference.embed_pages, []

    def dying_embed(*args, **kwargs):
        batches.append(1)
        if len(batches) == 5:
            raise RuntimeError("the device fell off the bus")
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(inference, "embed_pages", dying_embed)
    run = pipeline.materialize_all_comics(
        ["contextualized_embeddings"], raise_on_error=False,
        run_config={"ops": {"contextualized_embeddings": {"config": {"batch_pages": 4}}}})
    assert not run.success
    assert "fell off the bus" in str(run.failure_data_for_node("contextualized_embeddings").error)
    written = [m.partition for m in run.asset_materializations_for_node("contextualized_embeddings")]
    assert written and len(written) < len(pipeline.comic_ids)  # some, not all
    in_range = list(pipeline.instance.get_dynamic_partitions("comics"))
    assert written == in_range[:len(written)]  # in the run's order, from its first comic on
    output = ContextualizedStore.open(pipeline.resources["storage"].contextualized_url())
    champion = pipeline.tracking().champion_version()
    for key in written:  # each one recorded is whole in the store, made by the champion
        assert output.read(key).attrs["model_version"] == champion


def _first_row(pipeline, key: str) -> int:
    """The legacy store's row that holds the first page of comic `key` (rows are shuffled)."""
    stage3 = pipeline.resources["stage3"]
    first_page = stage3.open().comic(key).page_ids[0]
    with open(stage3.metadata_url) as handle:
        return next(r["sequence_index"] for r in json.load(handle) if r["canonical_id"] == first_page)


def _embed_range(instance_ref, home: str, comics: list[str]) -> bool:
    """One Dagster run in its own process, as a sensor run and a backfill run would be."""
    torch.set_num_threads(1)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = dg.materialize(
            graph_definitions(defs()), selection=["contextualized_embeddings"], instance=instance,
            resources=home_resources(home), raise_on_error=False,
            tags={"dagster/asset_partition_range_start": comics[0],
                  "dagster/asset_partition_range_end": comics[-1]},
        )
        return result.success


def test_two_embedding_runs_over_different_comics_at_once_both_complete(trained_pipeline):
    pipeline = trained_pipeline
    half = len(pipeline.comic_ids) // 2
    ranges = [pipeline.comic_ids[:half], pipeline.comic_ids[half:]]
    outcomes = run_at_once(_embed_range, [(pipeline.instance.get_ref(), str(pipeline.home), r) for r in ranges])
    assert outcomes == [True, True]
    contextualized = ContextualizedStore.open(pipeline.resources["storage"].contextualized_url())
    champion = pipeline.tracking().champion_version()
    assert contextualized.comic_ids() == sorted(pipeline.comic_ids)
    for comic_id in pipeline.comic_ids:
        comic = contextualized.read(comic_id)
        assert comic.attrs["model_version"] == champion
        assert comic.panel_embeddings.shape[:2] == comic.panel_mask.shape
        assert np.isfinite(comic.strip_embeddings).all()


def test_a_comic_added_to_the_store_is_found_and_embedded(trained_pipeline):
    pipeline = trained_pipeline
    config = dataclasses.replace(corpus.SIZES["tiny"], n_comics=TINY_COMICS + 1)
    name = "Tintin - L'Île noire (1938) #2, Casterman & co/édition"  # as a real collection names it
    new = corpus.generate_comic(config, TINY_COMICS, name)  # the next comic of the same generator
    key = comic_key(name)
    # the original Stage 3 scripts write their flat store anew, one comic more (rows reshuffled)
    stage3 = pipeline.resources["stage3"]
    corpus.write_demo_store(stage3.store_url(), config, names=[*TINY_NAMES, name], layout="legacy",
                            metadata_url=stage3.metadata_url)
    validation = _evaluate_sensor(pipeline.instance, pipeline.resources)
    (request,) = validation.run_requests
    assert request.partition_key == key != name
    assert request.asset_selection == [dg.AssetKey("stage3_panel_embeddings")]
    pipeline.instance.add_dynamic_partitions("comics", [key])
    validated = pipeline.materialize(request.asset_selection, tags={"dagster/partition": key})
    (materialization,) = validated.asset_materializations_for_node("stage3_panel_embeddings")
    assert materialization.metadata["comic"].value == name
    # the next tick: a champion exists and the new comic is validated but has no embeddings
    embedding = _evaluate_sensor(pipeline.instance, pipeline.resources)
    (request,) = embedding.run_requests
    assert request.partition_key == key
    assert request.asset_selection == [dg.AssetKey("contextualized_embeddings")]
    embedded = pipeline.materialize(request.asset_selection, tags={"dagster/partition": key})
    (materialization,) = embedded.asset_materializations_for_node("contextualized_embeddings")
    assert materialization.metadata["comic"].value == name
    output = ContextualizedStore.open(pipeline.resources["storage"].contextualized_url())
    comic = output.read(key)
    assert comic.attrs["model_version"] == pipeline.tracking().champion_version()
    assert comic.attrs["comic_name"] == name and comic.page_ids == new.page_ids
    # Stage 5 finds its pages by the original name
    nearest = PageSearch(output).nearest_pages((name, 0), k=3)
    assert len(nearest) == 3
    assert PageSearch(output).strip_matrix([key])[1]["comic_name"].unique().tolist() == [name]
    assert isinstance(_evaluate_sensor(pipeline.instance, pipeline.resources), dg.SkipReason)


def test_the_stale_check_is_requested_whenever_the_champion_moves(trained_pipeline):
    """Whatever path materializes champion_model, the automation sensor's next evaluation requests
    embeddings_made_by_champion (the daemon runs it; here it is evaluated directly)."""
    pipeline = trained_pipeline
    stale_check = dg.AssetCheckKey(dg.AssetKey("contextualized_embeddings"), "embeddings_made_by_champion")
    selection = dg.AssetSelection.checks(stale_check)
    first = dg.evaluate_automation_conditions(defs=defs(), instance=pipeline.instance, asset_selection=selection)
    quiet = dg.evaluate_automation_conditions(defs=defs(), instance=pipeline.instance,
                                              asset_selection=selection, cursor=first.cursor)
    assert quiet.total_requested == 0  # nothing changed since the last evaluation
    assert pipeline.materialize(["champion_model"]).success  # e.g. from the asset page
    moved = dg.evaluate_automation_conditions(defs=defs(), instance=pipeline.instance,
                                              asset_selection=selection, cursor=quiet.cursor)
    assert moved.total_requested == 1  # the one check this selection holds
