"""Resources (each defined once), the one IO manager, and the executor. Immutable: configuration
in, handles out."""


import os
import urllib.parse
from typing import Optional

import dagster as dg
from pydantic import Field

from comic_pipeline import fileio, home
from comic_pipeline.defs import refs
from comic_pipeline.defs.k8s import executor_for_environment
from comic_pipeline.store import Stage3Store
from comic_pipeline.tracking import Tracking

STAGE3_STORE_ENV = "COMIC_STAGE3_STORE"
STAGE3_METADATA_ENV = "COMIC_STAGE3_METADATA"
PROFILE_ENV = "COMIC_PIPELINE_PROFILE"
MLFLOW_UI_ENV = "COMIC_MLFLOW_UI_URL"  # `make dev` sets it to the UI `make mlflow` serves


def profile() -> str:
    """`demo` (default) or `tiny`: chooses the demo corpus size and the model preset defaults."""
    value = os.environ.get(PROFILE_ENV, "demo")
    if value not in ("demo", "tiny"):
        raise ValueError(f"{PROFILE_ENV}={value!r}: expected 'demo' or 'tiny'")
    return value


class PipelineStorage(dg.ConfigurableResource):
    """The home folder every run writes into (task datasets, checkpoints, stores, MLflow)."""

    home: Optional[str] = Field(
        default=None,
        description="Folder or fsspec URL; default $COMIC_PIPELINE_HOME or .comic_pipeline/ in "
        "the checkout.",
    )

    contextualized_store: Optional[str] = Field(
        default=None,
        description="Path or fsspec URL of the contextualized-embedding zarr; default "
        "<home>/contextualized.zarr.",
    )

    def root(self) -> str:
        return (self.home or home.default_home()).rstrip("/")

    def contextualized_url(self) -> str:
        return self.contextualized_store or home.contextualized_store_url(self.root())

    def path(self, *parts: str) -> str:
        return "/".join([self.root(), *parts])


class Stage3StoreResource(dg.ConfigurableResource):
    """Where the Stage 3 embeddings are. Unset: the demo corpus in the home folder."""

    storage: dg.ResourceDependency[PipelineStorage]
    url: Optional[str] = Field(
        default=None,
        description=f"Path or fsspec URL of the Stage 3 zarr; default ${STAGE3_STORE_ENV}, else the "
        "generated demo store in the home folder.",
    )
    metadata_url: Optional[str] = Field(
        default=None,
        description=f"Legacy layout only: the JSON row list; default ${STAGE3_METADATA_ENV}.",
    )

    def store_url(self) -> str:
        return self.url or os.environ.get(STAGE3_STORE_ENV) or home.demo_store_url(self.storage.root())

    def is_demo(self) -> bool:
        return not (self.url or os.environ.get(STAGE3_STORE_ENV))

    def open(self) -> Stage3Store:
        return Stage3Store.open(
            self.store_url(), self.metadata_url or os.environ.get(STAGE3_METADATA_ENV) or None
        )

    def exists(self) -> bool:
        return fileio.exists(self.store_url())


class TorchDevice(dg.ConfigurableResource):
    """The accelerator: `auto` takes CUDA (bf16 autocast) when present, else the CPU."""

    device: str = Field(default="auto", description="auto, cpu or cuda:N")
    cpu_threads: Optional[int] = Field(
        default=1,
        description="Torch CPU threads when running on the CPU. torch's pool spin-waits, so on a "
        "machine shared with Dagster's daemon, webserver and other runs one thread is steadier "
        "than several; None uses every core (best on an otherwise idle machine).",
    )

    def configure(self) -> str:
        """Apply the thread setting; returns the device spec for the domain code."""
        from comic_pipeline.inference import configure_cpu_threads  # torch: only in steps that use it

        configure_cpu_threads(self.cpu_threads)
        return self.device


class MLflowTracking(dg.ConfigurableResource):
    """MLflow tracking + model registry (our own small resource over MLflow's API)."""

    storage: dg.ResourceDependency[PipelineStorage]
    tracking_uri: Optional[str] = Field(
        default=None,
        description="sqlite:///... or http(s)://server; default sqlite:///<home>/mlflow.db",
    )
    experiment_name: str = "comic_pipeline"
    registered_model_name: str = "comic-sequence-model"
    ui_url: Optional[str] = Field(
        default=None,
        description=f"An MLflow UI serving this tracking store, for run links; default ${MLFLOW_UI_ENV} "
        "(`make dev` sets it to the `make mlflow` address).",
    )
    model_cache: Optional[str] = Field(
        default=None,
        description="A local folder where run processes keep the registered models they load, so "
        "a later run loads one without MLflow; default <home>/model_cache for a local home, none "
        "for an object-store home.",
    )

    def tracking(self) -> Tracking:
        root = self.storage.root()
        return Tracking(
            tracking_uri=self.tracking_uri or home.mlflow_tracking_uri(root),
            experiment_name=self.experiment_name,
            registered_model_name=self.registered_model_name,
            artifact_root=None if self.tracking_uri else home.mlflow_artifact_root(root),
            ui_url=self.ui_url or os.environ.get(MLFLOW_UI_ENV) or None,
            model_cache=self.model_cache or home.model_cache(root),
        )


class RefIOManager(dg.ConfigurableIOManager):
    """The one IO manager: stores the refs that travel along the asset edges (defs/refs.py) as
    JSON under `<home>/refs/<asset key path>.json` (a partition adds `/<quoted key>`), written
    atomically through fileio, so the home may be a folder or an fsspec URL. Never arrays."""

    storage: dg.ResourceDependency[PipelineStorage]

    def url_of(self, key: dg.AssetKey, partition: Optional[str] = None) -> str:
        parts = ["refs", *key.path]
        if partition is not None:
            parts.append(urllib.parse.quote(partition, safe=""))
        parts[-1] += ".json"
        return self.storage.path(*parts)

    def _url(self, context, key: dg.AssetKey) -> str:
        if not context.has_asset_partitions:
            return self.url_of(key)
        partitions = list(context.asset_partition_keys)
        if len(partitions) != 1:
            raise dg.Failure(f"{key.to_user_string()}: a ref is stored per partition; this step "
                             f"covers {len(partitions)} partitions")
        return self.url_of(key, partitions[0])

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if obj is not None:
            fileio.atomic_write_bytes(self._url(context, context.asset_key), refs.dumps(obj))

    def load_input(self, context: dg.InputContext):
        key = context.upstream_output.asset_key if context.upstream_output else context.asset_key
        url = self._url(context, key)
        if not fileio.exists(url):
            raise dg.Failure(f"{key.to_user_string()} has not been materialized in this home yet "
                             f"(no {url}): materialize it first.")
        with fileio.open_binary(url) as handle:
            return refs.loads(handle.read())

    def stored(self, key: dg.AssetKey):
        """The stored ref of an unpartitioned asset, outside a run (reports, tests); None if none."""
        url = self.url_of(key)
        if not fileio.exists(url):
            return None
        with fileio.open_binary(url) as handle:
            return refs.loads(handle.read())


def build_resources(storage: PipelineStorage | None = None) -> dict[str, dg.ConfigurableResource]:
    storage = storage or PipelineStorage()
    return {
        "io_manager": RefIOManager(storage=storage),
        "storage": storage,
        "stage3": Stage3StoreResource(storage=storage),
        "torch_device": TorchDevice(),
        "mlflow_tracking": MLflowTracking(storage=storage),
    }


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=build_resources(), executor=executor_for_environment())  # defs/k8s.py
