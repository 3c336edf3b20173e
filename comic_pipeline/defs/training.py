"""The multi-task sequence model: one MLflow run and one registered version per materialization."""


import json
import time
from typing import Optional

import dagster as dg
from pydantic import Field

# comic_pipeline.training (torch) and mlflow are imported in the step that trains, not with the
# definitions that every run process and the code server load
from comic_pipeline.defs.datasets import load_task_datasets, pinned_features
from comic_pipeline.defs.keys import SEQUENCE_MODEL, TASK_KEYS
from comic_pipeline.defs.refs import ModelRef, TaskDatasetRef
from comic_pipeline.defs.resources import (
    MLflowTracking, PipelineStorage, Stage3StoreResource, TorchDevice, profile,
)
from comic_pipeline.tracking import TRAINING_FINGERPRINT_TAG, code_version, model_requirements
from comic_pipeline.train_config import TrainConfig
from comic_pipeline.defs.k8s import gpu_op_tags


class TrainingConfig(dg.Config):
    """Every TrainConfig setting, settable in the launchpad. Unset (None) = the preset's value
    (train_config.PRESETS, one table of sizes and settings); the preset defaults to the profile's."""

    preset: Optional[str] = Field(default=None, description="Model size and settings preset: tiny, "
                                  "demo or full; default: full for a configured Stage 3 store, the "
                                  "profile's ($COMIC_PIPELINE_PROFILE) for the demo corpus.")
    d_model: Optional[int] = Field(default=None, description="Width (default: the preset's).")
    n_layers: Optional[int] = Field(default=None, description="Transformer blocks (default: the preset's).")
    n_heads: Optional[int] = Field(default=None, description="Attention heads (default: the preset's).")
    dropout: Optional[float] = Field(default=None, description="Dropout (default: the preset's).")
    lr: Optional[float] = Field(default=None, description="Peak learning rate (default: the preset's).")
    weight_decay: Optional[float] = Field(default=None, description="AdamW weight decay on matrices.")
    warmup_steps: Optional[int] = Field(default=None, description="Linear warmup steps.")
    schedule: Optional[str] = Field(default=None, description="After warmup: cosine or constant.")
    min_lr_ratio: Optional[float] = Field(default=None, description="Cosine floor, a fraction of lr.")
    batch_size: Optional[int] = Field(default=None, description="Samples per task per step.")
    strip_batch_size: Optional[int] = Field(default=None, description="Pages per step for the strip "
                                            "objective (default: batch_size).")
    epochs: Optional[int] = Field(default=None, description="Upper bound; early stopping may end sooner.")
    max_steps: Optional[int] = Field(default=None, description="Stop after this many steps in all.")
    loss_weights: Optional[dict[str, float]] = Field(
        default=None, description="Per task (and 'strip') loss weight; default 1 each."
    )
    seed: Optional[int] = Field(default=None, description="Seed of weights and data order.")
    patience: Optional[int] = Field(default=None, description="Epochs without val improvement "
                                    "before stopping (0: never stop early).")
    log_every: Optional[int] = Field(default=None, description="Steps between progress lines in the log.")
    grad_clip: Optional[float] = Field(default=None, description="Gradient norm clip (0: none).")
    strip_keep_prob: Optional[float] = Field(default=None, description="Panel keep probability of "
                                             "the strip objective's dropout views.")
    strip_temperature: Optional[float] = Field(default=None, description="InfoNCE temperature.")
    eval_batch_size: Optional[int] = Field(default=None, description="Samples per validation batch.")


def train_config_of(config: TrainingConfig, stage3: Stage3StoreResource) -> TrainConfig:
    """The domain config: the preset with every field set in the launchpad (None: the preset's).
    No preset given: `full` (the real-use size, DESIGN §5) for a configured Stage 3 store, the
    profile's (demo or tiny) for the demo corpus."""
    overrides = {name: value for name, value in config.model_dump().items()
                 if name != "preset" and value is not None}
    preset = config.preset or (profile() if stage3.is_demo() else "full")
    return TrainConfig.from_preset(preset, **overrides)


@dg.asset(
    key=SEQUENCE_MODEL,
    group_name="training",
    ins={name: dg.AssetIn(key) for name, key in TASK_KEYS.items()},
    pool="gpu",
    op_tags=gpu_op_tags(),  # a GPU pod under k8s (defs/k8s.py)
    description=(
        "Trains the multi-task panel-sequence transformer on every generated task (heads score "
        "options against contextualized outputs; the strip embedding has its own objective). One "
        "MLflow run per materialization; the model is registered as a new version, unless a "
        "version was already trained on the same data, code and config: then that version is the "
        "output again (metadata `unchanged`) and nothing is trained. Resumes from the last epoch "
        "checkpoint after a crash."
    ),
)
def sequence_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    stage3: Stage3StoreResource,
    storage: PipelineStorage,
    torch_device: TorchDevice,
    mlflow_tracking: MLflowTracking,
    **task_refs: TaskDatasetRef,
) -> dg.Output[ModelRef]:
    """`task_refs`: one TaskDatasetRef per task (the inputs named by TASK_KEYS)."""
    import mlflow

    from comic_pipeline import training

    tracking = mlflow_tracking.tracking()
    tracking.ensure_reachable()  # never train untracked
    device = torch_device.configure()
    datasets, skipped = load_task_datasets(storage, task_refs)
    if not datasets:
        raise dg.Failure(f"No task dataset to train on (skipped: {skipped}).")
    features = pinned_features(stage3, datasets)  # fails by name if Stage 3 rewrote a comic since
    train_config = train_config_of(config, stage3)
    code = training.code_fingerprint()
    fingerprint = training.run_fingerprint(train_config, datasets, features, code)
    existing = tracking.version_trained_as(fingerprint)
    if existing is not None:
        return _unchanged(context, tracking, fingerprint, *existing, task_refs)
    tags = {
        "dagster_run_id": context.run_id,
        "dagster_asset_key": context.asset_key.to_user_string(),
        "code_version": code_version(),  # the git sha, for people
        "code_fingerprint": code,  # the domain modules' source hash, what the fingerprint uses
        TRAINING_FINGERPRINT_TAG: fingerprint,
    }
    started = time.perf_counter()
    with tracking.start_run(run_name=f"sequence_model-{context.run_id[:8]}", tags=tags) as run_id:
        _log_params(train_config, datasets, skipped, device)
        result = training.train(
            train_config, datasets, features, device=device,
            checkpoint_dir=storage.path("checkpoints", "sequence_model"),
            code_version=code,  # a finished checkpoint of other code is not reused
            log=context.log.info,
            on_epoch=lambda epoch, metrics: _mlflow_log_metrics(metrics, epoch),
        )
        for record in result.history[:result.resumed_from_epoch or 0]:
            # epochs an earlier (crashed) run trained: this run's curves show them too
            _mlflow_log_metrics(record, int(record["epoch"]))
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
    model_ref = ModelRef(name=tracking.registered_model_name, version=version, run_id=run_id,
                         uri=model_uri, datasets=dict(task_refs))
    return dg.Output(
        model_ref,
        metadata={
            "mlflow_run_id": run_id,
            "model_uri": model_uri,
            "model_version": version,
            **({"mlflow_run": dg.MetadataValue.url(link)} if link else {}),
            "tasks_trained": ", ".join(sorted(datasets)),
            "dataset_fingerprints": dg.MetadataValue.json(model_ref.fingerprints()),
            "tasks_skipped": json.dumps(skipped) if skipped else "none",
            "best_epoch": int(result.best_epoch),
            "epochs_run": len(result.history),
            "resumed_from_epoch": -1 if result.resumed_from_epoch is None else int(result.resumed_from_epoch),
            "steps": int(result.steps),
            "samples_per_s": round(float(result.samples_per_s), 1),
            "train_seconds": round(time.perf_counter() - started, 1),
            "training_fingerprint": fingerprint,
            "unchanged": False,
            **val_accuracy,
        },
        data_version=dg.DataVersion(version),
    )


def _unchanged(context, tracking, fingerprint: str, version: str, run_id: str,
               task_refs: dict[str, TaskDatasetRef]) -> dg.Output[ModelRef]:
    """The output when a registered version was trained on the same data, code and config: that
    version again, no new MLflow run or version, so the champion and the embeddings stay."""
    message = (f"Nothing to train: model version {version} (MLflow run {run_id}) was trained on the "
               f"same datasets, Stage 3 features, code and config (training fingerprint "
               f"{fingerprint}). No new version is registered; the champion and the embeddings stay "
               "as they are. Change the data, the code or the launch config to train a new version.")
    context.log.info(message)
    link = tracking.run_link(run_id)
    model_ref = ModelRef(name=tracking.registered_model_name, version=version, run_id=run_id,
                         uri=f"models:/{tracking.registered_model_name}/{version}", datasets=dict(task_refs))
    return dg.Output(
        model_ref,
        metadata={
            "unchanged": True,
            "note": message,
            "mlflow_run_id": run_id,
            "model_uri": model_ref.uri,
            "model_version": version,
            **({"mlflow_run": dg.MetadataValue.url(link)} if link else {}),
            "dataset_fingerprints": dg.MetadataValue.json(model_ref.fingerprints()),
            "training_fingerprint": fingerprint,
        },
        data_version=dg.DataVersion(version),
    )


def _mlflow_log_metrics(metrics: dict[str, float], epoch: int) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)


def _log_params(train_config, datasets, skipped, device: str) -> None:
    params = {k: v for k, v in train_config.to_dict().items() if k != "loss_weights"}
    params.update({f"loss_weight_{k}": v for k, v in train_config.loss_weights.items()})
    params.update({f"dataset_{name}": d.fingerprint() for name, d in datasets.items()})
    params.update({f"train_samples_{name}": d.n_samples("train") for name, d in datasets.items()})
    params.update({f"skipped_{name}": reason[:200] for name, reason in skipped.items()})
    params["device"] = device
    import mlflow

    mlflow.log_params(params)
