"""The task specs (DESIGN §4) and the generation of task datasets (book-level splits: splits.py).

A task is a value that carries its behaviour: its spec says what it needs from the store, how its
samples are drawn (`draw`), what its options are and how the model asks for them. Two families
cover all seven: `OptionTask` (a context and K options scored against one query output) and
`OrderingTask` (recover a shuffled page's order). The generic code (here, in batching, shortcuts,
evaluation) reads the spec, never the task's name: a new option task is one new spec in `TASKS`.

Samples are indices into the page table of the features they were drawn from (schema.TaskDataset),
never copies of embeddings. Generation is vectorised: positions are drawn for all pages at once and
distractors are chosen per comic with one candidate matrix (comic_pipeline.sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np

from comic_pipeline import sampling, schema
from comic_pipeline.sampling import (
    Draw,
    OptionSpace,
    PageTable,
    context_until,
    draw_positions,
    last_before,
    masked_mean_unit,
    option_samples,
    expected_accuracy,
    unit,
)
from comic_pipeline.schema import MASK, PAD, SPLITS, OptionSamples, OrderSamples, PageFeatures, TaskDataset

DEFAULT_SAMPLES_PER_PAGE = 4
CLOZE_CONTEXT = 3  # text_cloze: panels of context before the answer panel


# --- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskConfig:
    seed: int = 0
    # Samples drawn from each page (distinct positions, at most the page's eligible positions);
    # an int for every task or {task: int}.
    samples_per_page: int | Mapping[str, int] = DEFAULT_SAMPLES_PER_PAGE
    # K for the tasks with distractors (None: the task's own); an int or {task: int}.
    n_options: int | Mapping[str, int] | None = None
    distractors: str = "hard"  # "hard" (same comic, other pages) | "easy" (other comics)
    match_similarity: bool = True  # False: distractors uniform among the eligible (prototype-like)
    hard_page_window: int = 3  # text_cloze hard: distractor pages at most this far away
    easy_pool_size: int = 4096  # easy: candidates drawn from other comics, per comic
    # distractors from the answer's own slot (on other pages / comics), so that an option's page
    # position never tells the answer (DESIGN §4); False: any slot (the old sampling, for audits)
    slot_matched: bool = True

    def __post_init__(self) -> None:
        if self.distractors not in ("hard", "easy"):
            raise ValueError(f"TaskConfig.distractors={self.distractors!r}: expected 'hard' or 'easy'")
        if self.hard_page_window < 1:
            raise ValueError(f"TaskConfig.hard_page_window={self.hard_page_window} must be >= 1")
        if self.easy_pool_size < 1:
            raise ValueError(f"TaskConfig.easy_pool_size={self.easy_pool_size} must be >= 1")
        for name in ("samples_per_page", "n_options"):
            value = getattr(self, name)
            values = value.items() if isinstance(value, Mapping) else [("every task", value)]
            for task, v in values:
                if isinstance(value, Mapping) and task not in TASKS:
                    raise ValueError(f"TaskConfig.{name}: unknown task {task!r}")
                if v is None and name == "n_options":
                    continue
                minimum = 1 if name == "samples_per_page" else 2
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                    raise ValueError(f"TaskConfig.{name} for {task}: {v!r} must be an integer >= {minimum}")

    def samples_for(self, task: str) -> int:
        value = self.samples_per_page
        return int(value.get(task, DEFAULT_SAMPLES_PER_PAGE) if isinstance(value, Mapping) else value)

    def options_for(self, task: str) -> int:
        spec = TASKS[task]
        if spec.family != "option":
            return 0
        if spec.fixed_options:
            return spec.n_options
        value = self.n_options
        if isinstance(value, Mapping):
            value = value.get(task)
        return int(value) if value is not None else TASKS[task].n_options


# --- the two families of tasks ----------------------------------------------------------------
@dataclass(frozen=True)
class OptionTask:
    """A context and K options, scored against the model's output at one query position."""

    name: str
    description: str
    n_options: int  # K by default (TaskConfig.n_options may change it unless fixed_options)
    # The task can be generated when the store has ALL modalities of ANY one of these sets.
    needs: tuple[frozenset[str], ...]
    # (table, rng, samples per page, the modality panel options live in) -> drawn positions,
    # context and the similarity references distractors are matched on
    draw: Callable[[PageTable, np.random.Generator, int, str], Draw]
    # what an option is: "panel" (a panel, encoded from fused, else visual) | "text" (a panel's
    # text boxes) | "box_order" (ONE panel, its boxes in K orders: the true one and swaps)
    option_kind: Literal["panel", "text", "box_order"] = "panel"
    # where the model answers: "next" (a query token right after the context) | "mask" (the
    # learned mask token standing in the context at the missing panel)
    query: Literal["next", "mask"] = "next"
    # the context: "slots" (panels of the sample's page) | "caption" (only the caption of the panel
    # `caption_of`)
    context_kind: Literal["slots", "caption"] = "slots"
    # the answer panel's VISUAL (only: its fused/text would hold the answer) stands at the query
    query_shows_visual: bool = False
    # distractor policies generated as variants, each gated on its own (() = TaskConfig.distractors)
    variants: tuple[str, ...] = ()
    hard_page_window: bool = False  # "hard" distractors at most TaskConfig.hard_page_window pages away
    fixed_options: bool = False  # K is the task's own, not configurable

    family = "option"

    def chance(self, n_options: int | None = None) -> float:
        """Accuracy of a uniform guess among `n_options` (default: the spec's K)."""
        return 1.0 / (n_options or self.n_options)

    def missing(self, available) -> str | None:
        """None when generable from `available` modalities, else the reason it must be skipped."""
        return _missing(self.needs, available)

    def option_modalities(self, available) -> tuple[str, ...]:
        """The modalities an option is encoded from, given the model's / store's modalities."""
        available = set(available)
        if self.option_kind == "text":
            return ("text",)
        if self.option_kind == "box_order":
            return tuple(m for m in ("visual", "text") if m in available)
        return ("fused",) if "fused" in available else ("visual",)

    def option_modality(self, available) -> str:
        """The modality distractors are matched and audited in."""
        return "text" if self.option_kind in ("text", "box_order") else self.option_modalities(available)[0]

    def asked_slot(self, samples: OptionSamples, max_panels: int) -> np.ndarray:
        """(N,) the page slot the model is asked about (what it sees of the answer's position)."""
        if self.context_kind == "caption":
            return samples.caption_of % max_panels + 1
        if self.query == "mask":
            return np.argmax(samples.context == MASK, axis=1)
        return samples.context.max(axis=1).astype(np.int64) + 1  # right after the last context slot

    def required_fields(self) -> set[str]:
        fields = {"page", "context", "options", "label"}
        if self.query_shows_visual:
            fields.add("option_visual")
        if self.context_kind == "caption":
            fields.add("caption_of")
        if self.option_kind == "box_order":
            fields.add("box_order")
        if self.variants:
            fields.add("variant")
        return fields


@dataclass(frozen=True)
class OrderingTask:
    """A page's panels shown shuffled, with no positional signal of the true order; recover it."""

    name: str
    description: str
    needs: tuple[frozenset[str], ...]
    draw: Callable[[PageTable, np.random.Generator, int], OrderSamples]
    variants: tuple[str, ...] = ()

    family = "order"
    n_options = 0

    def chance(self, n_options: int | None = None) -> float:
        """Pairwise accuracy of a random order (the gated figure; exact match: dataset attrs)."""
        return 0.5

    def missing(self, available) -> str | None:
        return _missing(self.needs, available)

    def required_fields(self) -> set[str]:
        return {"page", "order"}


TaskSpec = OptionTask | OrderingTask


def _missing(needs: tuple[frozenset[str], ...], available) -> str | None:
    if any(alternative <= set(available) for alternative in needs):
        return None
    wanted = " or ".join("+".join(sorted(a)) for a in needs)
    have = ", ".join(sorted(available)) or "nothing"
    return f"needs {wanted}; the store has {have}"


class TaskSkipped(Exception):
    """The task cannot be generated from these features; `reason` says why."""

    def __init__(self, task: str, reason: str):
        super().__init__(f"{task}: {reason}")
        self.task = task
        self.reason = reason


# --- how each task draws its samples ------------------------------------------------------------
def _draw_sequence_filling(table: PageTable, rng, per_page: int, modality: str) -> Draw:
    rows, answer = draw_positions(rng, table.mask & (table.n_panels >= 2)[:, None], per_page)
    n_panels = table.n_panels[rows]
    valid = table.slots[None, :] < n_panels[:, None]  # (n, P)
    context = np.where(valid, table.slots[None, :], PAD).astype(np.int16)
    context[np.arange(rows.size), answer] = MASK
    context_slots = valid & (table.slots[None, :] != answer[:, None])
    vectors = table.panel_vectors(modality)
    previous = np.where(answer > 0, answer - 1, answer + 1)  # a neighbour always exists (n >= 2)
    following = np.where(answer < n_panels - 1, answer + 1, answer - 1)
    refs = np.stack([masked_mean_unit(vectors, rows, context_slots), vectors[rows, previous],
                     vectors[rows, following]], axis=1)  # (n, 3, D)
    return Draw(rows, answer, context, context_slots, refs, {})


def _draw_closure(table: PageTable, rng, per_page: int, modality: str) -> Draw:
    rows, answer = draw_positions(rng, table.mask & (table.slots[None, :] >= 1), per_page)
    context, context_slots = context_until(table, rows, answer)
    vectors = table.panel_vectors(modality)
    refs = np.stack([masked_mean_unit(vectors, rows, context_slots), vectors[rows, answer - 1]], axis=1)
    return Draw(rows, answer, context, context_slots, refs, {})


def _draw_caption_relevance(table: PageTable, rng, per_page: int, modality: str) -> Draw:
    rows, answer = draw_positions(rng, table.mask & (table.slots[None, :] >= 1), per_page)
    described = answer - 1  # the panel whose caption is the whole context
    context = np.full((rows.size, table.P), PAD, dtype=np.int16)
    context_slots = table.slots[None, :] == described[:, None]
    refs = np.stack([table.panel_vectors("caption")[rows, described],
                     table.panel_vectors(modality)[rows, described]], axis=1)  # (n, 2, D)
    caption_of = (rows * table.P + described).astype(np.int64)
    return Draw(rows, answer, context, context_slots, refs, {"caption_of": caption_of})


def _text_refs(table: PageTable, rows: np.ndarray, answer: np.ndarray, first: np.ndarray) -> np.ndarray:
    """(n, 2, D): unit mean of all context text boxes, and the text of the last context panel
    that has text (zero when the context is silent). Context = slots first..answer-1."""
    window = (table.slots[None, :] >= first[:, None]) & (table.slots[None, :] < answer[:, None])
    sums = table.text_sums()
    mean = unit(np.einsum("np,npd->nd", window.astype(np.float32), sums[rows]))
    last = last_before(table.n_boxes > 0, rows, answer, first)
    last_text = np.where((last >= 0)[:, None], table.text_vectors()[rows, np.maximum(last, 0)], 0.0)
    return np.stack([mean, last_text.astype(np.float32)], axis=1)


def _draw_text_closure(table: PageTable, rng, per_page: int, modality: str) -> Draw:
    has_text = table.n_boxes > 0
    rows, answer = draw_positions(rng, has_text & (table.slots[None, :] >= 1), per_page)
    context, context_slots = context_until(table, rows, answer)
    refs = _text_refs(table, rows, answer, np.zeros_like(answer))
    return Draw(rows, answer, context, context_slots, refs,
                {"option_visual": (rows * table.P + answer).astype(np.int64)})


def _draw_text_cloze(table: PageTable, rng, per_page: int, modality: str) -> Draw:
    has_text = table.n_boxes > 0
    rows, answer = draw_positions(rng, has_text & (table.slots[None, :] >= CLOZE_CONTEXT), per_page)
    first = answer - CLOZE_CONTEXT
    positions = np.arange(table.P)[None, :]
    context = np.where(positions < CLOZE_CONTEXT, first[:, None] + positions, PAD).astype(np.int16)
    context_slots = (table.slots[None, :] >= first[:, None]) & (table.slots[None, :] < answer[:, None])
    refs = _text_refs(table, rows, answer, first)
    return Draw(rows, answer, context, context_slots, refs,
                {"option_visual": (rows * table.P + answer).astype(np.int64)})


def _draw_character_coherence(table: PageTable, rng, per_page: int, modality: str) -> Draw:
    text = np.asarray(table.features.text)
    # the two first boxes must differ, or the swapped order would look the same as the true one
    if text.shape[2] < 2:
        distinct = np.zeros_like(table.mask)
    else:
        distinct = (text[:, :, 0] != text[:, :, 1]).any(axis=-1)  # (N, P)
    eligible = table.mask & (table.slots[None, :] >= 1) & (table.n_boxes >= 2) & distinct
    rows, answer = draw_positions(rng, eligible, per_page)
    context, context_slots = context_until(table, rows, answer)
    return Draw(rows, answer, context, context_slots, np.zeros((rows.size, 0, 0), np.float32), {})


def _draw_reading_order(table: PageTable, rng, per_page: int) -> OrderSamples:
    pages = np.flatnonzero(table.n_panels >= 2)
    rows = np.repeat(pages, per_page)
    valid = table.mask[rows]  # (n, P)
    keys = np.where(valid, rng.random(valid.shape), np.inf)  # padded slots sort last
    shown = np.argsort(keys, axis=1)  # (n, P) a uniform random permutation of the valid slots
    order = np.where(valid, shown, PAD).astype(np.int16)  # valid is a prefix, so PAD follows
    return OrderSamples(page=rows.astype(np.int32), order=order)


# --- the seven tasks ------------------------------------------------------------------------------
_TEXT = (frozenset({"text"}),)  # text, plus the visual when the store has it (the text-only form)
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        OptionTask(
            "sequence_filling", "A page with one panel replaced by a mask token; pick the missing "
            "panel of 5.", 5, (frozenset({"fused"}),), _draw_sequence_filling, query="mask",
        ),
        OptionTask(
            "visual_closure", "The first s panels of a page (s varies per sample); pick panel s+1 "
            "of 5.", 5, (frozenset({"fused"}), frozenset({"visual"})), _draw_closure,
        ),
        OptionTask(
            "text_closure", "The first s panels; panel s+1's visual (when the store has one) is "
            "shown with its own text or the text of 3 other panels; pick the true text.", 4, _TEXT,
            _draw_text_closure, option_kind="text", query_shows_visual=True,
        ),
        OptionTask(
            "caption_relevance", "The caption of panel s alone; pick panel s+1 of 4.", 4,
            (frozenset({"caption", "fused"}),), _draw_caption_relevance, context_kind="caption",
        ),
        OptionTask(
            "character_coherence", "The first s panels, then panel s+1 with at least two text "
            "boxes, in true or swapped box order; pick the true order.", 2, _TEXT,
            _draw_character_coherence, option_kind="box_order", fixed_options=True,
        ),
        OptionTask(
            "text_cloze", "Three panels, then the next panel's visual (when the store has one); "
            "pick its text of 3 (easy: distractors from other comics, hard: from neighbouring "
            "pages).", 3, _TEXT, _draw_text_cloze, option_kind="text", query_shows_visual=True,
            variants=("easy", "hard"), hard_page_window=True,
        ),
        OrderingTask(
            "reading_order", "A page's panels shuffled with no positional signal of the true "
            "order; recover it.", (frozenset({"fused"}),), _draw_reading_order,
        ),
    )
}
TASK_NAMES = tuple(TASKS)
assert TASK_NAMES == schema.TASK_NAMES, "tasks.TASKS and schema.TASK_NAMES must name the same tasks"
OPTION_TASKS = tuple(name for name, spec in TASKS.items() if spec.family == "option")


def spec_of(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {list(TASK_NAMES)}")
    return TASKS[task]


# --- entry point --------------------------------------------------------------------------------
def generate_task(task: str, features: PageFeatures, split_of_comic: Mapping[str, str],
                  config: TaskConfig = TaskConfig()) -> TaskDataset:
    """Samples of `task` over every page of `features`, grouped by the split of their comic.

    Raises TaskSkipped when the features lack the task's modality, ValueError on bad input.
    """
    spec = spec_of(task)
    reason = spec.missing(features.modalities)
    if reason is not None:
        raise TaskSkipped(task, reason)
    if "text" in features.modalities and features.text_mask is None and any("text" in n for n in spec.needs):
        raise TaskSkipped(task, "the store has text but no text_mask")
    table = PageTable(features, split_of_comic)
    rng = np.random.default_rng([config.seed, TASK_NAMES.index(task)])
    per_page = config.samples_for(task)
    attrs: dict[str, object] = {"task": task, "seed": int(config.seed), "samples_per_page": per_page}
    if spec.family == "order":
        samples = spec.draw(table, rng, per_page)
        n_valid = (samples.order != PAD).sum(axis=1)
        inverse_factorial = np.array([1.0 / math.factorial(k) for k in range(table.P + 1)])
        exact_chance = float(inverse_factorial[n_valid].mean()) if n_valid.size else float("nan")
        attrs.update(n_options=0, distractor_policy="none", option_modality="fused",
                     chance=exact_chance, chance_pairwise=0.5)
    else:
        samples, option_attrs = _option_task_samples(spec, table, rng, per_page, config)
        attrs.update(option_attrs)

    sample_split = table.split[samples.page]
    splits = {split: samples.take(sample_split == code).map(np.ascontiguousarray)
              for code, split in enumerate(SPLITS)}
    attrs["samples"] = {split: int((sample_split == code).sum()) for code, split in enumerate(SPLITS)}
    attrs["pages"] = {split: int(np.unique(samples.page[sample_split == code]).size)
                      for code, split in enumerate(SPLITS)}
    dataset = TaskDataset(task=task, comic_ids=np.asarray(features.comic_ids),
                          page_numbers=np.asarray(features.page_numbers, dtype=np.int32),
                          max_panels=table.P, splits=splits, attrs=attrs)
    if spec.family == "option":
        dataset.attrs["slot_oracle_accuracy"] = slot_oracle_accuracy(dataset, "test")
    return dataset


def slot_oracle_scores(dataset: TaskDataset, split: str) -> np.ndarray:
    """(N, K) the slot oracle's rating of each option on `split` (fit on train; see
    sampling.slot_oracle_scores)."""
    spec = spec_of(dataset.task)
    if spec.family != "option":
        raise ValueError(f"{dataset.task}: the slot oracle is for option tasks")
    P = dataset.max_panels
    samples = dataset.splits.get(split)
    if samples is None or len(samples) == 0:
        return np.zeros((0, dataset.n_options or spec.n_options))
    train = dataset.splits.get("train")
    if train is None or len(train) == 0:
        train = samples
    return sampling.slot_oracle_scores(spec.asked_slot(train, P), train.options % P,
                                       train.label.astype(np.int64), spec.asked_slot(samples, P),
                                       samples.options % P)


def slot_oracle_accuracy(dataset: TaskDataset, split: str = "test") -> float:
    """Accuracy of the slot oracle on `split`, ties broken uniformly in expectation (nan without
    samples): at chance when an option's page position does not tell the answer."""
    if dataset.n_samples(split) == 0:
        return float("nan")
    return round(expected_accuracy(slot_oracle_scores(dataset, split), dataset.splits[split].label), 4)


def _option_space(spec: OptionTask, table: PageTable) -> OptionSpace:
    modality = spec.option_modality(table.features.modalities)
    if modality == "text":
        return OptionSpace(table.n_boxes > 0, table.text_vectors(), table.text_content())
    return OptionSpace(table.mask, table.panel_vectors(modality), table.panel_content(modality))


def _swapped_box_orders(table: PageTable, rng, draw: Draw, n_options: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """box_order options: the answer panel K times, its boxes in the true order or with the first
    two swapped. Returns options (n, K), label (n,), box_order (n, K, B)."""
    B = table.text_mask.shape[2]
    boxes = np.arange(B)[None, :]
    true_order = np.where(boxes < table.n_boxes[draw.rows, draw.answer][:, None], boxes, PAD)  # (n, B)
    swapped = true_order.copy()
    swapped[:, [0, 1]] = true_order[:, [1, 0]]
    label = rng.integers(n_options, size=draw.rows.size)
    box_order = np.where((label[:, None, None] == np.arange(n_options)[None, :, None]),
                         true_order[:, None, :], swapped[:, None, :]).astype(np.int16)  # (n, K, B)
    answer_ref = (draw.rows * table.P + draw.answer).astype(np.int64)
    return np.repeat(answer_ref[:, None], n_options, axis=1), label.astype(np.int16), box_order


def _option_task_samples(spec: OptionTask, table: PageTable, rng: np.random.Generator, per_page: int,
                         config: TaskConfig) -> tuple[OptionSamples, dict[str, object]]:
    n_options = config.options_for(spec.name)
    modality = spec.option_modality(table.features.modalities)
    panel_modality = "fused" if "fused" in table.features.modalities else "visual"
    attrs: dict[str, object] = {"n_options": n_options, "chance": spec.chance(n_options),
                                "option_modality": modality}
    if spec.option_kind == "box_order":
        draw = spec.draw(table, rng, per_page, panel_modality)
        options, label, box_order = _swapped_box_orders(table, rng, draw, n_options)
        samples = OptionSamples(page=draw.rows.astype(np.int32), context=draw.context, options=options,
                                label=label, box_order=box_order)
        attrs.update(distractor_policy="swap", swapped_boxes=[0, 1])
        return samples, attrs

    space = _option_space(spec, table)
    policies = spec.variants or (config.distractors,)
    parts, skipped, duplicates = [], 0, 0
    for code, policy in enumerate(policies):
        draw = spec.draw(table, rng, per_page, modality if modality != "text" else panel_modality)
        window = config.hard_page_window if (spec.hard_page_window and policy == "hard") else None
        options, label, ok, duplicate = option_samples(
            table, rng, draw, space, n_options, policy, config.match_similarity,
            easy_pool_size=config.easy_pool_size, page_window=window, same_slot=config.slot_matched)
        part = OptionSamples(page=draw.rows.astype(np.int32), context=draw.context, options=options,
                             label=label, **draw.extra)
        if spec.variants:
            part.variant = np.full(len(part), code, dtype=np.int8)
        parts.append(part.take(ok))
        skipped += int((~ok & ~duplicate).sum())
        duplicates += int(duplicate.sum())
    samples = parts[0] if len(parts) == 1 else OptionSamples.concatenate(parts)
    if len(parts) > 1:
        samples = samples.take(np.argsort(samples.page, kind="stable"))  # page order, variants in turn
    attrs.update(distractor_policy="+".join(policies), similarity_matched=config.match_similarity,
                 slot_matched=config.slot_matched, skipped_without_distractors=skipped,
                 dropped_answer_in_context=duplicates)
    if spec.variants:
        attrs["variants"] = {name: code for code, name in enumerate(spec.variants)}
    if any(spec.hard_page_window and p == "hard" for p in policies):
        attrs["hard_page_window"] = config.hard_page_window
    if any(p != "hard" for p in policies):
        attrs["easy_pool_size"] = config.easy_pool_size
    return samples, attrs
