"""The real components answer: PostgreSQL, S3 (moto), the MLflow server on both."""

from __future__ import annotations

import pytest

from comic_pipeline.tracking import Tracking

pytestmark = pytest.mark.prod


def test_mlflow_server_tracks_into_postgres_with_artifacts_on_s3(prod_services, tmp_path):
    import fsspec
    import psycopg2

    tracking = Tracking(prod_services.mlflow_uri, "smoke", "smoke-model")
    tracking.ensure_reachable()
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with tracking.start_run("smoke", tags={}) as run_id:
        tracking.log_artifact(run_id, str(note))
    connection = psycopg2.connect(host="127.0.0.1", port=prod_services.postgres_port, user="postgres", dbname="mlflow")
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run_id,))
        assert cursor.fetchone()[0] == 1  # the run is in PostgreSQL
    connection.close()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    found = [path for path in fs.find(prod_services.artifacts_bucket) if path.endswith(f"{run_id}/artifacts/note.txt")]
    assert len(found) == 1 and fs.cat_file(found[0]) == b"hello"  # the artifact is on S3
