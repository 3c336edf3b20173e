"""Multi-task training of the panel-sequence transformer, evaluation and page embedding.

No dagster here. The page features are moved to the device ONCE as flat tables; a batch is a set
of sample indices turned into model inputs by torch indexing only (`TaskBatches`).

A training step draws one batch from every task present plus a batch of train pages for the
strip objective, and takes one AdamW step on the weighted sum of the losses (linear warmup, then
cosine decay; gradient clipping). An epoch is one pass over the largest task's train split;
smaller tasks cycle through fresh permutations. The data order of epoch e is drawn from
np.random.default_rng([seed, e]), so it is reproducible and a resumed run sees the same order.

Checkpoints (when `checkpoint_dir` is given) are written atomically at the end of every epoch
with everything needed to continue bit-for-bit on CPU: model, optimizer, scheduler, RNG states,
epoch, step, data order, best-so-far weights, history and a fingerprint of config + data.
"""

from __future__ import annotations

import contextlib
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

from comic_pipeline import fileio
from comic_pipeline.model import (
    KIND_PAD,
    READING_ORDER,
    ModelConfig,
    SequenceModel,
    dropout_view,
    gather_panels,
    scores_to_order,
    task_inputs,
)
from comic_pipeline.schema import MASK, MODALITIES, PAD, TASK_NAMES, TASKS, PageFeatures, TaskDataset

CHECKPOINT_NAME = "checkpoint.pt"
# Peak learning rate per model preset: small models take (and need) larger steps.
PRESET_LR = {"tiny": 3e-3, "demo": 1e-3, "full": 3e-4}


# --- configuration -----------------------------------------------------------------------------
@dataclass
class TrainConfig:
    preset: str = "demo"  # model size, a ModelConfig preset: "tiny", "demo" or "full"
    d_model: int | None = None  # overrides of the preset (None = the preset's value)
    n_layers: int | None = None
    n_heads: int | None = None
    dropout: float | None = None
    lr: float | None = None  # peak learning rate; None = the preset's (PRESET_LR)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warmup
    min_lr_ratio: float = 0.1
    batch_size: int = 64  # samples per task per step
    strip_batch_size: int | None = None  # pages per step for the strip objective (None = batch_size)
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps in all (0: untrained)
    loss_weights: dict[str, float] = field(default_factory=dict)  # task or "strip" -> weight (1.0)
    seed: int = 0
    patience: int | None = 3  # epochs without a better val mean accuracy before stopping
    log_every: int = 50  # steps
    grad_clip: float | None = 1.0
    strip_keep_prob: float = 0.6  # panel-dropout views of the strip objective
    strip_temperature: float = 0.1
    eval_batch_size: int = 512

    def __post_init__(self):
        if self.preset not in PRESET_LR:
            raise ValueError(f"unknown model preset {self.preset!r}; known: {', '.join(PRESET_LR)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for name in ("batch_size", "epochs", "log_every", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if (self.lr is not None and self.lr <= 0) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: lr must be positive and warmup_steps >= 0, got "
                             f"lr={self.lr}, warmup_steps={self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 0:
            # 0 is allowed: the model at its seeded initialization, a random-weights baseline
            raise ValueError(f"TrainConfig.max_steps must be >= 0 or None, got {self.max_steps}")
        if not 0.0 < self.strip_keep_prob <= 1.0:
            raise ValueError(f"TrainConfig.strip_keep_prob must be in (0, 1], got {self.strip_keep_prob}")
        unknown = set(self.loss_weights) - set(TASK_NAMES) - {"strip"}
        if unknown:
            raise ValueError(f"TrainConfig.loss_weights: unknown keys {sorted(unknown)}; "
                             f"use task names or 'strip'")

    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else PRESET_LR[self.preset]

    def weight(self, name: str) -> float:
        return float(self.loss_weights.get(name, 1.0))

    def model_config(self, features: PageFeatures) -> ModelConfig:
        """The model for these features: the preset sized to their dim/panels/boxes/modalities."""
        return ModelConfig.preset(
            self.preset, dim=features.dim, max_panels=features.max_panels,
            max_boxes=features.max_boxes, modalities=tuple(sorted(features.modalities)),
            d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, dropout=self.dropout,
        )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


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
    fingerprint: str = ""
    stopped_early: bool = False

    @property
    def best_record(self) -> dict[str, float]:
        """The history entry of the best epoch (epochs are 1-based: history[best_epoch - 1])."""
        return next((r for r in self.history if r["epoch"] == self.best_epoch), {})


# --- devices -----------------------------------------------------------------------------------
def resolve_device(spec: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """"auto": CUDA when available (autocast bf16) else CPU (no autocast); "cpu"; "cuda[:N]"."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise ValueError(f"device {spec!r} is not a device name ('auto', 'cpu', 'cuda:N')") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available here")
        return device, torch.bfloat16
    if device.type != "cpu":
        raise ValueError(f"device {spec!r}: only 'cpu' and 'cuda' are supported")
    return device, None


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads to `threads`, or else cap them at the cores this process
    may run on (torch's default counts the machine's cores, not the container's). A caller that
    chose fewer threads (torch.set_num_threads, OMP_NUM_THREADS) keeps its choice.

    Oversubscription hurts badly: torch's thread pool spin-waits, so with more threads than free
    cores a small model's step gets many times slower. When several processes train or embed at
    once (Dagster's multiprocess executor), give each fewer threads (e.g. OMP_NUM_THREADS=1)."""
    if threads is None:
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            usable = os.cpu_count() or 1
        threads = min(torch.get_num_threads(), usable)
    threads = max(1, int(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# --- batches -----------------------------------------------------------------------------------
def feature_tables(features: PageFeatures, device: torch.device) -> dict[str, torch.Tensor]:
    """Flat panel tables on `device`: modality -> (N * P, D), text (N * P, X, D) + text_mask."""
    N, P = features.panel_mask.shape
    tables = {"panel_mask": torch.as_tensor(features.panel_mask, device=device)}  # (N, P)
    for modality in features.modalities:
        array = np.asarray(getattr(features, modality), dtype=np.float32)
        tables[modality] = torch.as_tensor(array, device=device).reshape(N * P, *array.shape[2:])
    if features.text_mask is not None:
        tables["text_mask"] = torch.as_tensor(features.text_mask, device=device).reshape(N * P, -1)
    return tables


def _check_dataset(task: str, dataset: TaskDataset, features: PageFeatures) -> None:
    """Clear errors for a dataset that does not fit the features (once, vectorized)."""
    from comic_pipeline.schema import page_table_matches

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}")
    if dataset.task != task:
        raise ValueError(f"dataset given as {task!r} holds task {dataset.task!r}")
    if not page_table_matches(dataset, features):
        raise ValueError(f"task {task!r}: its page table ({len(dataset.comic_ids)} pages) is not the "
                         f"page table of the features ({features.n_pages} pages)")
    if dataset.max_panels != features.max_panels:
        raise ValueError(f"task {task!r}: max_panels {dataset.max_panels} but the features have "
                         f"{features.max_panels}")
    missing = TASKS[task].missing(features.modalities)
    if missing:
        raise ValueError(f"task {task!r} cannot be trained: it {missing}")
    valid_refs = features.panel_mask.reshape(-1)
    n_refs = valid_refs.shape[0]
    required = {"page", "order"} if task == READING_ORDER else {"page", "context", "options", "label"}
    required |= {"text_closure": {"option_visual"}, "text_cloze": {"option_visual"},
                 "caption_relevance": {"caption_of"}, "character_coherence": {"box_order"}}.get(task, set())
    for split, fields in dataset.splits.items():
        where = f"task {task!r}, split {split!r}"
        if not fields or dataset.n_samples(split) == 0:
            continue
        absent = required - set(fields)
        if absent:
            raise ValueError(f"{where}: missing fields {sorted(absent)}")
        page = fields["page"]
        if page.min() < 0 or page.max() >= features.n_pages:
            raise ValueError(f"{where}: page rows outside 0..{features.n_pages - 1}")
        for name in ("options", "option_visual", "caption_of"):
            if name in fields:
                refs = fields[name]
                if refs.min() < 0 or refs.max() >= n_refs or not valid_refs[refs].all():
                    raise ValueError(f"{where}: field {name!r} names panels that do not exist")
        if task == READING_ORDER:
            continue
        if fields["options"].ndim != 2 or fields["options"].shape[1] < 2:
            raise ValueError(f"{where}: options have shape {fields['options'].shape}, expected (N, K >= 2)")
        K = fields["options"].shape[1]
        if fields["label"].min() < 0 or fields["label"].max() >= K:
            raise ValueError(f"{where}: labels outside 0..{K - 1}")
        n_masks = (fields["context"] == MASK).sum(1)
        if task == "sequence_filling" and not (n_masks == 1).all():
            raise ValueError(f"{where}: every context needs exactly one MASK")
        if task != "sequence_filling" and n_masks.any():
            raise ValueError(f"{where}: MASK in a context (only sequence_filling has one)")


class TaskBatches:
    """Task datasets + page features as device tensors; sample indices -> model inputs.

    The features become flat panel tables on `device` once; every split's index fields become
    device tensors once. `batch(task, split, indices)` is torch indexing only.
    """

    def __init__(self, datasets: Mapping[str, TaskDataset], features: PageFeatures, *,
                 device: torch.device | str = "cpu", modalities: tuple[str, ...] | None = None):
        self.device = torch.device(device)
        self.features = features
        self.max_panels = features.max_panels
        self.modalities = tuple(m for m in MODALITIES if m in set(modalities or features.modalities))
        absent = set(self.modalities) - features.modalities
        if absent:
            raise ValueError(f"the model needs modalities {sorted(absent)} that the features lack")
        for task, dataset in datasets.items():
            _check_dataset(task, dataset, features)
        self.tasks = tuple(t for t in TASK_NAMES if t in datasets)
        self.tables = feature_tables(features, self.device)
        self.fields: dict[str, dict[str, dict[str, torch.Tensor]]] = {
            task: {
                split: {name: torch.as_tensor(np.ascontiguousarray(array), device=self.device)
                        for name, array in fields.items()}
                for split, fields in datasets[task].splits.items()
            }
            for task in self.tasks
        }

    def n_samples(self, task: str, split: str) -> int:
        fields = self.fields.get(task, {}).get(split) or {}
        return int(fields["page"].shape[0]) if fields else 0

    def samples(self, task: str, split: str, indices) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.device, dtype=torch.long)
        return {name: array[index] for name, array in self.fields[task][split].items()}

    def batch(self, task: str, split: str, indices) -> dict:
        """Model inputs of samples `indices` (B,) of `task` in `split` (see model.task_inputs)."""
        return task_inputs(task, self.samples(task, split, indices), self.tables,
                           self.modalities, self.max_panels)

    def page_rows(self, split: str) -> np.ndarray:
        """Sorted page rows used by any task's `split` (the comics of that split)."""
        rows = [fields[split]["page"].cpu().numpy() for fields in self.fields.values() if split in fields]
        return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)

    def pages(self, rows) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Whole pages (B,) rows -> (inputs (B, P, ...), panel_mask (B, P)) for encode_pages."""
        rows = torch.as_tensor(rows, device=self.device, dtype=torch.long)
        slots = torch.arange(self.max_panels, device=self.device)
        refs = rows[:, None] * self.max_panels + slots  # (B, P)
        panel_mask = self.tables["panel_mask"][rows]  # (B, P)
        return gather_panels(self.tables, torch.where(panel_mask, refs, -1), self.modalities), panel_mask


# --- fingerprint -------------------------------------------------------------------------------
def training_fingerprint(config: TrainConfig, model_config: ModelConfig,
                         datasets: Mapping[str, TaskDataset], features: PageFeatures) -> str:
    """A hash of everything that decides the trained weights (except the device)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([config.to_dict(), model_config.to_dict()], sort_keys=True).encode())
    for task in sorted(datasets):
        digest.update(f"{task}:{datasets[task].fingerprint()}".encode())
    for name in ("comic_ids", "page_numbers", "panel_mask", *MODALITIES, "text_mask"):
        array = getattr(features, name)
        if array is not None:
            digest.update(f"{name}{array.shape}{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


# --- training ----------------------------------------------------------------------------------
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


def _optimizer(model: SequenceModel, config: TrainConfig) -> torch.optim.AdamW:
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


def _save_checkpoint(url: str, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fileio.atomic_write_bytes(url, buffer.getvalue())


def _load_checkpoint(url: str, log: Callable[[str], None]) -> dict | None:
    if not fileio.exists(url):
        return None
    try:
        with fileio.open_binary(url) as handle:
            # our own file: it holds numpy arrays and plain dicts besides tensors
            return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint means: train afresh
        log(f"checkpoint {url} cannot be read ({type(error).__name__}: {error}); starting fresh")
        return None


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(config: TrainConfig, datasets: Mapping[str, TaskDataset], features: PageFeatures, *,
          device: str = "auto", checkpoint_dir: str | None = None,
          log: Callable[[str], None] = print,
          on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train one multi-task model on every task with train samples; return the best epoch's
    model by validation mean accuracy. Resumes from `checkpoint_dir` when it holds a checkpoint
    of the same config and data. `on_epoch(epoch, metrics)` runs after each epoch's checkpoint."""
    configure_cpu_threads()
    torch_device, amp_dtype = resolve_device(device)
    tasks = tuple(t for t in TASK_NAMES if t in datasets and datasets[t].n_samples("train") > 0)
    unknown = set(datasets) - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"train: unknown tasks {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
    if not tasks:
        raise ValueError("train: no task dataset has train samples")
    model_config = config.model_config(features)
    batches = TaskBatches({t: datasets[t] for t in tasks}, features, device=torch_device,
                          modalities=model_config.modalities)
    train_pages = batches.page_rows("train")
    val_pages = batches.page_rows("val")
    if len(train_pages) < 2:
        raise ValueError("train: the strip objective needs at least 2 train pages")
    fingerprint = training_fingerprint(config, model_config, {t: datasets[t] for t in tasks}, features)

    torch.manual_seed(config.seed)
    model = SequenceModel(model_config).to(torch_device)
    optimizer = _optimizer(model, config)
    strip_batch = min(config.strip_batch_size or config.batch_size, len(train_pages))
    sizes = {t: batches.n_samples(t, "train") for t in tasks}
    steps_per_epoch = -(-max(sizes.values()) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor(config, total_steps))

    history: list[dict[str, float]] = []
    epochs_done, step = 0, 0
    best_state, best_epoch, best_score, stale = None, 0, -math.inf, 0
    resumed_from = None
    checkpoint_url = fileio.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None
    saved = _load_checkpoint(checkpoint_url, log) if checkpoint_url else None
    if saved is not None and saved.get("fingerprint") != fingerprint:
        log(f"checkpoint {checkpoint_url} was made with a different config or data "
            f"(fingerprint {saved.get('fingerprint')} != {fingerprint}); starting fresh")
    elif saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        if torch_device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        epochs_done, step = saved["epoch"], saved["step"]
        history = saved["history"]
        best_state, best_epoch, best_score, stale = (saved["best_state"], saved["best_epoch"],
                                                     saved["best_score"], saved["stale_epochs"])
        resumed_from = epochs_done
        log(f"resumed from {checkpoint_url}: {epochs_done} epochs, {step} steps done")

    n_params = model.n_params()
    log(f"training {', '.join(tasks)} + strip on {torch_device} "
        f"({'bf16 autocast' if amp_dtype else 'float32'}): {n_params / 1e6:.2f}M parameters, "
        f"d_model {model_config.d_model}, {model_config.n_layers} layers, "
        f"lr {config.learning_rate():g}, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps in all")

    samples_per_step = config.batch_size * len(tasks) + strip_batch
    run_samples, run_seconds = 0, 0.0
    for epoch in range(epochs_done + 1, config.epochs + 1):
        if step >= total_steps:
            break
        if config.patience and stale >= config.patience:
            break
        steps_now = min(steps_per_epoch, total_steps - step)
        order = _epoch_order(config.seed, epoch, {**sizes, "strip": len(train_pages)},
                             steps_per_epoch * max(config.batch_size, strip_batch))
        model.train()
        loss_sums = {name: torch.zeros((), device=torch_device) for name in (*tasks, "strip", "total")}
        window_loss, window_steps, window_start = torch.zeros((), device=torch_device), 0, time.perf_counter()
        epoch_start = time.perf_counter()
        for i in range(steps_now):
            with _autocast(torch_device, amp_dtype):
                total = torch.zeros((), device=torch_device)
                for task in tasks:
                    indices = order[task][i * config.batch_size:(i + 1) * config.batch_size]
                    loss, _ = model.task_losses(task, batches.batch(task, "train", indices))
                    loss_sums[task] += loss.detach()
                    total = total + config.weight(task) * loss
                rows = train_pages[order["strip"][i * strip_batch:(i + 1) * strip_batch]]
                inputs, panel_mask = batches.pages(rows)
                strip = model.strip_loss(inputs, panel_mask, keep_prob=config.strip_keep_prob,
                                         temperature=config.strip_temperature)
                loss_sums["strip"] += strip.detach()
                total = total + config.weight("strip") * strip
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sums["total"] += total.detach()
            window_loss += total.detach()
            window_steps += 1
            if step % config.log_every == 0 or i == steps_now - 1:
                now = time.perf_counter()
                mean_loss = window_loss.item() / window_steps  # syncs the device
                rate = window_steps * samples_per_step / max(now - window_start, 1e-9)
                eta = (total_steps - step) * samples_per_step / max(rate, 1e-9)
                log(f"step {step}/{total_steps} | epoch {epoch} | {rate:,.0f} samples/s | "
                    f"loss {mean_loss:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | "
                    f"ETA {_format_seconds(eta)}")
                window_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
        epoch_seconds = time.perf_counter() - epoch_start
        run_samples += steps_now * samples_per_step
        run_seconds += epoch_seconds

        record: dict[str, float] = {"epoch": epoch, "steps": step, "lr": scheduler.get_last_lr()[0],
                                    "seconds": epoch_seconds,
                                    "samples_per_s": steps_now * samples_per_step / max(epoch_seconds, 1e-9)}
        record["train_loss"] = loss_sums["total"].item() / steps_now
        for name in (*tasks, "strip"):
            record[f"train_loss_{name}"] = loss_sums[name].item() / steps_now
        record.update(_validate(model, batches, tasks, val_pages, config, torch_device, amp_dtype))
        history.append(record)

        score = record.get("val_mean_accuracy", math.nan)
        if math.isnan(score):  # no val samples at all: the latest epoch counts as the best
            score = float(epoch)
        if score > best_score:
            best_state, best_epoch, best_score, stale = _cpu_state(model), epoch, score, 0
        else:
            stale += 1
        accuracies = " ".join(f"{t}={record[f'val_accuracy_{t}']:.3f}" for t in tasks
                              if f"val_accuracy_{t}" in record)
        log(f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}, "
            f"val loss {record.get('val_loss', math.nan):.4f}, val accuracy {accuracies}, "
            f"strip recall@1 {record.get('val_strip_recall1', math.nan):.3f}"
            f"{' (best)' if best_epoch == epoch else ''}")
        if checkpoint_url:
            _save_checkpoint(checkpoint_url, {
                "fingerprint": fingerprint, "epoch": epoch, "step": step,
                "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch_device.type == "cuda" else None,
                "data_order": {"rule": "np.random.default_rng([seed, epoch]) permutations",
                               "seed": config.seed, "last_epoch": order},
                "best_state": best_state, "best_epoch": best_epoch, "best_score": best_score,
                "stale_epochs": stale, "history": history,
                "train_config": config.to_dict(), "model_config": model_config.to_dict(),
            })
        if on_epoch is not None:
            on_epoch(epoch, record)
    # stopped early: patience ran out before the configured epochs and steps were done
    stopped_early = bool(config.patience and stale >= config.patience and step < total_steps
                         and history and history[-1]["epoch"] < config.epochs)

    final = SequenceModel(model_config)
    final.load_state_dict(best_state if best_state is not None else _cpu_state(model))
    final.eval()
    if run_seconds > 0:
        samples_per_s = run_samples / run_seconds
    else:
        samples_per_s = float(history[-1]["samples_per_s"]) if history else 0.0
    return TrainResult(model=final, history=history, best_epoch=best_epoch, resumed_from_epoch=resumed_from,
                       steps=step, samples_per_s=samples_per_s, tasks=tasks, model_config=model_config,
                       fingerprint=fingerprint, stopped_early=stopped_early)


# --- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def _run_task(model: SequenceModel, batches: TaskBatches, task: str, split: str, batch_size: int,
              amp: tuple[torch.device, torch.dtype | None]) -> tuple[float, dict[str, np.ndarray]]:
    """Mean loss and per-sample outputs of `task` on `split`, in batches, model in eval mode."""
    was_training = model.training
    model.eval()
    n = batches.n_samples(task, split)
    loss_sum, outputs = 0.0, []
    for start in range(0, n, batch_size):
        indices = np.arange(start, min(n, start + batch_size))
        batch = batches.batch(task, split, indices)
        with _autocast(*amp):
            loss, logits = model.task_losses(task, batch)
        loss_sum += loss.item() * len(indices)
        if task == READING_ORDER:
            predicted = scores_to_order(logits, batch["kind"] != KIND_PAD)
            outputs.append({"predicted_order": predicted, "order": batch["order"], "scores": logits.float()})
        else:
            outputs.append({"prediction": logits.argmax(1), "label": batch["label"],
                            "scores": logits.float()})
    model.train(was_training)
    if not outputs:
        return math.nan, {}
    joined = {name: torch.cat([o[name] for o in outputs]).cpu().numpy() for name in outputs[0]}
    return loss_sum / n, joined


def _pairwise_accuracy(predicted: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per sample, the fraction of panel pairs put in their true relative order (N,)."""
    valid = order != PAD
    pair = valid[:, :, None] & valid[:, None, :]
    pair &= np.triu(np.ones(order.shape[1:] * 2, dtype=bool), k=1)[None]
    sign_predicted = np.sign(predicted[:, :, None] - predicted[:, None, :])  # (N, P, P)
    agree = sign_predicted == np.sign(order[:, :, None] - order[:, None, :])
    n_pairs = pair.sum((1, 2))
    return np.where(n_pairs > 0, (agree & pair).sum((1, 2)) / np.maximum(n_pairs, 1), 1.0)


def _task_accuracy(task: str, outputs: dict[str, np.ndarray]) -> float:
    """Option tasks: accuracy. reading_order: mean pairwise accuracy (chance 0.5)."""
    if task == READING_ORDER:
        return float(_pairwise_accuracy(outputs["predicted_order"], outputs["order"]).mean())
    return float((outputs["prediction"] == outputs["label"]).mean())


def _view_masks(panel_mask: np.ndarray, keep_prob: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded panel-dropout views (N, P) of every page (numpy, independent of batching)."""
    uniform = torch.as_tensor(np.random.default_rng(seed).random((2, *panel_mask.shape)))
    mask = torch.as_tensor(panel_mask)
    return (dropout_view(mask, uniform[0], keep_prob).numpy(),
            dropout_view(mask, uniform[1], keep_prob).numpy())


@torch.no_grad()
def _strip_views(model: SequenceModel, batches: TaskBatches, rows: np.ndarray, keep_prob: float,
                 seed: int, batch_size: int, amp) -> tuple[np.ndarray, np.ndarray]:
    was_training = model.training
    model.eval()
    masks = _view_masks(batches.features.panel_mask[rows], keep_prob, seed)
    views = ([], [])
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        inputs, _ = batches.pages(rows[chunk])
        for view, mask in zip(views, masks):
            with _autocast(*amp):
                _, strips = model.encode_pages(inputs, torch.as_tensor(mask[chunk], device=batches.device))
            view.append(strips.float().cpu())
    model.train(was_training)
    return torch.cat(views[0]).numpy(), torch.cat(views[1]).numpy()


def view_recall_at_1(view_a: np.ndarray, view_b: np.ndarray) -> float:
    """Fraction of pages whose view a has its own view b as the nearest (cosine) of all b views."""
    a = view_a / np.maximum(np.linalg.norm(view_a, axis=1, keepdims=True), 1e-12)
    b = view_b / np.maximum(np.linalg.norm(view_b, axis=1, keepdims=True), 1e-12)
    return float((np.argmax(a @ b.T, axis=1) == np.arange(len(a))).mean()) if len(a) else math.nan


def _validate(model, batches: TaskBatches, tasks, val_pages, config: TrainConfig, device, amp_dtype) -> dict:
    record: dict[str, float] = {}
    val_loss, accuracies = 0.0, []
    for task in tasks:
        if batches.n_samples(task, "val") == 0:
            continue
        loss, outputs = _run_task(model, batches, task, "val", config.eval_batch_size, (device, amp_dtype))
        record[f"val_loss_{task}"] = loss
        record[f"val_accuracy_{task}"] = _task_accuracy(task, outputs)
        val_loss += config.weight(task) * loss
        accuracies.append(record[f"val_accuracy_{task}"])
    if accuracies:
        record["val_loss"] = val_loss
        record["val_mean_accuracy"] = float(np.mean(accuracies))
    if len(val_pages) >= 2:
        # a fixed sample of val pages so the figure is comparable across epochs
        rows = val_pages[:2048]
        view_a, view_b = _strip_views(model, batches, rows, config.strip_keep_prob, config.seed,
                                      config.eval_batch_size, (device, amp_dtype))
        record["val_strip_recall1"] = view_recall_at_1(view_a, view_b)
    return record


def evaluate(model: SequenceModel, dataset: TaskDataset, features: PageFeatures, split: str, *,
             device: str = "auto", batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per-sample predictions of `model` on `split` of `dataset`.

    option tasks: {"prediction": (N,), "label": (N,), "scores": (N, K)} (+ "variant" for
    text_cloze); reading_order: {"predicted_order": (N, P), "order"/"true_order": (N, P),
    "scores": (N, P)}, PAD (-1) after each page's panels. The model is moved to `device`.
    """
    torch_device, amp_dtype = resolve_device(device)
    batches = TaskBatches({dataset.task: dataset}, features, device=torch_device,
                          modalities=model.config.modalities)
    model.to(torch_device)
    _, outputs = _run_task(model, batches, dataset.task, split, batch_size, (torch_device, amp_dtype))
    if not outputs:  # an empty split: empty arrays of the right kind
        P, K = features.max_panels, TASKS[dataset.task].n_options
        if dataset.task == READING_ORDER:
            outputs = {"predicted_order": np.zeros((0, P), np.int64), "order": np.zeros((0, P), np.int64),
                       "scores": np.zeros((0, P), np.float32)}
        else:
            outputs = {"prediction": np.zeros(0, np.int64), "label": np.zeros(0, np.int64),
                       "scores": np.zeros((0, K), np.float32)}
    if dataset.task == READING_ORDER:
        outputs["true_order"] = outputs["order"]
    elif "variant" in dataset.splits.get(split, {}):
        outputs["variant"] = np.asarray(dataset.splits[split]["variant"])
    return outputs


@torch.no_grad()
def embed_pages(model: SequenceModel, features: PageFeatures, rows: np.ndarray | None = None, *,
                device: str = "auto", batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Contextualized panels (R, P, d_model) (padded slots zero) and strip embeddings
    (R, d_model), float32, of page `rows` (default: all) using every modality of the model."""
    torch_device, amp_dtype = resolve_device(device)
    rows = np.arange(features.n_pages) if rows is None else np.asarray(rows, dtype=np.int64)
    if features.dim != model.config.dim:
        raise ValueError(f"features have dim {features.dim}, but the model's projections expect "
                         f"dim {model.config.dim}")
    batches = TaskBatches({}, features, device=torch_device, modalities=model.config.modalities)
    model.to(torch_device)
    was_training = model.training
    model.eval()
    panels, strips = [], []
    for start in range(0, len(rows), batch_size):
        inputs, panel_mask = batches.pages(rows[start:start + batch_size])
        with _autocast(torch_device, amp_dtype):
            h, strip = model.encode_pages(inputs, panel_mask)
        panels.append(h.float().cpu())
        strips.append(strip.float().cpu())
    model.train(was_training)
    d = model.config.d_model
    if not panels:
        return np.zeros((0, features.max_panels, d), np.float32), np.zeros((0, d), np.float32)
    return torch.cat(panels).numpy(), torch.cat(strips).numpy()


def strip_views(model: SequenceModel, features: PageFeatures, rows: np.ndarray | None = None, *,
                keep_prob: float = 0.6, seed: int = 0, device: str = "auto",
                batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Strip embeddings (R, d_model) of two seeded panel-dropout views of each page in `rows`:
    the inputs of view-retrieval recall@1 (view a must find its own page's view b)."""
    torch_device, amp_dtype = resolve_device(device)
    rows = np.arange(features.n_pages) if rows is None else np.asarray(rows, dtype=np.int64)
    batches = TaskBatches({}, features, device=torch_device, modalities=model.config.modalities)
    model.to(torch_device)
    return _strip_views(model, batches, rows, keep_prob, seed, batch_size, (torch_device, amp_dtype))
