"""Host-side batch assembly: task samples + page features -> the model's typed batches.

The page features become flat panel tables in host memory ONCE (`feature_tables`); a batch is a set
of sample indices turned into model inputs by torch indexing only (`TaskBatches.batch`), gathered on
the host and then moved to the device (through pinned memory, without blocking, on CUDA), so device
memory holds a few batches however large the corpus. What a
batch holds for a task is read from the task's spec (comic_pipeline.tasks), never its name:

| spec                        | context sequence                                 | query     | options        |
|-----------------------------|--------------------------------------------------|-----------|----------------|
| query "mask"                | the page, the MASK token at the missing slot     | at MASK   | option_kind    |
| query "next"                | the context slots, then a query token            | after     | option_kind    |
| context_kind "caption"      | the caption of panel `caption_of` alone          | after     |                |
| query_shows_visual          | + the answer panel's VISUAL at the query token   |           |                |
| option_kind "panel"/"text"  |                                                  |           | fused (else visual) / text |
| option_kind "box_order"     |                                                  |           | visual + text, boxes in box_order |
| OrderingTask                | the page's panels shuffled, NO slot positions    | -         | a score per panel |

Shapes: B batch, L sequence positions (max_panels + 1, room for a query after a full context),
P panels of a page, K options, X text boxes of a panel, D input dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from comic_pipeline.schema import (
    MASK,
    MODALITIES,
    PAD,
    OptionSamples,
    OrderSamples,
    PageFeatures,
    Samples,
    TaskDataset,
    page_table_matches,
)
from comic_pipeline.tasks import TASK_NAMES, OptionTask, TaskSpec, spec_of

# what stands at a sequence position
KIND_PAD, KIND_PANEL, KIND_MASK, KIND_QUERY = 0, 1, 2, 3

PanelInputs = dict[str, torch.Tensor]  # modality -> (..., D) ("text" (..., X, D) + "text_mask"),
#                                        "has_<modality>" -> (...) bool: the modality counts there


@dataclass
class OptionBatch:
    task: str  # selects the query token and the head
    context: PanelInputs  # (B, L, ...)
    kind: torch.Tensor  # (B, L) KIND_* of each position
    positions: torch.Tensor  # (B, L) slot positions
    query_index: torch.Tensor  # (B,) the position whose output scores the options
    options: PanelInputs  # (B, K, ...)
    label: torch.Tensor  # (B,) index of the true option


@dataclass
class OrderBatch:
    task: str
    context: PanelInputs  # (B, P, ...) the page's panels in the shuffled order
    kind: torch.Tensor  # (B, P)
    order: torch.Tensor  # (B, P) true slot of the panel at each input position; PAD


@dataclass
class PageBatch:
    """Whole pages in reading order, for the strip objective (two panel-dropout views)."""

    inputs: PanelInputs  # (B, P, ...)
    panel_mask: torch.Tensor  # (B, P) bool
    keep_prob: float = 0.6
    temperature: float = 0.1


TaskBatch = OptionBatch | OrderBatch


# --- feature tables ------------------------------------------------------------------------------
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


def gather_panels(tables: Mapping[str, torch.Tensor], refs: torch.Tensor,
                  modalities: tuple[str, ...]) -> PanelInputs:
    """Panel inputs for flat panel refs (...) (negative = no panel) from feature tables.

    tables: modality -> (N * P, D) ("text" (N * P, X, D), "text_mask" (N * P, X)), rows indexed
    by flat panel ref = page_row * max_panels + slot.
    """
    present = refs >= 0
    index = refs.clamp_min(0)
    inputs: PanelInputs = {}
    for modality in modalities:
        if modality not in tables:
            raise ValueError(f"the feature tables have no {modality!r} modality")
        values = tables[modality][index]  # (..., D) or (..., X, D)
        keep = present.reshape(present.shape + (1,) * (values.dim() - present.dim()))
        inputs[modality] = values * keep.to(values.dtype)  # zero where there is no panel
        inputs[f"has_{modality}"] = present
    if "text" in modalities:
        inputs["text_mask"] = tables["text_mask"][index] & present[..., None]  # (..., X)
    return inputs


def _reorder_boxes(inputs: PanelInputs, box_order: torch.Tensor) -> None:
    """Show each panel's text boxes in `box_order` (..., X) (PAD after its boxes), in place."""
    index = box_order.clamp_min(0)  # (..., X)
    text = inputs["text"]  # (..., X, D)
    inputs["text"] = torch.gather(text, -2, index[..., None].expand(*index.shape, text.shape[-1]))
    inputs["text_mask"] = torch.gather(inputs["text_mask"], -1, index) & (box_order >= 0)


# --- task batches --------------------------------------------------------------------------------
def task_batch(spec: TaskSpec, samples: Samples, tables: Mapping[str, torch.Tensor],
               modalities: tuple[str, ...], max_panels: int) -> TaskBatch:
    """The model inputs of `samples` (a container of tensors) of the task `spec`."""
    P = max_panels
    page = samples.page.long()  # (B,)
    if isinstance(samples, OrderSamples):
        order = samples.order.long()  # (B, P) true slot shown at each input position
        refs = torch.where(order >= 0, page[:, None] * P + order, torch.full_like(order, -1))
        # no positions: the shuffled input carries no signal of the true order
        return OrderBatch(spec.name, gather_panels(tables, refs, modalities),
                          torch.where(order >= 0, KIND_PANEL, KIND_PAD), order)
    return _option_batch(spec, samples, tables, modalities, P)


def _option_batch(spec: OptionTask, samples: OptionSamples, tables, modalities, P: int) -> OptionBatch:
    B, device = samples.page.shape[0], samples.page.device
    page = samples.page.long()
    L = P + 1
    rows = torch.arange(B, device=device)
    positions = torch.arange(L, device=device).expand(B, L)
    if spec.context_kind == "caption":
        # the caption of one panel alone at position 0, the query at position 1
        refs = torch.full((B, L), -1, dtype=torch.long, device=device)
        refs[:, 0] = samples.caption_of.long()
        kind = torch.full((B, L), KIND_PAD, dtype=torch.long, device=device)
        kind[:, 0] = KIND_PANEL
        kind[:, 1] = KIND_QUERY
        query_index = torch.ones(B, dtype=torch.long, device=device)
        context = gather_panels(tables, refs, ("caption",))
    else:
        slots = F.pad(samples.context.long(), (0, 1), value=PAD)  # (B, L)
        refs = torch.where(slots >= 0, page[:, None] * P + slots, torch.full_like(slots, -1))
        kind = torch.where(slots >= 0, KIND_PANEL, torch.where(slots == MASK, KIND_MASK, KIND_PAD))
        if spec.query == "mask":
            query_index = (slots == MASK).long().argmax(1)  # the output at the mask token
        else:
            query_index = (slots != PAD).sum(1)  # the position right after the context
            kind[rows, query_index] = KIND_QUERY
        if spec.query_shows_visual:
            refs[rows, query_index] = samples.option_visual.long()
        context = gather_panels(tables, refs, modalities)
        if spec.query_shows_visual:
            # only the answer panel's visual stands at the query (fused/text would hold the answer;
            # a text-only store shows nothing there but the query token)
            not_query = kind != KIND_QUERY
            for modality in modalities:
                if modality != "visual":
                    context[f"has_{modality}"] = context[f"has_{modality}"] & not_query
    options = gather_panels(tables, samples.options.long(), spec.option_modalities(modalities))  # (B, K, ...)
    if spec.option_kind == "box_order":  # the same panel, its boxes in each option's order
        _reorder_boxes(options, samples.box_order.long())
    return OptionBatch(spec.name, context, kind, positions, query_index, options, samples.label.long())


# --- datasets on the device ----------------------------------------------------------------------
def check_dataset(task: str, dataset: TaskDataset, features: PageFeatures) -> None:
    """Clear errors for a dataset that does not fit the features (once, vectorized)."""
    spec = spec_of(task)
    if dataset.task != task:
        raise ValueError(f"dataset given as {task!r} holds task {dataset.task!r}")
    if not page_table_matches(dataset, features):
        raise ValueError(f"task {task!r}: its page table ({len(dataset.comic_ids)} pages) is not the "
                         f"page table of the features ({features.n_pages} pages)")
    if dataset.max_panels != features.max_panels:
        raise ValueError(f"task {task!r}: max_panels {dataset.max_panels} but the features have "
                         f"{features.max_panels}")
    missing = spec.missing(features.modalities)
    if missing:
        raise ValueError(f"task {task!r} cannot be trained: it {missing}")
    valid_refs = features.panel_mask.reshape(-1)
    n_refs = valid_refs.shape[0]
    for split, samples in dataset.splits.items():
        where = f"task {task!r}, split {split!r}"
        if len(samples) == 0:
            continue
        fields = samples.fields()
        absent = spec.required_fields() - set(fields)
        if absent:
            raise ValueError(f"{where}: missing fields {sorted(absent)}")
        if samples.page.min() < 0 or samples.page.max() >= features.n_pages:
            raise ValueError(f"{where}: page rows outside 0..{features.n_pages - 1}")
        for name in ("options", "option_visual", "caption_of"):
            if name in fields:
                refs = fields[name]
                if refs.min() < 0 or refs.max() >= n_refs or not valid_refs[refs].all():
                    raise ValueError(f"{where}: field {name!r} names panels that do not exist")
        if not isinstance(samples, OptionSamples):
            continue
        if samples.options.ndim != 2 or samples.options.shape[1] < 2:
            raise ValueError(f"{where}: options have shape {samples.options.shape}, expected (N, K >= 2)")
        K = samples.options.shape[1]
        if samples.label.min() < 0 or samples.label.max() >= K:
            raise ValueError(f"{where}: labels outside 0..{K - 1}")
        n_masks = (samples.context == MASK).sum(1)
        if spec.query == "mask" and not (n_masks == 1).all():
            raise ValueError(f"{where}: every context needs exactly one MASK")
        if spec.query != "mask" and n_masks.any():
            raise ValueError(f"{where}: MASK in a context of a task that asks after the context")


def to_device(value, device: torch.device):
    """A batch (dataclass, dict or tensor) with every tensor on `device`. Host tensors bound for
    CUDA are pinned first so the copy runs asynchronously (non_blocking) beside compute."""
    if device.type == "cpu":
        return value
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu" and device.type == "cuda":
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value)})
    return value


class TaskBatches:
    """Task datasets + page features in host memory; sample indices -> model batches on `device`.

    The features become flat panel tables once and every split's samples tensors once, both on
    the host; `batch(task, split, indices)` is torch indexing there, and only the batch moves to
    `device` (so device memory does not grow with the corpus).
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
        unknown = set(datasets) - set(TASK_NAMES)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {', '.join(TASK_NAMES)}")
        for task, dataset in datasets.items():
            check_dataset(task, dataset, features)
        self.tasks = tuple(t for t in TASK_NAMES if t in datasets)
        host = torch.device("cpu")
        self.tables = feature_tables(features, host)
        self.samples_of: dict[str, dict[str, Samples]] = {
            task: {split: samples.map(lambda a: torch.as_tensor(np.ascontiguousarray(a), device=host))
                   for split, samples in datasets[task].splits.items()}
            for task in self.tasks
        }

    def n_samples(self, task: str, split: str) -> int:
        samples = self.samples_of.get(task, {}).get(split)
        return len(samples) if samples is not None else 0

    def samples(self, task: str, split: str, indices) -> Samples:
        """Samples `indices` of `task` in `split` (host tensors)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.samples_of[task][split].take(index)

    def batch(self, task: str, split: str, indices) -> TaskBatch:
        """Model inputs of samples `indices` (B,) of `task` in `split`, on the device."""
        return to_device(task_batch(spec_of(task), self.samples(task, split, indices), self.tables,
                                    self.modalities, self.max_panels), self.device)

    def page_rows(self, split: str) -> np.ndarray:
        """Sorted page rows used by any task's `split` (the comics of that split)."""
        rows = [by_split[split].page.cpu().numpy() for by_split in self.samples_of.values() if split in by_split]
        return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)

    def pages(self, rows, *, keep_prob: float = 0.6, temperature: float = 0.1) -> PageBatch:
        """Whole pages (B,) rows -> a PageBatch (inputs (B, P, ...), panel_mask (B, P))."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        slots = torch.arange(self.max_panels)
        refs = rows[:, None] * self.max_panels + slots  # (B, P)
        panel_mask = self.tables["panel_mask"][rows]  # (B, P)
        inputs = gather_panels(self.tables, torch.where(panel_mask, refs, -1), self.modalities)
        return to_device(PageBatch(inputs, panel_mask, keep_prob, temperature), self.device)
