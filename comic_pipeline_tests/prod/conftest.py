"""Real components for the `prod` tests (DESIGN §8), started once a session:

- a throwaway PostgreSQL cluster (initdb as the `postgres` user when run as root, a random free
  port on 127.0.0.1, its own socket folder, trust auth) with databases `dagster` and `mlflow`;
- an S3-compatible server (`moto.server`) on 127.0.0.1;
- an `mlflow server` on PostgreSQL with S3 artifacts (proxied), job execution off.

Each runs in its own session and is stopped by process group, in reverse order of start.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 180
CHECKOUT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install postgresql (.ci/run does)")
    return found


@dataclass
class Component:
    name: str
    process: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.time)

    def stop(self) -> None:
        """End the component's whole process group: SIGINT (PostgreSQL's fast shutdown, a
        KeyboardInterrupt for Python servers), then SIGKILL after 20 s."""
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived their leader (e.g. server workers)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def _start(name: str, command: list[str], log_path: Path, env: dict | None = None,
           cwd: str | None = None) -> Component:
    log = open(log_path, "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                               start_new_session=True)
    log.close()
    return Component(name, process, log_path)


def _wait_until(component: Component, ready, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if component.process.poll() is not None:
            raise RuntimeError(f"{component.name} exited ({component.process.returncode}) before {what}:\n"
                               f"{component.log_tail()}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    component.stop()
    raise RuntimeError(f"{component.name}: no {what} after {STARTUP_TIMEOUT_S}s:\n{component.log_tail()}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


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


def _start_postgres(folder: Path) -> tuple[Component, int]:
    initdb, postgres = _postgres_bin("initdb"), _postgres_bin("postgres")
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir(parents=True)
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
    port = _free_port()
    log_path = folder / "postgres.log"
    log_path.touch()
    if as_postgres:
        shutil.chown(log_path, "postgres")
    component = _start("postgresql", [*as_postgres, postgres, "-D", str(data), "-p", str(port), "-k", str(sockets),
                                      "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                      "-c", "max_connections=200"], log_path)

    def ready() -> bool:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
        return True

    _wait_until(component, ready, "connections")
    return component, port


def _start_moto(folder: Path) -> tuple[Component, str]:
    port = _free_port()
    component = _start("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                       folder / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    _wait_until(component, lambda: _http_ok(f"{endpoint}/moto-api/"), "HTTP answer")
    return component, endpoint


def _start_mlflow(folder: Path, services: ProdServices, artifacts_bucket: str) -> tuple[Component, str]:
    """The server exactly as deploy/mlflow-server.sh starts it in production."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": services.s3_endpoint,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "MLFLOW_PG_URL": services.postgres_url("mlflow"),
           "MLFLOW_ARTIFACTS": f"s3://{artifacts_bucket}/mlartifacts",
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # the script's default (false) applies
    component = _start("mlflow-server", ["bash", str(CHECKOUT / "deploy" / "mlflow-server.sh")],
                       folder / "mlflow.log", env=env)
    uri = f"http://127.0.0.1:{port}"
    _wait_until(component, lambda: _http_ok(f"{uri}/health"), "/health")
    return component, uri


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
          "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session")
def prod_services(tmp_path_factory):
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
        postgres, pg_port = _start_postgres(pg_folder)
        components.append(postgres)
        moto, endpoint = _start_moto(folder)
        components.append(moto)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, MLFLOW_S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test",
                          AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        services = ProdServices(pg_port, endpoint, "", components)
        services.create_database("mlflow")
        services.create_database("dagster")
        services.artifacts_bucket = services.new_bucket("mlflow")
        mlflow_server, mlflow_uri = _start_mlflow(folder, services, services.artifacts_bucket)
        components.append(mlflow_server)
        services.mlflow_uri = mlflow_uri
        for component in components:
            sys.stderr.write(f"\n[prod] {component.name} started {time.strftime('%H:%M:%S', time.gmtime(component.started_at))} UTC "
                             f"(pid {component.process.pid}, log {component.log_path})")
        yield services
    finally:
        for component in reversed(components):
            component.stop()
        for cleanup in cleanups:
            cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
