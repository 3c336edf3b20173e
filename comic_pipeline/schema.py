"""Shared vocabulary of Stage 4: modalities, task names, page features, typed samples, task datasets.

Every other domain module speaks these types. No dagster import here (DESIGN §2).

Panel references
----------------
Task datasets never copy embeddings. A sample names panels of the page table it was generated
against: ``page_row`` is a row of that table (comics sorted by id, pages in reading order), and a
*flat panel ref* is ``page_row * max_panels + slot``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from comic_pipeline import fileio

# --- modalities -------------------------------------------------------------------------------
# Name used in Stage 4 -> array name in the native Stage 3 store.
MODALITY_ARRAYS: dict[str, str] = {
    "fused": "panel_embeddings",
    "visual": "visual",
    "text": "text",
    "caption": "caption",
}
MODALITIES = tuple(MODALITY_ARRAYS)
SPLITS = ("train", "val", "test")

PAD = -1  # padding in slot / box / order arrays
MASK = -2  # in a context array: "a learned mask token stands at this position"


# --- tasks ------------------------------------------------------------------------------------
# The names of the seven tasks (asset keys use them). What each task IS -- what it needs, how its
# samples are drawn, how its options are scored -- is its spec in comic_pipeline.tasks.TASKS.
TASK_NAMES = ("sequence_filling", "visual_closure", "text_closure", "caption_relevance",
              "character_coherence", "text_cloze", "reading_order")


# --- in-memory page features -----------------------------------------------------------------
@dataclass
class PageFeatures:
    """Embeddings of a set of pages, one row each, padded slots zeroed.

    Rows follow the page table: comics in the order given, pages in reading order.
    """

    comic_ids: np.ndarray  # (N,) str   comic of each row
    page_numbers: np.ndarray  # (N,) int32 page index inside its comic
    page_ids: np.ndarray  # (N,) str   the store's page id
    panel_mask: np.ndarray  # (N, P) bool  valid panels (a prefix)
    fused: np.ndarray | None = None  # (N, P, D) float32
    visual: np.ndarray | None = None  # (N, P, D) float32
    text: np.ndarray | None = None  # (N, P, B, D) float32
    text_mask: np.ndarray | None = None  # (N, P, B) bool (a prefix per panel)
    caption: np.ndarray | None = None  # (N, P, D) float32

    @property
    def n_pages(self) -> int:
        return int(self.panel_mask.shape[0])

    @property
    def max_panels(self) -> int:
        return int(self.panel_mask.shape[1])

    @property
    def dim(self) -> int:
        for name in MODALITIES:
            array = getattr(self, name)
            if array is not None:
                return int(array.shape[-1])
        raise ValueError("PageFeatures holds no modality")

    @property
    def max_boxes(self) -> int:
        return 0 if self.text_mask is None else int(self.text_mask.shape[2])

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(name for name in MODALITIES if getattr(self, name) is not None)

    def only(self, modalities: Iterable[str]) -> "PageFeatures":
        """The same pages with only `modalities` (each must be held; text keeps its text_mask)."""
        wanted = frozenset(modalities)
        if not wanted <= self.modalities:
            raise ValueError(f"PageFeatures: modalities {sorted(wanted - self.modalities)} are not held "
                             f"(held: {sorted(self.modalities)})")
        dropped = {name: None for name in MODALITIES if name not in wanted}
        return dataclasses.replace(self, **dropped, **({"text_mask": None} if "text" in dropped else {}))

    def select(self, rows: np.ndarray) -> "PageFeatures":
        """The same features restricted to `rows` (a new page table)."""
        return PageFeatures(
            **{
                f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows])
                for f in dataclasses.fields(self)
            }
        )

    @staticmethod
    def concatenate(parts: list["PageFeatures"]) -> "PageFeatures":
        if not parts:
            raise ValueError("PageFeatures.concatenate needs at least one part")
        joined = {}
        for f in dataclasses.fields(PageFeatures):
            arrays = [getattr(p, f.name) for p in parts]
            if any(a is None for a in arrays):
                if not all(a is None for a in arrays):
                    raise ValueError(f"PageFeatures.concatenate: modality {f.name!r} present in "
                                     "some comics and missing in others")
                joined[f.name] = None
            else:
                joined[f.name] = np.concatenate(arrays, axis=0)
        return PageFeatures(**joined)


def join_pages(parts: Sequence[PageFeatures]) -> PageFeatures:
    """PageFeatures.concatenate of `parts` after bringing them to common modalities (those every
    part has) and one B (text boxes padded with invalid, zero boxes to the largest B)."""
    common = frozenset.intersection(*(part.modalities for part in parts))
    boxes = max((part.max_boxes for part in parts), default=0) if "text" in common else 0
    aligned = []
    for part in parts:
        changes = {m: None for m in part.modalities - common}
        if "text" in common and part.max_boxes < boxes:
            grow = ((0, 0), (0, 0), (0, boxes - part.max_boxes))
            changes["text_mask"] = np.pad(part.text_mask, grow)
            changes["text"] = np.pad(part.text, grow + ((0, 0),))
        elif "text" not in common:
            changes["text_mask"] = None
        aligned.append(part if not changes else dataclasses.replace(part, **changes))
    return aligned[0] if len(aligned) == 1 else PageFeatures.concatenate(aligned)


# --- samples --------------------------------------------------------------------------------
@dataclass
class Samples:
    """Index-based samples of one split, the sample axis first in every field. The arrays may be
    numpy (datasets) or torch tensors on a device (batching): `map` converts, `take` indexes."""

    page: np.ndarray  # (N,) int32 page row of the sample's page

    def fields(self) -> dict[str, np.ndarray]:
        """name -> array of every field present (the on-disk form)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        return int(self.page.shape[0])

    def take(self, index):
        """The samples at `index` (an index array or a boolean mask) in a container of this kind."""
        return type(self)(**{name: array[index] for name, array in self.fields().items()})

    def map(self, convert):
        return type(self)(**{name: convert(array) for name, array in self.fields().items()})

    @classmethod
    def concatenate(cls, parts: list["Samples"]) -> "Samples":
        names = parts[0].fields()
        return cls(**{name: np.concatenate([p.fields()[name] for p in parts]) for name in names})


@dataclass
class OptionSamples(Samples):
    """Samples of an option task: a context, K options, the index of the true one (K = n_options).

    Panels are flat refs (page_row * max_panels + slot)."""

    context: np.ndarray = None  # (N, P) int16 slots of `page` fed to the encoder in order; PAD
    #                             after the end; MASK where the learned mask token stands
    options: np.ndarray = None  # (N, K) int64 flat panel refs of the options
    label: np.ndarray = None  # (N,) int16 index of the true option
    # what some tasks add (see the task's spec in comic_pipeline.tasks):
    option_visual: np.ndarray | None = None  # (N,) int64 panel whose VISUAL every option shows
    #                                          (the options name the panels whose text is used)
    caption_of: np.ndarray | None = None  # (N,) int64 panel whose caption is the only context
    box_order: np.ndarray | None = None  # (N, K, B) int16 box permutation per option, PAD after
    variant: np.ndarray | None = None  # (N,) int8 code of the sample's variant (attrs["variants"])

    def __post_init__(self):
        for name in ("context", "options", "label"):
            if getattr(self, name) is None:
                raise ValueError(f"OptionSamples: field {name!r} is required")

    @property
    def n_options(self) -> int:
        return int(self.options.shape[1])


@dataclass
class OrderSamples(Samples):
    """Samples of an ordering task: a page shown in a shuffled order."""

    order: np.ndarray = None  # (N, P) int16 order[i] = true slot of the panel shown at input i; PAD

    def __post_init__(self):
        if self.order is None:
            raise ValueError("OrderSamples: field 'order' is required")


def samples_from_fields(fields: Mapping[str, np.ndarray]) -> Samples:
    """The typed container of a split from its named arrays (as a file stores them)."""
    kind = OrderSamples if "order" in fields else OptionSamples
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"{kind.__name__}: unknown fields {sorted(unknown)}; known {sorted(known)}")
    missing = {"page"} - set(fields)
    if missing:
        raise ValueError(f"{kind.__name__}: missing fields {sorted(missing)}")
    return kind(**dict(fields))


# --- task datasets ----------------------------------------------------------------------------
@dataclass
class TaskDataset:
    """Index-based samples of one task for every split.

    ``comic_ids``/``page_numbers`` is the page table the samples index (row = page_row).
    ``splits[split]`` is an OptionSamples or OrderSamples (a mapping of named arrays is accepted
    and converted).
    """

    task: str
    comic_ids: np.ndarray  # (N_pages,) str
    page_numbers: np.ndarray  # (N_pages,) int32
    max_panels: int
    splits: dict[str, Samples] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)  # seed, policy, K, chance, ...

    def __post_init__(self):
        self.splits = {split: samples if isinstance(samples, Samples) else samples_from_fields(samples)
                       for split, samples in self.splits.items()}

    def fingerprint(self) -> str:
        """A short content hash of the samples, page table and attrs."""
        digest = hashlib.sha256(json.dumps([self.task, self.max_panels, self.attrs], sort_keys=True,
                                           default=str).encode())
        for array in (self.comic_ids, self.page_numbers):
            digest.update(np.ascontiguousarray(array).tobytes())
        for split in sorted(self.splits):
            fields = self.splits[split].fields()
            for name in sorted(fields):
                digest.update(f"{split}/{name}".encode())
                digest.update(np.ascontiguousarray(fields[name]).tobytes())
        return digest.hexdigest()[:16]

    def n_samples(self, split: str) -> int:
        samples = self.splits.get(split)
        return len(samples) if samples is not None else 0

    @property
    def n_options(self) -> int:
        """K of this dataset (0 for an ordering task): its own, not the spec's default."""
        return int(self.attrs.get("n_options", 0))


def save_task_dataset(url: str, dataset: TaskDataset) -> None:
    """Write `dataset` as one .npz at `url` (path or fsspec URL), atomically."""
    arrays: dict[str, np.ndarray] = {
        "comic_ids": np.asarray(dataset.comic_ids, dtype=str),
        "page_numbers": np.asarray(dataset.page_numbers, dtype=np.int32),
        "meta": np.asarray(json.dumps({"task": dataset.task, "max_panels": dataset.max_panels,
                                       "attrs": dataset.attrs})),
    }
    for split, samples in dataset.splits.items():
        for name, array in samples.fields().items():
            arrays[f"{split}__{name}"] = array
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    fileio.atomic_write_bytes(url, buffer.getvalue())


def load_task_dataset(url: str) -> TaskDataset:
    with fileio.open_binary(url) as handle, np.load(handle, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
        splits: dict[str, dict[str, np.ndarray]] = {}
        for key in npz.files:
            if "__" in key:
                split, name = key.split("__", 1)
                splits.setdefault(split, {})[name] = npz[key]
        return TaskDataset(
            task=meta["task"],
            comic_ids=npz["comic_ids"],
            page_numbers=npz["page_numbers"],
            max_panels=int(meta["max_panels"]),
            splits=splits,
            attrs=meta["attrs"],
        )


def page_table_matches(dataset: TaskDataset, features: PageFeatures) -> bool:
    return bool(
        np.array_equal(dataset.comic_ids, features.comic_ids)
        and np.array_equal(dataset.page_numbers, features.page_numbers)
    )

