"""Where a run writes: one home folder holds the Dagster instance, stores, checkpoints, MLflow.

`COMIC_PIPELINE_HOME` chooses it; the default is `.comic_pipeline/` in the checkout (git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "COMIC_PIPELINE_HOME"
CHECKOUT = Path(__file__).resolve().parent.parent


def default_home() -> str:
    return os.environ.get(HOME_ENV) or str(CHECKOUT / ".comic_pipeline")


def demo_store_url(home: str) -> str:
    return f"{home.rstrip('/')}/stage3_demo.zarr"


def contextualized_store_url(home: str) -> str:
    return f"{home.rstrip('/')}/contextualized.zarr"


def mlflow_tracking_uri(home: str) -> str:
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def mlflow_artifact_root(home: str) -> str:
    return (Path(home).resolve() / "mlartifacts").as_uri()
