"""Shared vocabulary of Stage 4: modalities, task specs, in-memory page features, task datasets.

Every other domain module speaks these types. No dagster import here (DESIGN §2).

Panel references
----------------
Task datasets never copy embeddings. A sample names panels of the page table it was generated
against: ``page_row`` is a row of that table (comics sorted by id, pages in reading order), and a
*flat panel ref* is ``page_row * max_panels + slot``.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
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
@dataclass(frozen=True)
class TaskSpec:
    name: str
    n_options: int  # K; 0 for reading_order (predicts a permutation)
    # The task can be generated when the store has ALL modalities of ANY one of these sets.
    needs: tuple[frozenset[str], ...]
    description: str

    @property
    def chance(self) -> float:
        """Chance accuracy of a uniform guess (reading order: exact-match of a random order is
        per-sample, so the dataset's own metadata carries it)."""
        return 1.0 / self.n_options if self.n_options else float("nan")

    def missing(self, available: set[str] | frozenset[str]) -> str | None:
        """None when generable from `available`, else the reason it must be skipped."""
        if any(alternative <= set(available) for alternative in self.needs):
            return None
        wanted = " or ".join("+".join(sorted(a)) for a in self.needs)
        have = ", ".join(sorted(available)) or "nothing"
        return f"needs {wanted}; the store has {have}"


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "sequence_filling", 5, (frozenset({"fused"}),),
            "A page with one panel replaced by a mask token; pick the missing panel of 5.",
        ),
        TaskSpec(
            "visual_closure", 5, (frozenset({"fused"}), frozenset({"visual"})),
            "The first s panels of a page (s varies per sample); pick panel s+1 of 5.",
        ),
        TaskSpec(
            "text_closure", 4, (frozenset({"visual", "text"}),),
            "The first s panels; panel s+1's visual is shown with its own text or the text of 3 other "
            "panels; pick the true text.",
        ),
        TaskSpec(
            "caption_relevance", 4, (frozenset({"caption", "fused"}),),
            "The caption of panel s alone; pick panel s+1 of 4.",
        ),
        TaskSpec(
            "character_coherence", 2, (frozenset({"visual", "text"}),),
            "The first s panels, then panel s+1 with at least two text boxes, in true or swapped box "
            "order; pick the true order.",
        ),
        TaskSpec(
            "text_cloze", 3, (frozenset({"visual", "text"}),),
            "Three panels (visual + text), then the next panel's visual; pick its text of 3 "
            "(easy: distractors from other comics, hard: from neighbouring pages).",
        ),
        TaskSpec(
            "reading_order", 0, (frozenset({"fused"}),),
            "A page's panels shuffled with no positional signal of the true order; recover it.",
        ),
    )
}
TASK_NAMES = tuple(TASKS)


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


# --- task datasets ----------------------------------------------------------------------------
@dataclass
class TaskDataset:
    """Index-based samples of one task for every split.

    ``comic_ids``/``page_numbers`` is the page table the samples index (row = page_row).
    ``splits[split]`` maps field name -> array with the sample axis first. Fields:

    option tasks (K = spec.n_options):
      page     int32 (N,)     context page row
      context  int16 (N, P)   slots of `page` fed to the encoder in order; PAD after the end;
                              MASK marks the position of the learned mask token
      options  int64 (N, K)   flat panel refs of the options
      label    int16 (N,)     index of the true option
    task-specific:
      text_closure, text_cloze: option_visual int64 (N,) flat ref of the panel whose *visual*
                              every option shows; `options` name the panels whose *text* is used
      text_cloze:             variant int8 (N,)  0 = easy, 1 = hard
      caption_relevance:      caption_of int64 (N,) flat ref whose caption is the only context
                              (`context` is all PAD)
      character_coherence:    box_order int16 (N, K, B) box permutation of the answer panel per
                              option (PAD after its boxes); options[:, k] are all that panel
    reading_order:
      page     int32 (N,)
      order    int16 (N, P)   order[i] = true slot of the panel shown at input position i; PAD
    """

    task: str
    comic_ids: np.ndarray  # (N_pages,) str
    page_numbers: np.ndarray  # (N_pages,) int32
    max_panels: int
    splits: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)  # seed, policy, K, chance, ...

    def fingerprint(self) -> str:
        """A short content hash of the samples, page table and attrs."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps([self.task, self.max_panels, self.attrs], sort_keys=True,
                                           default=str).encode())
        for array in (self.comic_ids, self.page_numbers):
            digest.update(np.ascontiguousarray(array).tobytes())
        for split in sorted(self.splits):
            for name in sorted(self.splits[split]):
                digest.update(f"{split}/{name}".encode())
                digest.update(np.ascontiguousarray(self.splits[split][name]).tobytes())
        return digest.hexdigest()[:16]

    def n_samples(self, split: str) -> int:
        fields = self.splits.get(split) or {}
        return int(next(iter(fields.values())).shape[0]) if fields else 0


def save_task_dataset(url: str, dataset: TaskDataset) -> None:
    """Write `dataset` as one .npz at `url` (path or fsspec URL), atomically."""
    import json

    arrays: dict[str, np.ndarray] = {
        "comic_ids": np.asarray(dataset.comic_ids, dtype=str),
        "page_numbers": np.asarray(dataset.page_numbers, dtype=np.int32),
        "meta": np.asarray(json.dumps({"task": dataset.task, "max_panels": dataset.max_panels,
                                       "attrs": dataset.attrs})),
    }
    for split, fields in dataset.splits.items():
        for name, array in fields.items():
            arrays[f"{split}__{name}"] = array
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    fileio.atomic_write_bytes(url, buffer.getvalue())


def load_task_dataset(url: str) -> TaskDataset:
    import json

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

