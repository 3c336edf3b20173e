"""home: a local folder keeps everything local; a URL home gives URLs and never a local fallback."""

from __future__ import annotations

import pytest

from comic_pipeline import home


def test_local_home_keeps_mlflow_in_sqlite(tmp_path):
    assert home.mlflow_tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert home.mlflow_artifact_root(str(tmp_path)) == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert home.dagster_home(str(tmp_path)) == str(tmp_path / "dagster")


def test_url_home_gives_urls(monkeypatch):
    monkeypatch.setenv(home.TRACKING_URI_ENV, "http://127.0.0.1:5000")
    root = "s3://bucket/comic-pipeline/"
    assert home.demo_store_url(root) == "s3://bucket/comic-pipeline/stage3_demo.zarr"
    assert home.contextualized_store_url(root) == "s3://bucket/comic-pipeline/contextualized.zarr"
    assert home.mlflow_tracking_uri(root) == "http://127.0.0.1:5000"
    assert home.mlflow_artifact_root(root) is None  # the tracking server decides


def test_url_home_without_a_tracking_server_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(home.TRACKING_URI_ENV, raising=False)
    with pytest.raises(home.HomeConfigurationError, match="tracking server.*MLFLOW_TRACKING_URI"):
        home.mlflow_tracking_uri("s3://bucket/comic-pipeline")
    with pytest.raises(home.HomeConfigurationError, match="PostgreSQL"):
        home.dagster_home("s3://bucket/comic-pipeline")
