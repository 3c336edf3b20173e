"""Fixtures for the Dagster-layer tests.

One trained home is built once a session (`prebuilt_home` in the top conftest: store ->
validation -> splits -> tasks -> training -> evaluation -> champion -> embeddings) and never touched
again: every test that needs it gets its own copy (`trained_pipeline`: Dagster instance, refs,
stores and MLflow database copied into the test's tmp_path), so any test passes alone and in any
order. COMIC_TESTS_REVERSE=1 runs the collected tests in reverse order, to show it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from comic_pipeline_tests.pipelines import (  # noqa: F401 - the names these tests import from here
    DAGSTER_FOLDER, FUSED_ONLY_SKIPS, RANGE_END, RANGE_START, TINY_COMICS, TINY_NAMES, TINY_TRAINING,
    TRAINING_GRAPH, Pipeline, copy_home, home_resources, make_home, open_pipeline, start_pipeline,
    training_run_config,
)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMIC_TESTS_REVERSE") == "1":
        items.reverse()


@pytest.fixture
def trained_pipeline(prebuilt_home: Path, tmp_path) -> Iterator[Pipeline]:
    """This test's own copy of the prebuilt home."""
    with open_pipeline(copy_home(prebuilt_home, tmp_path / "home")) as pipeline:
        yield pipeline


@pytest.fixture
def empty_pipeline(tmp_path, migrated_mlflow_db) -> Iterator[Pipeline]:
    """A new home with a migrated MLflow database and nothing else."""
    with open_pipeline(make_home(tmp_path / "home", migrated_mlflow_db)) as pipeline:
        yield pipeline
