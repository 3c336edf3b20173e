"""Real components for the `prod` tests (DESIGN §8), started once a session:

- a throwaway PostgreSQL cluster (initdb as the `postgres` user when run as root, a random free
  port on 127.0.0.1, its own socket folder, trust auth) with databases `dagster` and `mlflow`;
- an S3-compatible server (`moto.server`) on 127.0.0.1;
- an `mlflow server` on PostgreSQL with S3 artifacts (proxied), job execution off.

Each runs in its own session and is stopped by process group, in reverse order of start.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from .servers import Component, start_mlflow, start_moto, start_postgres


@dataclass
class ProdServices:
    postgres_port: int
    s3_endpoint: str
    mlflow_uri: str
    components: list[Component]
    artifacts_bucket: str = ""

    def postgres_url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.postgres_port}/{database}"

    def dagster_postgres_db(self, database: str = "dagster") -> dict:
        """`postgres_db` config for dagster-postgres storages (psycopg2, see pyproject)."""
        return {"hostname": "127.0.0.1", "port": self.postgres_port, "username": "postgres",
                "password": "", "db_name": database, "scheme": "postgresql+psycopg2"}

    def new_bucket(self, prefix: str = "comic") -> str:
        import fsspec

        bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)
        return bucket

    def create_database(self, name: str) -> None:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.postgres_port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
          "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session")
def prod_services(tmp_path_factory, pytestconfig):
    """PostgreSQL + moto S3 + mlflow server, for the whole session; the S3 endpoint and dummy
    credentials are exported (boto3/s3fs read AWS_ENDPOINT_URL) and restored afterwards."""
    folder = tmp_path_factory.mktemp("prod-services")
    saved = {key: os.environ.get(key) for key in S3_ENV}
    components: list[Component] = []
    cleanups: list = []
    try:
        # not under pytest's tmp folder: that one is private to this user, and postgres runs as `postgres`
        pg_folder = Path(tempfile.mkdtemp(prefix="comic-prod-pg-"))
        pg_folder.chmod(0o755)
        cleanups.append(lambda: shutil.rmtree(pg_folder, ignore_errors=True))
        postgres, pg_port = start_postgres(pg_folder)
        components.append(postgres)
        moto, endpoint = start_moto(folder)
        components.append(moto)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
                          AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        S3FileSystem.clear_instance_cache()  # fsspec caches clients per options, not per endpoint
        services = ProdServices(pg_port, endpoint, "", components)
        services.create_database("mlflow")
        services.create_database("dagster")
        services.artifacts_bucket = services.new_bucket("mlflow")
        mlflow_server, mlflow_uri = start_mlflow(folder, services, services.artifacts_bucket)
        components.append(mlflow_server)
        services.mlflow_uri = mlflow_uri
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        for component in components:  # shown even when output is captured: what ran, and when
            line = (f"[prod] {component.name} started {time.strftime('%H:%M:%S', time.gmtime(component.started_at))} "
                    f"UTC (pid {component.process.pid}, process group ended at session end; log {component.log_path})")
            capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
            if reporter is not None and capture is not None:
                with capture.global_and_fixture_disabled():
                    reporter.write_line(line)
            else:
                sys.stderr.write(line + "\n")
        yield services
    finally:
        for component in reversed(components):
            component.stop()
        for cleanup in cleanups:
            cleanup()
        S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
