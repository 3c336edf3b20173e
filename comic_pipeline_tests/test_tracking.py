"""tracking: models go to MLflow as weights + config (no pickle) and load back by alias."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
import torch

from comic_pipeline import model_artifact, tracking
from comic_pipeline.model import ModelConfig, SequenceModel


@pytest.fixture
def local_tracking(tmp_path):
    return tracking.Tracking(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="t",
        registered_model_name="comic-sequence-model", artifact_root=(tmp_path / "art").as_uri(),
    )


def _model() -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(ModelConfig(dim=8, max_panels=4, max_boxes=0, modalities=("fused",),
                                     d_model=16, n_layers=1, n_heads=2)).eval()


def test_model_round_trips_without_pickle_and_loads_by_champion_alias(local_tracking, tmp_path):
    model = _model()
    pages = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
    pages[1, 3] = 0  # a padded slot
    with local_tracking.start_run("r", tags={}) as run_id:
        uri, version = local_tracking.log_and_register_model(model, pages, tracking.model_requirements())
    local_tracking.set_champion(version)
    assert local_tracking.champion_version() == version and local_tracking.run_id_of(version) == run_id

    with torch.no_grad():
        expected = model(torch.as_tensor(pages)).numpy()
    loaded = local_tracking.load_model(version)
    assert isinstance(loaded, SequenceModel) and not loaded.training
    with torch.no_grad():
        np.testing.assert_allclose(loaded(torch.as_tensor(pages)).numpy(), expected, rtol=1e-6, atol=1e-6)
    by_alias = tracking.load_model_uri("models:/comic-sequence-model@champion", local_tracking.tracking_uri)
    with torch.no_grad():
        np.testing.assert_allclose(by_alias(torch.as_tensor(pages)).numpy(), expected, rtol=1e-6, atol=1e-6)
    # MLflow's own pyfunc loader reaches our loader module: the same numbers
    mlflow.set_tracking_uri(local_tracking.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model("models:/comic-sequence-model@champion")
    np.testing.assert_allclose(pyfunc.predict(pages), expected, rtol=1e-6, atol=1e-6)

    # nothing in the logged model is a pickle: only JSON/YAML/text and the safetensors weights
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "dl"))
    files = [os.path.join(d, f) for d, _, names in os.walk(local) for f in names]
    assert any(f.endswith(model_artifact.WEIGHTS_FILE) for f in files)
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pt", ".cloudpickle"))]
    for path in files:
        with open(path, "rb") as handle:
            assert not handle.read(2).startswith(b"\x80"), f"{path} looks like a pickle"


def test_a_pickled_model_version_is_refused_with_a_clear_error(local_tracking):
    import mlflow.pytorch

    with local_tracking.start_run("old", tags={}):
        info = mlflow.pytorch.log_model(_model(), name="model", serialization_format="pickle",
                                        registered_model_name="comic-sequence-model",
                                        pip_requirements=["torch"])
    with pytest.raises(model_artifact.ModelArtifactError, match="pickled models are not loaded"):
        local_tracking.load_model(str(info.registered_model_version))


def test_model_artifact_checks_its_format(tmp_path):
    with pytest.raises(model_artifact.ModelArtifactError, match="not a weights"):
        model_artifact.load(str(tmp_path))


def test_a_model_loaded_once_with_its_run_id_loads_again_without_mlflow(local_tracking, tmp_path, monkeypatch):
    """The model cache: the first load (version + run id) goes through MLflow and fills the
    cache; the next ones read the cache and never reach MLflow; a broken entry is replaced."""
    import dataclasses

    cached_tracking = dataclasses.replace(local_tracking, model_cache=str(tmp_path / "cache"))
    model = _model()
    pages = np.random.default_rng(0).normal(size=(2, 4, 8)).astype(np.float32)
    with cached_tracking.start_run("r", tags={}) as run_id:
        _, version = cached_tracking.log_and_register_model(model, pages, tracking.model_requirements())
    with torch.no_grad():
        expected = model(torch.as_tensor(pages)).numpy()
    mlflow_loads = []
    real_load = tracking.load_model_uri
    monkeypatch.setattr(tracking, "load_model_uri", lambda *a, **k: mlflow_loads.append(a) or real_load(*a, **k))

    first = cached_tracking.load_model(version, run_id=run_id)
    entry = tmp_path / "cache" / "comic-sequence-model" / f"{version}-{run_id}"
    assert len(mlflow_loads) == 1 and sorted(os.listdir(entry)) == sorted(
        [model_artifact.CONFIG_FILE, model_artifact.WEIGHTS_FILE])
    assert [name for name in os.listdir(entry.parent) if name.startswith(".tmp")] == []
    second = cached_tracking.load_model(version, run_id=run_id)
    assert len(mlflow_loads) == 1  # from the cache
    for loaded in (first, second):
        with torch.no_grad():
            np.testing.assert_allclose(loaded(torch.as_tensor(pages)).numpy(), expected, rtol=1e-6, atol=1e-6)
    # without a run id (or a cache) it is MLflow every time: nothing to key the cache by
    cached_tracking.load_model(version)
    local_tracking.load_model(version, run_id=run_id)
    assert len(mlflow_loads) == 3
    # a broken entry: loaded from MLflow again (with a warning) and the entry rewritten
    (entry / model_artifact.WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="model cache .* unreadable"):
        again = cached_tracking.load_model(version, run_id=run_id)
    assert len(mlflow_loads) == 4
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.as_tensor(pages)).numpy(), expected, rtol=1e-6, atol=1e-6)
    cached_tracking.load_model(version, run_id=run_id)
    assert len(mlflow_loads) == 4
