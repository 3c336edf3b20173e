"""MLflow tracking and registry, over MLflow's own API (no dagster import here).

One MLflow run per training materialization; evaluation logs into the same run; the registry alias
`champion` names the model version that downstream embeddings use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

# torch (model_artifact) and mlflow are imported where used: Dagster loads this module with the
# definitions, in every run process and code server, before any step needs them

CHAMPION_ALIAS = "champion"
TRAINING_FINGERPRINT_TAG = "training_fingerprint"  # on each training run: see version_trained_as


class TrackingUnavailable(RuntimeError):
    """MLflow tracking cannot be reached: training must not run untracked."""


@dataclass(frozen=True)
class Tracking:
    tracking_uri: str
    experiment_name: str
    registered_model_name: str
    artifact_root: str | None = None  # where a new experiment keeps its artifacts
    ui_url: str | None = None  # an MLflow UI serving this tracking store, for links
    model_cache: str | None = None  # a local folder keeping loaded models (load_model); None: none

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def ensure_reachable(self) -> None:
        """Raise TrackingUnavailable with the URI and the cause when MLflow cannot be used."""
        if self.tracking_uri.startswith(("http://", "https://")):
            # Fail fast instead of MLflow's minutes of retries against a dead server.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if self.tracking_uri.startswith("sqlite:///"):
            folder = os.path.dirname(self.tracking_uri[len("sqlite:///"):])
            os.makedirs(folder or ".", exist_ok=True)
        try:
            self.client().search_experiments(max_results=1)
        except Exception as error:  # any failure here means "untracked": refuse
            raise TrackingUnavailable(
                f"MLflow tracking at {self.tracking_uri!r} is unreachable ({type(error).__name__}: "
                f"{error}); refusing to train untracked. Start the tracking server or fix the "
                "tracking_uri of the mlflow resource."
            ) from error

    def experiment_id(self) -> str:
        client = self.client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(self.experiment_name, artifact_location=self.artifact_root)
        except Exception:  # created concurrently by another process
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            return experiment.experiment_id

    @contextlib.contextmanager
    def start_run(self, run_name: str, tags: Mapping[str, str]) -> Iterator[str]:
        """An active MLflow run (fluent API, so mlflow.pytorch.log_model can use it); yields its id.

        A failure inside marks the run FAILED, so every materialization leaves a truthful run.
        """
        import mlflow

        self.ensure_reachable()
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        experiment_id = self.experiment_id()
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)) as run:
            yield run.info.run_id

    def run_link(self, run_id: str) -> str | None:
        if not self.ui_url:
            return None
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id()}/runs/{run_id}"

    def log_and_register_model(self, model, input_example, pip_requirements: list[str]) -> tuple[str, str]:
        """Log `model` to the active run as weights + config (no pickle) and register it.

        The python_function flavor names our loader module (comic_pipeline.model_artifact), so
        `mlflow.pyfunc.load_model("models:/<name>@champion")` works where comic_pipeline is
        installed, and nothing in the artifact is code. Returns (model_uri, version).
        """
        import mlflow.pyfunc
        from mlflow.models import infer_signature

        from comic_pipeline import model_artifact

        signature = None
        if input_example is not None:
            example = np.asarray(input_example, dtype=np.float32)
            signature = infer_signature(example, model_artifact.SequenceModelPyfunc(model).predict(example))
        with tempfile.TemporaryDirectory() as scratch:
            folder = os.path.join(scratch, "sequence_model")
            model_artifact.save(model, folder)
            with warnings.catch_warnings():
                # the signature above says the shapes; see the comment on input_example
                warnings.filterwarnings("ignore", message=".*input example was not provided.*")
                info = mlflow.pyfunc.log_model(
                    name="model",
                    loader_module=model_artifact.LOADER_MODULE,
                    data_path=folder,
                    signature=signature,
                    # no input_example: the signature (from a real prediction) says the shapes, and
                    # MLflow's example validation would reload the model in the training process
                    registered_model_name=self.registered_model_name,
                    pip_requirements=pip_requirements,
                )
        version = str(info.registered_model_version)
        return f"models:/{self.registered_model_name}/{version}", version

    def load_model(self, version: str, map_location: str = "cpu", run_id: str | None = None):
        """The SequenceModel of a registered version (or alias URI suffix like '@champion').

        With the version's training `run_id` (a ModelRef carries it) and a `model_cache`, the
        model is kept in the cache under <model name>/<version>-<run id> and later loads read it
        from there without MLflow: a run process that only embeds then never imports MLflow
        (3 s of its start-up: launch -> first comic 14.8 -> 11.7 s, bench_run_overhead.py). A registered version's files never change, and the run id
        (a UUID) keeps two registries that reuse version numbers apart."""
        if run_id is None or self.model_cache is None or version.startswith("@"):
            return self._load_registered(version, map_location)
        from comic_pipeline import model_artifact

        cached = os.path.join(self.model_cache, self.registered_model_name, f"{version}-{run_id}")
        if os.path.isdir(cached):
            try:
                return model_artifact.load(cached, map_location=map_location)
            except Exception as error:  # noqa: BLE001 - any broken entry: MLflow is the source of truth
                warnings.warn(f"model cache {cached} unreadable ({error}); loading version {version} "
                              "from MLflow again")
                shutil.rmtree(cached, ignore_errors=True)
        model = self._load_registered(version, map_location)
        _put_in_cache(model, cached)
        return model

    def _load_registered(self, version: str, map_location: str):
        reference = version if version.startswith("@") else f"/{version}"
        return load_model_uri(f"models:/{self.registered_model_name}{reference}", self.tracking_uri,
                              map_location=map_location)

    def run_id_of(self, version: str) -> str:
        return self.client().get_model_version(self.registered_model_name, version).run_id

    def metrics_of(self, version: str | None) -> dict[str, float]:
        """The metrics logged in the training run of `version` ({} for None), where evaluation
        logs its test figures too."""
        return {} if version is None else dict(self.client().get_run(self.run_id_of(version)).data.metrics)

    def version_trained_as(self, training_fingerprint: str) -> tuple[str, str] | None:
        """(version, run id) of the newest registered version whose training run carries this
        `training_fingerprint` tag (same data, code and config), or None."""
        client = self.client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.{TRAINING_FINGERPRINT_TAG} = '{training_fingerprint}'")
        found = []
        for run in runs:
            for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
                if version.name == self.registered_model_name:
                    found.append((int(version.version), run.info.run_id))
        if not found:
            return None
        version, run_id = max(found)
        return str(version), run_id

    def champion_version(self) -> str | None:
        """The version the `champion` alias points at, or None when there is no champion yet."""
        from mlflow.exceptions import MlflowException

        try:
            return str(
                self.client().get_model_version_by_alias(self.registered_model_name, CHAMPION_ALIAS).version
            )
        except MlflowException:
            return None

    def set_champion(self, version: str) -> None:
        self.client().set_registered_model_alias(self.registered_model_name, CHAMPION_ALIAS, version)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client().log_batch(
            run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        )

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.client().log_artifact(run_id, local_path, artifact_path)


def _put_in_cache(model, folder: str) -> None:
    """Save `model` as the cache entry `folder`: written aside, then renamed into place whole
    (two processes filling the same entry: one rename wins, the other's copy is dropped)."""
    from comic_pipeline import model_artifact

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        model_artifact.save(model, scratch)
        os.rename(scratch, folder)  # atomic; fails when another process filled it first
    except OSError as error:
        if not os.path.isdir(folder):  # not a lost race: say so, the load itself succeeded
            warnings.warn(f"model cache {folder} not written ({error}); the next run loads from MLflow")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_model_uri(model_uri: str, tracking_uri: str, map_location: str = "cpu"):
    """Download a model logged by `Tracking.log_and_register_model` (e.g.
    `models:/comic-sequence-model@champion`) and build it from weights + config: no unpickling,
    no code from the artifact. A model of another kind (an old pickled one) is a clear error."""
    import mlflow
    from mlflow.models import Model

    from comic_pipeline import model_artifact

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
        flavor = Model.load(local).flavors.get("python_function", {})
        if flavor.get("loader_module") != model_artifact.LOADER_MODULE or "data" not in flavor:
            raise model_artifact.ModelArtifactError(
                f"{model_uri} was not logged as weights + config (python_function loader "
                f"{flavor.get('loader_module')!r}); pickled models are not loaded — retrain to register "
                "a safe version"
            )
        return model_artifact.load(os.path.join(local, flavor["data"]), map_location=map_location)


def code_version() -> str:
    """The checkout's git sha (with '-dirty' for local changes), or 'unknown' outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_requirements() -> list[str]:
    """What a logged model needs to load elsewhere (given, so MLflow does not infer it slowly)."""
    import safetensors
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
            f"safetensors=={safetensors.__version__}"]
