"""Asset logic called directly with in-memory inputs: the refs, the IO manager, champion_model's
refusals (and their reasons) and the stale-embedding check. No trained model needed."""

from __future__ import annotations

import dataclasses
import math

import dagster as dg
import pytest

from comic_pipeline.defs import refs
from comic_pipeline.defs.champion import ChampionConfig, champion_model
from comic_pipeline.defs.embeddings import embeddings_made_by_champion
from comic_pipeline.defs.keys import BLOCKING_GATES, SEQUENCE_MODEL, TASK_KEYS
from comic_pipeline.defs.refs import EvaluationReport, ModelRef, SplitsRef, TaskDatasetRef, TaskReport
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, RefIOManager

from .conftest import make_home

TASKS = ("sequence_filling", "reading_order", "caption_relevance")


def _model(version="3", fingerprints=None) -> ModelRef:
    fingerprints = fingerprints or {t: f"fp-{t}" for t in TASKS}
    datasets = {t: TaskDatasetRef(task=t, path=f"tasks/{t}/{t}-{fp}.npz", fingerprint=fp, n_options=5,
                                  chance=0.2, splits_fingerprint="s1") for t, fp in fingerprints.items()}
    datasets["caption_relevance"] = TaskDatasetRef(
        task="caption_relevance", path=None, fingerprint=None, n_options=4, chance=0.25,
        splits_fingerprint="s1", skipped="needs caption+fused; the store has fused")
    return ModelRef(name="comic-sequence-model", version=version, run_id=f"run-{version}",
                    uri=f"models:/comic-sequence-model/{version}", datasets=datasets)


def _report(model: ModelRef, accuracy=0.9, failed=(), fingerprint_of=None) -> EvaluationReport:
    tasks = {}
    for name, ref in model.datasets.items():
        if ref.skipped:
            tasks[name] = TaskReport(task=name, model_version=model.version, dataset_fingerprint=None,
                                     skipped=ref.skipped)
            continue
        tasks[name] = TaskReport(
            task=name, model_version=model.version,
            dataset_fingerprint=(fingerprint_of or {}).get(name, ref.fingerprint),
            metrics={"accuracy": accuracy, "accuracy_ci_low": accuracy - 0.05, "chance": 0.2},
            gates={gate: (name, gate) not in failed for gate in BLOCKING_GATES},
        )
    return EvaluationReport(model=model, tasks=tasks, strip={"view_recall_at_1": 0.5})


def test_every_ref_round_trips_through_json():
    model = _model()
    values = [SplitsRef(path="splits/x.parquet", fingerprint="abc", counts={"train": 8, "val": 1, "test": 1}),
              model, _report(model), _report(model).tasks["sequence_filling"]]
    for value in values:
        assert refs.loads(refs.dumps(value)) == value
    nan_chance = TaskDatasetRef(task="reading_order", path="p.npz", fingerprint="f", n_options=0,
                                chance=float("nan"), splits_fingerprint="s")
    assert math.isnan(refs.loads(refs.dumps(nan_chance)).chance)
    with pytest.raises(TypeError, match="not a ref type"):
        refs.dumps({"arrays": [1, 2]})
    with pytest.raises(ValueError, match="exactly one of path and skipped"):
        TaskDatasetRef(task="t", path=None, fingerprint=None, n_options=2, chance=0.5, splits_fingerprint="s")


def test_the_io_manager_stores_refs_in_the_home_and_names_what_is_missing(tmp_path):
    io_manager = RefIOManager(storage=PipelineStorage(home=str(tmp_path)))
    model = _model()
    context = dg.build_output_context(asset_key=SEQUENCE_MODEL)
    io_manager.handle_output(context, model)
    assert (tmp_path / "refs" / "sequence_model.json").exists()
    assert io_manager.load_input(dg.build_input_context(asset_key=SEQUENCE_MODEL)) == model
    assert io_manager.stored(SEQUENCE_MODEL) == model
    with pytest.raises(dg.Failure, match="tasks/sequence_filling has not been materialized"):
        io_manager.load_input(dg.build_input_context(asset_key=TASK_KEYS["sequence_filling"]))
    assert not list(tmp_path.rglob(".tmp-*"))  # written atomically, nothing left beside


def _refusal(model, report, tmp_path, **config) -> str:
    storage = PipelineStorage(home=str(tmp_path))
    with pytest.raises(dg.Failure) as refused:
        champion_model(context=dg.build_asset_context(), config=ChampionConfig(**config), storage=storage,
                       mlflow_tracking=MLflowTracking(storage=storage), model_ref=model, report=report)
    return refused.value.description


def test_champion_model_refuses_a_failed_blocking_gate_and_says_which(tmp_path):
    model = _model()
    reason = _refusal(model, _report(model, failed={("reading_order", "beats_shortcuts")}), tmp_path)
    assert "Model version 3 cannot become champion" in reason
    assert "reading_order: gate beats_shortcuts failed" in reason
    assert "sequence_filling" not in reason and "caption_relevance" not in reason  # passed / skipped


def test_champion_model_refuses_a_report_about_another_version(tmp_path):
    reason = _refusal(_model("4"), _report(_model("3")), tmp_path)
    assert "describes comic-sequence-model version 3, not version 4" in reason


def test_champion_model_refuses_a_report_on_other_datasets(tmp_path):
    model = _model()
    report = _report(model, fingerprint_of={"sequence_filling": "fp-resplit"})
    reason = _refusal(model, report, tmp_path)
    assert "sequence_filling: evaluated on dataset fp-resplit, but the model trained on fp-sequence_filling" in reason


def test_champion_model_refuses_a_report_missing_a_task(tmp_path):
    model = _model()
    report = _report(model)
    report = EvaluationReport(model=model, tasks={k: v for k, v in report.tasks.items() if k != "reading_order"})
    assert "reading_order: not evaluated" in _refusal(model, report, tmp_path)


def test_the_stale_check_without_embeddings_passes_and_says_so(tmp_path):
    result = embeddings_made_by_champion(context=dg.build_asset_check_context(),
                                         storage=PipelineStorage(home=str(tmp_path)), champion=_model())
    assert result.passed and result.metadata["note"].value == "no embeddings yet"


def _registry_with_two_versions(storage: PipelineStorage, accuracies: dict[str, float]) -> MLflowTracking:
    """An MLflow registry holding version 1 (champion, test accuracy 0.9 on every task) and version
    2 (the candidate, logged with `accuracies`)."""
    mlflow_tracking = MLflowTracking(storage=storage)
    tracking = mlflow_tracking.tracking()
    client = tracking.client()
    client.create_registered_model(tracking.registered_model_name)
    for version_accuracies in ({t: 0.9 for t in TASKS}, accuracies):
        run_id = client.create_run(tracking.experiment_id()).info.run_id
        for task, accuracy in version_accuracies.items():
            client.log_metric(run_id, f"test_{task}_accuracy", accuracy)
        client.create_model_version(tracking.registered_model_name, f"runs:/{run_id}/model", run_id=run_id)
    tracking.set_champion("1")
    return mlflow_tracking


def _candidate(mlflow_tracking: MLflowTracking) -> ModelRef:
    tracking = mlflow_tracking.tracking()
    model = _model("2")
    return dataclasses.replace(model, run_id=tracking.run_id_of("2"))


def test_champion_model_blocks_a_regression_and_lists_every_comparison(tmp_path, migrated_mlflow_db):
    storage = PipelineStorage(home=str(make_home(tmp_path / "home", migrated_mlflow_db)))
    mlflow_tracking = _registry_with_two_versions(storage, {"sequence_filling": 0.7, "reading_order": 0.89})
    candidate = _candidate(mlflow_tracking)
    report = _report(candidate, accuracy=0.7)
    report = dataclasses.replace(report, tasks={
        **report.tasks, "reading_order": dataclasses.replace(
            report.tasks["reading_order"], metrics={**report.tasks["reading_order"].metrics, "accuracy": 0.89})})
    with pytest.raises(dg.Failure) as refused:
        champion_model(context=dg.build_asset_context(), config=ChampionConfig(), storage=storage,
                       mlflow_tracking=mlflow_tracking, model_ref=candidate, report=report)
    reason = refused.value.description
    assert "worse than champion 1 by more than 0.020 on 1 task(s) (sequence_filling -0.200)" in reason
    assert "allow_regression: true" in reason
    table = refused.value.metadata["comparisons"].value
    assert "| sequence_filling | 0.900 | 0.700 | 0.200 | REGRESSION |" in table
    assert "| reading_order | 0.900 | 0.890 | 0.010 | ok |" in table
    assert mlflow_tracking.tracking().champion_version() == "1"

    promoted = champion_model(context=dg.build_asset_context(),
                              config=ChampionConfig(allow_regression=True), storage=storage,
                              mlflow_tracking=mlflow_tracking, model_ref=candidate, report=report)
    assert promoted.value == candidate and mlflow_tracking.tracking().champion_version() == "2"
    metadata = {k: getattr(v, "value", v) for k, v in promoted.metadata.items()}
    assert metadata["regressions_allowed"] == 1 and metadata["previous_champion"] == "1"
    assert metadata["stale_comics"] == 0 and metadata["refresh"] == "nothing to refresh"


def test_the_default_model_size_is_real_use_for_a_configured_store(tmp_path, monkeypatch):
    from comic_pipeline.defs.resources import Stage3StoreResource
    from comic_pipeline.defs.training import TrainingConfig, train_config_of

    monkeypatch.setenv("COMIC_PIPELINE_PROFILE", "tiny")
    storage = PipelineStorage(home=str(tmp_path))
    demo = Stage3StoreResource(storage=storage)
    configured = Stage3StoreResource(storage=storage, url=str(tmp_path / "stage3.zarr"))
    assert train_config_of(TrainingConfig(), demo).resolved().d_model == 32  # the profile's size
    full = train_config_of(TrainingConfig(), configured).resolved()
    assert (full.preset, full.d_model, full.n_layers, full.n_heads) == ("full", 512, 6, 8)
    chosen = train_config_of(TrainingConfig(preset="demo", epochs=2), configured).resolved()
    assert (chosen.preset, chosen.epochs) == ("demo", 2)


def test_the_pins_are_each_comics_latest_validated_hash_in_few_queries():
    """validated_hashes: the content hash of each comic's LATEST validation, none for a comic
    never validated or validated without a hash, and one paged query, not one per comic."""
    from comic_pipeline.defs.embeddings import validated_hashes
    from comic_pipeline.defs.keys import STAGE3_PANEL_EMBEDDINGS

    with dg.instance_for_test() as instance:
        def validated(key, content_hash):
            metadata = {"content_hash": content_hash} if content_hash else {"comic": key}
            instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key=STAGE3_PANEL_EMBEDDINGS, partition=key, metadata=metadata))

        for round_index in range(3):  # every comic validated three times: the last one counts
            for index in range(12):
                validated(f"c{index:02d}", f"hash-{index}-{round_index}")
        validated("c05", None)  # its latest validation recorded no hash
        queries = []
        real_fetch = instance.fetch_materializations

        def counting_fetch(*args, **kwargs):
            queries.append(kwargs.get("limit"))
            return real_fetch(*args, **kwargs)

        instance.fetch_materializations = counting_fetch
        keys = [f"c{index:02d}" for index in range(14)]  # c12, c13: never validated
        pins = validated_hashes(instance, keys, page_size=5)
        assert pins == {f"c{index:02d}": f"hash-{index}-2" for index in range(12) if index != 5}
        assert len(queries) <= 37 // 5 + 1  # paged through the 37 records at most once
        paged = len(queries)
        assert validated_hashes(instance, keys) == pins and len(queries) == paged + 1  # one page
        assert validated_hashes(instance, ["c13"]) == {}


def test_embedding_runs_are_sized_by_the_code_locations_environment():
    from comic_pipeline.defs.embeddings import DEFAULT_RUN_COMICS, RUN_COMICS_ENV, comics_per_embedding_run

    assert comics_per_embedding_run({}) == DEFAULT_RUN_COMICS == 1000
    assert comics_per_embedding_run({RUN_COMICS_ENV: "20000"}) == 20000
    for bad in ("0", "-5", "lots", "1.5"):
        with pytest.raises(ValueError, match=RUN_COMICS_ENV):
            comics_per_embedding_run({RUN_COMICS_ENV: bad})


def test_an_embedding_run_reads_in_processes_only_when_asked_and_worth_their_start():
    from comic_pipeline.defs.embeddings import EmbeddingConfig
    from comic_pipeline.embedding_pipeline import MIN_COMICS_FOR_READER_PROCESSES as FEW, reader_process_count

    assert EmbeddingConfig().reader_processes == 0  # off unless asked for
    assert [reader_process_count(configured, 1000) for configured in (None, 0, 1, 3)] == [0, 0, 1, 3]
    assert reader_process_count(3, FEW - 1) == 0 and reader_process_count(3, FEW) == 3  # a small run: threads
    with pytest.raises(ValueError, match="reader_processes"):
        EmbeddingConfig(reader_processes=-1)
