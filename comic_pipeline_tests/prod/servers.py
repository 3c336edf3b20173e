"""Starting real servers for the prod tests and benchmarks/bench_scale.py: each in its own session,
stopped by process group (never by name)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT_S = 180
CHECKOUT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin(name: str) -> str:
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


def start_process(name: str, command: list[str], log_path: Path, env: dict | None = None,
           cwd: str | None = None) -> Component:
    log = open(log_path, "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                               start_new_session=True)
    log.close()
    return Component(name, process, log_path)


def wait_until(component: Component, ready, what: str) -> None:
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


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def start_postgres(folder: Path, *, fsync: bool = False) -> tuple[Component, int]:
    """A throwaway cluster; fsync off (tests) unless `fsync` (benchmarks: a durable database)."""
    initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir(parents=True)
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, timeout=120)
    port = free_port()
    log_path = folder / "postgres.log"
    log_path.touch()
    if as_postgres:
        shutil.chown(log_path, "postgres")
    component = start_process("postgresql", [*as_postgres, postgres, "-D", str(data), "-p", str(port), "-k", str(sockets),
                                      "-c", "listen_addresses=127.0.0.1", "-c", f"fsync={'on' if fsync else 'off'}",
                                      "-c", "max_connections=200"], log_path)

    def ready() -> bool:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres").close()
        return True

    wait_until(component, ready, "connections")
    return component, port


def start_moto(folder: Path) -> tuple[Component, str]:
    port = free_port()
    component = start_process("moto-s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                       folder / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    wait_until(component, lambda: http_ok(f"{endpoint}/moto-api/"), "HTTP answer")
    return component, endpoint


def start_mlflow(folder: Path, services, artifacts_bucket: str) -> tuple[Component, str]:
    """The server exactly as deploy/mlflow-server.sh starts it in production."""
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": services.s3_endpoint,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "MLFLOW_PG_URL": services.postgres_url("mlflow"),
           "MLFLOW_ARTIFACTS": f"s3://{artifacts_bucket}/mlartifacts",
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # the script's default (false) applies
    component = start_process("mlflow-server", ["bash", str(CHECKOUT / "deploy" / "mlflow-server.sh")],
                       folder / "mlflow.log", env=env)
    uri = f"http://127.0.0.1:{port}"
    wait_until(component, lambda: http_ok(f"{uri}/health"), "/health")
    return component, uri


