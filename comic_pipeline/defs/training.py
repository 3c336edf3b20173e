"""The multi-task sequence model: one MLflow run and one registered version per materialization."""


import json
import time
from typing import Optional

import dagster as dg
import mlflow
from pydantic import Field

from comic_pipeline import training
from comic_pipeline.defs.resources import (
    MLflowTracking, PipelineStorage, Stage3StoreResource, TorchDevice, profile,
)
from comic_pipeline.defs.tasks import TASK_KEYS, load_task_datasets
from comic_pipeline.tracking import code_version, model_requirements
from comic_pipeline.defs.k8s import gpu_op_tags


# Enough for the demo corpus (~3 min on 2 CPU cores) and for the small, easier tiny corpus.
DEFAULT_EPOCHS = {"demo": 3, "tiny": 15}


class TrainingConfig(dg.Config):
    preset: str = Field(default=profile(), description="Model size preset: tiny, demo or full.")
    d_model: Optional[int] = Field(default=None, description="Override the preset's width.")
    n_layers: Optional[int] = Field(default=None, description="Override the preset's depth.")
    n_heads: Optional[int] = Field(default=None, description="Override the preset's heads.")
    lr: Optional[float] = Field(default=None, description="Peak learning rate; default: the preset's.")
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_size: int = 64
    epochs: int = Field(
        default=DEFAULT_EPOCHS[profile()], description="Upper bound; early stopping may end sooner."
    )
    max_steps: Optional[int] = Field(default=None, description="Stop after this many steps.")
    loss_weights: dict[str, float] = Field(
        default_factory=dict, description="Per task (and 'strip') loss weight; default 1 each."
    )
    seed: int = 0
    patience: int = Field(default=3, description="Epochs without val improvement before stopping.")
    log_every: int = Field(default=50, description="Steps between progress lines in the log.")


def train_config_of(config: TrainingConfig) -> training.TrainConfig:
    return training.TrainConfig(
        preset=config.preset, d_model=config.d_model, n_layers=config.n_layers,
        n_heads=config.n_heads, lr=config.lr, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, batch_size=config.batch_size, epochs=config.epochs,
        max_steps=config.max_steps, loss_weights=dict(config.loss_weights), seed=config.seed,
        patience=config.patience, log_every=config.log_every,
    )


@dg.asset(
    group_name="training",
    deps=list(TASK_KEYS.values()),
    pool="gpu",
    op_tags=gpu_op_tags(),  # a GPU pod under k8s (defs/k8s.py)
    description=(
        "Trains the multi-task panel-sequence transformer on every generated task (heads score "
        "options against contextualized outputs; the strip embedding has its own objective). One "
        "MLflow run per materialization; the model is registered as a new version. Resumes from "
        "the last epoch checkpoint after a crash."
    ),
)
def sequence_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    stage3: Stage3StoreResource,
    storage: PipelineStorage,
    torch_device: TorchDevice,
    mlflow_tracking: MLflowTracking,
) -> dg.MaterializeResult:
    tracking = mlflow_tracking.tracking()
    tracking.ensure_reachable()  # never train untracked
    device = torch_device.configure()
    datasets, skipped = load_task_datasets(context.instance)
    if not datasets:
        raise dg.Failure(f"No task dataset to train on (skipped: {skipped}).")
    comic_ids = list(dict.fromkeys(next(iter(datasets.values())).comic_ids))
    features = stage3.open().load_features(comic_ids)
    train_config = train_config_of(config)
    tags = {
        "dagster_run_id": context.run_id,
        "dagster_asset_key": context.asset_key.to_user_string(),
        "code_version": code_version(),
    }
    started = time.perf_counter()
    with tracking.start_run(run_name=f"sequence_model-{context.run_id[:8]}", tags=tags) as run_id:
        _log_params(train_config, datasets, skipped, device)
        result = training.train(
            train_config, datasets, features, device=device,
            checkpoint_dir=storage.path("checkpoints", "sequence_model"),
            log=context.log.info,
            on_epoch=lambda epoch, metrics: _mlflow_log_metrics(metrics, epoch),
        )
        mlflow.log_dict({"history": result.history, "best_epoch": result.best_epoch}, "history.json")
        model = result.model.cpu().eval()
        example = features.fused[:2] if features.fused is not None else None
        model_uri, version = tracking.log_and_register_model(
            model, example, pip_requirements=model_requirements()
        )
    val_accuracy = {
        k: round(float(v), 4) for k, v in result.best_record.items() if k.startswith("val_accuracy_")
    }
    link = tracking.run_link(run_id)
    return dg.MaterializeResult(
        metadata={
            "mlflow_run_id": run_id,
            "model_uri": model_uri,
            "model_version": version,
            **({"mlflow_run": dg.MetadataValue.url(link)} if link else {}),
            "tasks_trained": ", ".join(sorted(datasets)),
            "tasks_skipped": json.dumps(skipped) if skipped else "none",
            "best_epoch": int(result.best_epoch),
            "epochs_run": len(result.history),
            "resumed_from_epoch": -1 if result.resumed_from_epoch is None else int(result.resumed_from_epoch),
            "steps": int(result.steps),
            "samples_per_s": round(float(result.samples_per_s), 1),
            "train_seconds": round(time.perf_counter() - started, 1),
            **val_accuracy,
        },
        data_version=dg.DataVersion(version),
    )


def _mlflow_log_metrics(metrics: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)


def _log_params(train_config, datasets, skipped, device: str) -> None:
    params = {k: v for k, v in train_config.to_dict().items() if k != "loss_weights"}
    params.update({f"loss_weight_{k}": v for k, v in train_config.loss_weights.items()})
    params.update({f"dataset_{name}": d.fingerprint() for name, d in datasets.items()})
    params.update({f"train_samples_{name}": d.n_samples("train") for name, d in datasets.items()})
    params.update({f"skipped_{name}": reason[:200] for name, reason in skipped.items()})
    params["device"] = device
    mlflow.log_params(params)
