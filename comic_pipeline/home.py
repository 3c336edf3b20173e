"""Where a run writes: one home holds the Dagster instance, stores, checkpoints, MLflow.

`COMIC_PIPELINE_HOME` chooses it: a local folder (default `.comic_pipeline/` in the checkout,
git-ignored) or an object-store URL such as `s3://bucket/comic-pipeline` (the production profile,
DESIGN §8). A URL home gives URL paths everywhere; nothing silently falls back to a local path.
"""

from __future__ import annotations

import os
from pathlib import Path

from comic_pipeline import fileio

HOME_ENV = "COMIC_PIPELINE_HOME"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CHECKOUT = Path(__file__).resolve().parent.parent


class HomeConfigurationError(ValueError):
    """The home cannot provide what was asked (e.g. an MLflow database on an object store)."""


def default_home() -> str:
    return os.environ.get(HOME_ENV) or str(CHECKOUT / ".comic_pipeline")


def is_url_home(home: str) -> bool:
    return fileio.is_url(home)


def _under(home: str, name: str) -> str:
    if is_url_home(home):
        return fileio.join(home, name)
    return str(Path(home) / name)


def demo_store_url(home: str) -> str:
    return f"{home.rstrip('/')}/stage3_demo.zarr"


def contextualized_store_url(home: str) -> str:
    return f"{home.rstrip('/')}/contextualized.zarr"


def mlflow_tracking_uri(home: str) -> str:
    """The MLflow tracking URI for this home.

    A local home keeps MLflow in `sqlite:///<home>/mlflow.db`. An object store cannot hold a
    SQLite database, so a URL home takes the tracking server from `MLFLOW_TRACKING_URI`, and
    without one it is an error, never a local file.
    """
    if is_url_home(home):
        uri = os.environ.get(TRACKING_URI_ENV, "").strip()
        if not uri:
            raise HomeConfigurationError(
                f"home {home!r} is an object-store URL, which cannot hold MLflow's SQLite database: "
                f"run an MLflow tracking server (deploy/mlflow-server.sh: PostgreSQL backend, S3 "
                f"artifacts) and set {TRACKING_URI_ENV}=http://<server>:5000 or the tracking_uri of "
                "the mlflow resource"
            )
        return uri
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def mlflow_artifact_root(home: str) -> str | None:
    """Where new experiments keep artifacts: `<home>/mlartifacts` for a local home; None for a
    URL home, whose tracking server decides (`--artifacts-destination`, proxied uploads)."""
    if is_url_home(home):
        return None
    return (Path(home).resolve() / "mlartifacts").as_uri()


def model_cache(home: str) -> str | None:
    """Where run processes keep the models they loaded (Tracking.load_model): `<home>/model_cache`
    for a local home; None for a URL home (each run's pod starts empty: nothing to keep)."""
    return None if is_url_home(home) else _under(home, "model_cache")


def dagster_home(home: str) -> str:
    """The local Dagster instance folder (`<home>/dagster`). A URL home has no local folder: its
    instance lives in PostgreSQL, configured by deploy/dagster.yaml in DAGSTER_HOME."""
    if is_url_home(home):
        raise HomeConfigurationError(
            f"home {home!r} is an object-store URL: Dagster's instance cannot live there; set "
            "DAGSTER_HOME to a folder holding deploy/dagster.yaml (PostgreSQL storage)"
        )
    return _under(home, "dagster")
