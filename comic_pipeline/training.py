"""Multi-task training of the panel-sequence transformer: the loop (settings: train_config).

A training step draws one batch from every task present plus a batch of train pages for the
strip objective, and takes one AdamW step on the weighted sum of the losses (linear warmup, then
cosine decay; gradient clipping). An epoch is one pass over the largest task's train split;
smaller tasks cycle through fresh permutations. The data order of epoch e is drawn from
np.random.default_rng([seed, e]), so it is reproducible and a resumed run sees the same order.

The `TrainState` IS the checkpoint: written atomically at the end of every epoch (when a
`checkpoint_dir` is given) with everything needed to continue bit-for-bit on CPU. No dagster here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from comic_pipeline import fileio, metrics
from comic_pipeline.batching import TaskBatches
from comic_pipeline.inference import (
    autocast,
    batch_strip_views,
    configure_cpu_threads,
    resolve_device,
    run_task,
)
from comic_pipeline.model import ModelConfig, SequenceModel
from comic_pipeline.schema import MODALITIES, PageFeatures, TaskDataset
from comic_pipeline.tasks import TASK_NAMES
from comic_pipeline.train_config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainResult:
    model: SequenceModel  # weights of the best epoch by val mean accuracy (on CPU)
    history: list[dict[str, float]]  # one dict per epoch
    best_epoch: int  # 1-based
    resumed_from_epoch: int | None  # epochs already done in the checkpoint this run resumed
    steps: int  # optimizer steps in all (including resumed ones)
    samples_per_s: float  # training samples (all tasks + strip pages) per second of step time
    tasks: tuple[str, ...] = ()
    model_config: ModelConfig | None = None
    fingerprint: str = ""  # of config, data and code version (see training_fingerprint)
    stopped_early: bool = False
    steps_this_run: int = 0  # 0 when a finished checkpoint of the same fingerprint was reused

    @property
    def reused_checkpoint(self) -> bool:
        """Nothing was trained: a finished run of the same config, data and code was found."""
        return self.resumed_from_epoch is not None and self.steps_this_run == 0

    @property
    def best_record(self) -> dict[str, float]:
        """The history entry of the best epoch (epochs are 1-based: history[best_epoch - 1])."""
        return next((r for r in self.history if r["epoch"] == self.best_epoch), {})


# --- the checkpoint ------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a run stands after an epoch; saved as is, it is the checkpoint."""

    fingerprint: str  # of config + data: a checkpoint is only resumed by the same run
    train_config: dict
    model_config: dict
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    model: dict | None = None  # state dicts (CPU)
    optimizer: dict | None = None
    scheduler: dict | None = None
    torch_rng: torch.Tensor | None = None
    cuda_rng: list | None = None
    data_order: dict | None = None  # the rule and the last epoch's sample order (for inspection)
    best_state: dict | None = None  # weights of the best epoch so far
    best_epoch: int = 0
    best_score: float = -math.inf
    stale_epochs: int = 0
    history: list = field(default_factory=list)

    def save(self, url: str) -> None:
        buffer = io.BytesIO()
        torch.save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, buffer)
        fileio.atomic_write_bytes(url, buffer.getvalue())

    @classmethod
    def load(cls, url: str, log: Callable[[str], None]) -> "TrainState | None":
        if not fileio.exists(url):
            return None
        try:
            with fileio.open_binary(url) as handle:
                # our own file: it holds numpy arrays and plain dicts besides tensors
                return cls(**torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=False))
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint means: train afresh
            log(f"checkpoint {url} cannot be read ({type(error).__name__}: {error}); starting fresh")
            return None


def training_fingerprint(config: TrainConfig, model_config: ModelConfig,
                         datasets: Mapping[str, TaskDataset], features: PageFeatures,
                         code_version: str = "") -> str:
    """A hash of everything that decides the trained weights (except the device): config, data
    and the code version (a code fix retrains instead of resuming old weights)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([config.resolved().to_dict(), model_config.to_dict(), code_version],
                             sort_keys=True).encode())
    for task in sorted(datasets):
        digest.update(f"{task}:{datasets[task].fingerprint()}".encode())
    for name in ("comic_ids", "page_numbers", "panel_mask", *MODALITIES, "text_mask"):
        array = getattr(features, name)
        if array is not None:
            digest.update(f"{name}{array.shape}{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def trainable_tasks(datasets: Mapping[str, TaskDataset]) -> tuple[str, ...]:
    """The tasks a run trains on: every known task with train samples, in TASK_NAMES order."""
    unknown = set(datasets) - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"train: unknown tasks {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
    tasks = tuple(t for t in TASK_NAMES if t in datasets and datasets[t].n_samples("train") > 0)
    if not tasks:
        raise ValueError("train: no task dataset has train samples")
    return tasks


def run_fingerprint(config: TrainConfig, datasets: Mapping[str, TaskDataset], features: PageFeatures,
                    code_version: str = "") -> str:
    """The fingerprint `train` gives a run of these arguments, known before training: a caller
    that finds it on an existing model version need not train or register again."""
    config = config.resolved()
    tasks = trainable_tasks(datasets)
    return training_fingerprint(config, config.model_config(features), {t: datasets[t] for t in tasks},
                                features, code_version)


def code_fingerprint() -> str:
    """A hash of the source of the domain modules (comic_pipeline/*.py, not the Dagster layer):
    the code that decides the weights. Unlike a git sha it tells two uncommitted edits apart and
    works in an installed package."""
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as handle:
                digest.update(name.encode() + b"\0" + handle.read() + b"\0")
    return digest.hexdigest()


# --- optimizer, schedule, data order -------------------------------------------------------------
def _learning_rate_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine
    return factor


def make_optimizer(model: SequenceModel, config: TrainConfig) -> torch.optim.AdamW:
    # weight decay on matrices only (nanoGPT): not on biases, LayerNorms or single tokens
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate(), betas=(0.9, 0.95),
    )


def _epoch_order(seed: int, epoch: int, sizes: Mapping[str, int], n_draws: int) -> dict[str, np.ndarray]:
    """Per source (task or "strip"), the `n_draws` sample indices of one epoch: fresh seeded
    permutations laid end to end (smaller tasks cycle)."""
    rng = np.random.default_rng([seed, epoch])
    order = {}
    for name in sorted(sizes):
        n = sizes[name]
        repeats = -(-n_draws // n)
        order[name] = np.concatenate([rng.permutation(n) for _ in range(repeats)])[:n_draws]
    return order


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --- the loop ------------------------------------------------------------------------------------
def train(config: TrainConfig, datasets: Mapping[str, TaskDataset], features: PageFeatures, *,
          device: str = "auto", checkpoint_dir: str | None = None,
          log: Callable[[str], None] = print,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          code_version: str = "") -> TrainResult:
    """Train one multi-task model on every task with train samples; return the best epoch's
    model by validation mean accuracy. Resumes from `checkpoint_dir` when it holds a checkpoint
    of the same config, data and `code_version` (TrainResult.fingerprint names all three: a
    caller that finds it on an existing model version can skip registering a new one).
    `on_epoch(epoch, metrics)` runs after each epoch's checkpoint."""
    config = config.resolved()
    configure_cpu_threads()
    torch_device, amp_dtype = resolve_device(device)
    tasks = trainable_tasks(datasets)
    model_config = config.model_config(features)
    batches = TaskBatches({t: datasets[t] for t in tasks}, features, device=torch_device,
                          modalities=model_config.modalities)
    train_pages, val_pages = batches.page_rows("train"), batches.page_rows("val")
    if len(train_pages) < 2:
        raise ValueError("train: the strip objective needs at least 2 train pages")

    torch.manual_seed(config.seed)
    model = SequenceModel(model_config).to(torch_device)
    optimizer = make_optimizer(model, config)
    strip_batch = min(config.strip_batch_size or config.batch_size, len(train_pages))
    sizes = {t: batches.n_samples(t, "train") for t in tasks}
    steps_per_epoch = -(-max(sizes.values()) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor(config, total_steps))

    state = TrainState(training_fingerprint(config, model_config, {t: datasets[t] for t in tasks}, features,
                                            code_version), config.to_dict(), model_config.to_dict())
    resumed_from = None
    checkpoint_url = fileio.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None
    saved = TrainState.load(checkpoint_url, log) if checkpoint_url else None
    if saved is not None and saved.fingerprint != state.fingerprint:
        log(f"checkpoint {checkpoint_url} was made with a different config or data "
            f"(fingerprint {saved.fingerprint} != {state.fingerprint}); starting fresh")
    elif saved is not None:
        state = saved
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.torch_rng)
        if torch_device.type == "cuda" and state.cuda_rng is not None:
            torch.cuda.set_rng_state_all(state.cuda_rng)
        resumed_from = state.epoch
        log(f"resumed from {checkpoint_url}: {state.epoch} epochs, {state.step} steps done")

    log(f"training {', '.join(tasks)} + strip on {torch_device} "
        f"({'bf16 autocast' if amp_dtype else 'float32'}): {model.n_params() / 1e6:.2f}M parameters, "
        f"d_model {model_config.d_model}, {model_config.n_layers} layers, lr {config.learning_rate():g}, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps in all")

    samples_per_step = config.batch_size * len(tasks) + strip_batch
    run_samples, run_seconds, first_step = 0, 0.0, state.step
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if state.step >= total_steps or (config.patience and state.stale_epochs >= config.patience):
            break
        steps_now = min(steps_per_epoch, total_steps - state.step)
        order = _epoch_order(config.seed, epoch, {**sizes, "strip": len(train_pages)},
                             steps_per_epoch * max(config.batch_size, strip_batch))
        model.train()
        loss_sums = {name: torch.zeros((), device=torch_device) for name in (*tasks, "strip", "total")}
        window_loss, window_steps, window_start = torch.zeros((), device=torch_device), 0, time.perf_counter()
        epoch_start = time.perf_counter()
        for i in range(steps_now):
            with autocast(torch_device, amp_dtype):
                total = torch.zeros((), device=torch_device)
                for task in tasks:
                    loss, _ = model(batches.batch(task, "train", order[task][i * config.batch_size:
                                                                             (i + 1) * config.batch_size]))
                    loss_sums[task] += loss.detach()
                    total = total + config.weight(task) * loss
                rows = train_pages[order["strip"][i * strip_batch:(i + 1) * strip_batch]]
                strip, _ = model(batches.pages(rows, keep_prob=config.strip_keep_prob,
                                               temperature=config.strip_temperature))
                loss_sums["strip"] += strip.detach()
                total = total + config.weight("strip") * strip
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            loss_sums["total"] += total.detach()
            window_loss += total.detach()
            window_steps += 1
            if state.step % config.log_every == 0 or i == steps_now - 1:
                now = time.perf_counter()
                rate = window_steps * samples_per_step / max(now - window_start, 1e-9)
                eta = (total_steps - state.step) * samples_per_step / max(rate, 1e-9)
                log(f"step {state.step}/{total_steps} | epoch {epoch} | {rate:,.0f} samples/s | "
                    f"loss {window_loss.item() / window_steps:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | "
                    f"ETA {_format_seconds(eta)}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
        epoch_seconds = time.perf_counter() - epoch_start
        run_samples += steps_now * samples_per_step
        run_seconds += epoch_seconds

        record: dict[str, float] = {"epoch": epoch, "steps": state.step, "lr": scheduler.get_last_lr()[0],
                                    "seconds": epoch_seconds,
                                    "samples_per_s": steps_now * samples_per_step / max(epoch_seconds, 1e-9),
                                    "train_loss": loss_sums["total"].item() / steps_now}
        for name in (*tasks, "strip"):
            record[f"train_loss_{name}"] = loss_sums[name].item() / steps_now
        record.update(validate(model, batches, tasks, val_pages, config, (torch_device, amp_dtype)))
        state.history.append(record)

        score = record.get("val_mean_accuracy", math.nan)
        if math.isnan(score):  # no val samples at all: the latest epoch counts as the best
            score = float(epoch)
        if score > state.best_score:
            state.best_state, state.best_epoch, state.best_score, state.stale_epochs = _cpu_state(model), epoch, score, 0
        else:
            state.stale_epochs += 1
        accuracies = " ".join(f"{t}={record[f'val_accuracy_{t}']:.3f}" for t in tasks
                              if f"val_accuracy_{t}" in record)
        log(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}, "
            f"val loss {record.get('val_loss', math.nan):.4f}, val accuracy {accuracies}, "
            f"strip recall@1 {record.get('val_strip_recall1', math.nan):.3f}"
            f"{' (best)' if state.best_epoch == epoch else ''}")
        state.epoch = epoch
        if checkpoint_url:
            state.model, state.optimizer, state.scheduler = (_cpu_state(model), optimizer.state_dict(),
                                                             scheduler.state_dict())
            state.torch_rng = torch.get_rng_state()
            state.cuda_rng = torch.cuda.get_rng_state_all() if torch_device.type == "cuda" else None
            state.data_order = {"rule": "np.random.default_rng([seed, epoch]) permutations",
                                "seed": config.seed, "last_epoch": order}
            state.save(checkpoint_url)
        if on_epoch is not None:
            on_epoch(epoch, record)
    # stopped early: patience ran out before the configured epochs and steps were done
    stopped_early = bool(config.patience and state.stale_epochs >= config.patience and state.step < total_steps
                         and state.history and state.history[-1]["epoch"] < config.epochs)

    final = SequenceModel(model_config)
    final.load_state_dict(state.best_state if state.best_state is not None else _cpu_state(model))
    final.eval()
    if run_seconds > 0:
        samples_per_s = run_samples / run_seconds
    else:
        samples_per_s = float(state.history[-1]["samples_per_s"]) if state.history else 0.0
    return TrainResult(model=final, history=state.history, best_epoch=state.best_epoch,
                       resumed_from_epoch=resumed_from, steps=state.step, samples_per_s=samples_per_s,
                       tasks=tasks, model_config=model_config, fingerprint=state.fingerprint,
                       stopped_early=stopped_early, steps_this_run=state.step - first_step)


def validate(model: SequenceModel, batches: TaskBatches, tasks, val_pages: np.ndarray, config: TrainConfig,
             amp: tuple[torch.device, torch.dtype | None]) -> dict[str, float]:
    """Val loss and accuracy per task (ordering tasks: mean pairwise accuracy) and strip
    view-retrieval recall@1, all from comic_pipeline.metrics."""
    record: dict[str, float] = {}
    val_loss, accuracies = 0.0, []
    for task in tasks:
        if batches.n_samples(task, "val") == 0:
            continue
        loss, outputs = run_task(model, batches, task, "val", config.eval_batch_size, amp)
        record[f"val_loss_{task}"] = loss
        if "prediction" in outputs:
            accuracy = metrics.accuracy_report(outputs["prediction"], outputs["label"], 0.0).accuracy
        else:
            accuracy = float(np.nanmean(metrics.pairwise_accuracy(outputs["predicted_order"], outputs["order"])))
        record[f"val_accuracy_{task}"] = accuracy
        val_loss += config.weight(task) * loss
        accuracies.append(accuracy)
    if accuracies:
        record["val_loss"] = val_loss
        record["val_mean_accuracy"] = float(np.mean(accuracies))
    if len(val_pages) >= 2:
        # a fixed sample of val pages so the figure is comparable across epochs
        view_a, view_b = batch_strip_views(model, batches, val_pages[:2048], config.strip_keep_prob,
                                           config.seed, config.eval_batch_size, amp)
        record["val_strip_recall1"] = metrics.view_retrieval_recall_at_1(view_a, view_b)
    return record
