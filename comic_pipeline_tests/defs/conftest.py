"""Fixtures for materialize() tests: a temporary home, a pre-migrated MLflow database (migrations
cost seconds, so they run once a session) and one tiny pipeline materialized once and shared."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from comic_pipeline import home
from comic_pipeline.definitions import defs
from comic_pipeline.demo import graph_definitions
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, build_resources
from comic_pipeline.tracking import Tracking

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
TINY_COMICS = 48  # corpus.SIZES["tiny"]

# Small but honest: trains for real, long enough that every gate can pass on the tiny corpus.
TINY_TRAINING = {"preset": "tiny", "epochs": 15, "warmup_steps": 20, "log_every": 100}


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mlflow-template")
    Tracking(home.mlflow_tracking_uri(str(folder)), "template", "template").ensure_reachable()
    return folder / "mlflow.db"


def make_home(folder: Path, migrated_mlflow_db: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_mlflow_db, folder / "mlflow.db")
    return folder


@dataclass
class Pipeline:
    home: Path
    instance: dg.DagsterInstance
    resources: dict
    comic_ids: list[str]

    def materialize(self, selection, run_config=None, tags=None, raise_on_error=True, resources=None):
        return dg.materialize(
            assets=graph_definitions(defs()),
            resources=resources or self.resources,
            selection=selection,
            instance=self.instance,
            run_config=run_config,
            tags=tags,
            raise_on_error=raise_on_error,
        )

    def materialize_all_comics(self, selection, **kwargs):
        keys = list(self.instance.get_dynamic_partitions("comics"))
        return self.materialize(selection, tags={RANGE_START: keys[0], RANGE_END: keys[-1]}, **kwargs)

    def tracking(self) -> Tracking:
        return self.resources["mlflow_tracking"].tracking()


def start_pipeline(folder: Path, migrated_mlflow_db: Path, instance: dg.DagsterInstance,
                   n_comics: int = TINY_COMICS) -> Pipeline:
    root = make_home(folder, migrated_mlflow_db)
    resources = build_resources(PipelineStorage(home=str(root)))
    pipeline = Pipeline(root, instance, resources, [])
    pipeline.materialize(
        ["stage3_store"], run_config={"ops": {"stage3_store": {"config": {"size": "tiny", "n_comics": n_comics}}}}
    )
    pipeline.comic_ids = resources["stage3"].open().comic_ids()
    instance.add_dynamic_partitions("comics", pipeline.comic_ids)
    return pipeline


def training_run_config(**overrides) -> dict:
    return {"ops": {"sequence_model": {"config": {**TINY_TRAINING, **overrides}}}}


@pytest.fixture(scope="session")
def trained_pipeline(tmp_path_factory, migrated_mlflow_db):
    """Store -> validation -> splits -> tasks -> training -> evaluation -> champion, once."""
    with dg.instance_for_test() as instance:
        pipeline = start_pipeline(tmp_path_factory.mktemp("pipeline"), migrated_mlflow_db, instance)
        pipeline.materialize_all_comics(["stage3_panel_embeddings"])
        graph = dg.AssetSelection.assets("comic_splits", "sequence_model", "champion_model") | \
            dg.AssetSelection.groups("tasks", "evaluation")
        pipeline.materialize(graph, run_config=training_run_config())
        yield pipeline
