"""A sequence model as an artifact: weights (safetensors) + config (JSON), no pickle (DESIGN §7).

A shared registry must not be a way to run someone's code, so nothing here unpickles: the weights
are plain tensors (safetensors), the config plain JSON, and the class that gives them behaviour is
`comic_pipeline.model.SequenceModel` from the installed package. MLflow's generic pyfunc loader
reaches this module by name (`loader_module`), so `mlflow.pyfunc.load_model("models:/...")` works
too, and it also imports code from the installed package only, never from the artifact.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from comic_pipeline.model import ModelConfig, SequenceModel

FORMAT = "comic-sequence-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
LOADER_MODULE = __name__  # what MLflow's python_function flavor records


class ModelArtifactError(ValueError):
    """A model folder that is not a weights + config sequence model (e.g. an old pickled one)."""


def save(model: SequenceModel, folder: str) -> None:
    """Write `model` to `folder` as config.json + weights.safetensors."""
    os.makedirs(folder, exist_ok=True)
    # contiguous CPU copies: safetensors refuses shared or strided storage
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(folder, CONFIG_FILE), "w") as handle:
        json.dump({"format": FORMAT, "version": FORMAT_VERSION, "model": model.config.to_dict()}, handle, indent=1)


def load(folder: str, map_location: str = "cpu") -> SequenceModel:
    """The SequenceModel saved in `folder` by `save`, in eval mode."""
    config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise ModelArtifactError(
            f"{folder}: not a weights + config sequence model (expected {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "a model version logged as a pickled PyTorch model is not loaded — retrain to re-register it"
        )
    with open(config_path) as handle:
        record = json.load(handle)
    if record.get("format") != FORMAT or record.get("version") != FORMAT_VERSION:
        raise ModelArtifactError(f"{config_path}: format {record.get('format')!r} version "
                                 f"{record.get('version')!r}, expected {FORMAT!r} {FORMAT_VERSION}")
    model = SequenceModel(ModelConfig.from_dict(record["model"]))
    state = load_file(weights_path, device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


class SequenceModelPyfunc:
    """MLflow pyfunc behaviour: (B, P, D) fused page embeddings -> (B, P, d_model) panels."""

    def __init__(self, model: SequenceModel):
        self.model = model

    def predict(self, model_input, params=None) -> np.ndarray:
        fused = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(fused).numpy()


def _load_pyfunc(data_path: str) -> SequenceModelPyfunc:
    """MLflow's python_function entry point (loader_module protocol)."""
    return SequenceModelPyfunc(load(data_path))
