"""Running a trained model: devices, per-sample predictions, page and strip embeddings.

What evaluation, validation and the embedder call (none of them reaches into training). No dagster.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch

from comic_pipeline.batching import KIND_PAD, OptionBatch, TaskBatches
from comic_pipeline.model import SequenceModel, dropout_view, scores_to_order
from comic_pipeline.schema import PageFeatures, TaskDataset
from comic_pipeline.tasks import spec_of


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


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


# --- per-sample predictions ----------------------------------------------------------------------
@torch.no_grad()
def run_task(model: SequenceModel, batches: TaskBatches, task: str, split: str, batch_size: int,
             amp: tuple[torch.device, torch.dtype | None]) -> tuple[float, dict[str, np.ndarray]]:
    """Mean loss and per-sample outputs of `task` on `split`, in batches, model in eval mode.

    Option tasks: {"prediction", "label", "scores" (N, K)}; ordering tasks: {"predicted_order",
    "order", "scores" (N, P)}."""
    was_training = model.training
    model.eval()
    n = batches.n_samples(task, split)
    loss_sum, outputs = 0.0, []
    for start in range(0, n, batch_size):
        indices = np.arange(start, min(n, start + batch_size))
        batch = batches.batch(task, split, indices)
        with autocast(*amp):
            loss, scores = model(batch)
        loss_sum += loss.item() * len(indices)  # waits for the batch anyway: its outputs go to the host now
        if isinstance(batch, OptionBatch):
            output = {"prediction": scores.argmax(1), "label": batch.label, "scores": scores.float()}
        else:
            predicted = scores_to_order(scores, batch.kind != KIND_PAD)
            output = {"predicted_order": predicted, "order": batch.order, "scores": scores.float()}
        # on the host, so device memory holds one batch's outputs, not the whole split's
        outputs.append({name: value.cpu() for name, value in output.items()})
    model.train(was_training)
    if not outputs:
        return math.nan, {}
    joined = {name: torch.cat([o[name] for o in outputs]).numpy() for name in outputs[0]}
    return loss_sum / n, joined


def predict(model: SequenceModel, dataset: TaskDataset, features: PageFeatures, split: str, *,
            device: str = "auto", batch_size: int = 512) -> dict[str, np.ndarray]:
    """Per-sample predictions of `model` on `split` of `dataset`.

    option tasks: {"prediction": (N,), "label": (N,), "scores": (N, K)} (+ "variant" where the
    task has variants); ordering tasks: {"predicted_order": (N, P), "order"/"true_order": (N, P),
    "scores": (N, P)}, PAD (-1) after each page's panels. The model is moved to `device`.
    """
    spec = spec_of(dataset.task)
    torch_device, amp_dtype = resolve_device(device)
    batches = TaskBatches({dataset.task: dataset}, features, device=torch_device,
                          modalities=model.config.modalities)
    model.to(torch_device)
    _, outputs = run_task(model, batches, dataset.task, split, batch_size, (torch_device, amp_dtype))
    if not outputs:  # an empty split: empty arrays of the right kind
        P, K = features.max_panels, dataset.n_options or spec.n_options
        if spec.family == "order":
            outputs = {"predicted_order": np.zeros((0, P), np.int64), "order": np.zeros((0, P), np.int64),
                       "scores": np.zeros((0, P), np.float32)}
        else:
            outputs = {"prediction": np.zeros(0, np.int64), "label": np.zeros(0, np.int64),
                       "scores": np.zeros((0, K), np.float32)}
    if spec.family == "order":
        outputs["true_order"] = outputs["order"]
    elif split in dataset.splits and getattr(dataset.splits[split], "variant", None) is not None:
        outputs["variant"] = np.asarray(dataset.splits[split].variant)
    return outputs


# --- page and strip embeddings -------------------------------------------------------------------
def _view_masks(panel_mask: np.ndarray, keep_prob: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two seeded panel-dropout views (N, P) of every page (numpy, independent of batching)."""
    uniform = torch.as_tensor(np.random.default_rng(seed).random((2, *panel_mask.shape)))
    mask = torch.as_tensor(panel_mask)
    return (dropout_view(mask, uniform[0], keep_prob).numpy(),
            dropout_view(mask, uniform[1], keep_prob).numpy())


@torch.no_grad()
def batch_strip_views(model: SequenceModel, batches: TaskBatches, rows: np.ndarray, keep_prob: float,
                      seed: int, batch_size: int, amp) -> tuple[np.ndarray, np.ndarray]:
    """Strip embeddings of two seeded panel-dropout views of pages `rows` of `batches`."""
    was_training = model.training
    model.eval()
    masks = _view_masks(batches.features.panel_mask[rows], keep_prob, seed)
    views = ([], [])
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        pages = batches.pages(rows[chunk])
        for view, mask in zip(views, masks):
            with autocast(*amp):
                _, strips = model.encode_pages(pages.inputs, torch.as_tensor(mask[chunk], device=batches.device))
            view.append(strips.float().cpu())
    model.train(was_training)
    return torch.cat(views[0]).numpy(), torch.cat(views[1]).numpy()


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
        pages = batches.pages(rows[start:start + batch_size])
        with autocast(torch_device, amp_dtype):
            h, strip = model.encode_pages(pages.inputs, pages.panel_mask)
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
    return batch_strip_views(model, batches, rows, keep_prob, seed, batch_size, (torch_device, amp_dtype))
