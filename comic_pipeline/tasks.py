"""Book-level splits and the seven sequence-task generators (DESIGN §4).

Samples are indices into the page table of the features they were drawn from (schema.TaskDataset),
never copies of embeddings. Generation is vectorised: positions are drawn for all pages at once and
distractors are chosen per comic with one candidate matrix.

Distractors
-----------
Hard distractors come from other pages of the same comic, easy ones from other comics of the same
split (never from another split). Among the eligible candidates the generator prefers those whose
cosine similarity to the context (its mean, and the panels next to the answer) is closest to the
answer's own, and it places the answer at a uniformly random rank on one of those similarities:
so "pick the option most / least like the context" is at chance by construction, on any corpus,
and what is left to tell the answer apart is how panels follow each other. Candidates are
de-duplicated by content and never equal (by reference or content) the answer or a context panel.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from comic_pipeline.schema import MASK, PAD, SPLITS, TASK_NAMES, TASKS, PageFeatures, TaskDataset

DEFAULT_SAMPLES_PER_PAGE = 4
CLOZE_CONTEXT = 3  # text_cloze: panels of context before the answer panel
CHARACTER_COHERENCE_OPTIONS = 2  # true vs swapped box order
DISTRACTOR_TASKS = ("sequence_filling", "visual_closure", "text_closure", "caption_relevance",
                    "text_cloze")


# --- splits -----------------------------------------------------------------------------------
def assign_splits(comic_ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  salt: str = "comic-splits-v1") -> dict[str, str]:
    """comic id -> "train" | "val" | "test" by a stable hash of the id alone.

    A comic keeps its split whenever it arrives, whichever other comics exist.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions {fractions} must be {len(SPLITS)} non-negative numbers "
                         f"({', '.join(SPLITS)}) with a positive sum")
    bounds = np.cumsum(fractions) / sum(fractions)  # (3,) upper bound of each split in [0, 1)
    splits = {}
    for comic_id in comic_ids:
        if not isinstance(comic_id, str) or not comic_id:
            raise ValueError(f"comic id {comic_id!r} must be a non-empty string")
        digest = hashlib.sha256(f"{salt}\x00{comic_id}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
        splits[comic_id] = SPLITS[min(int(np.searchsorted(bounds, unit, side="right")), len(SPLITS) - 1)]
    return splits


# --- configuration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskConfig:
    seed: int = 0
    # Samples drawn from each page (distinct positions, at most the page's eligible positions);
    # an int for every task or {task: int}.
    samples_per_page: int | Mapping[str, int] = DEFAULT_SAMPLES_PER_PAGE
    # K for the tasks with distractors (None: schema.TASKS); an int or {task: int}.
    n_options: int | Mapping[str, int] | None = None
    distractors: str = "hard"  # "hard" (same comic, other pages) | "easy" (other comics)
    match_similarity: bool = True  # False: distractors uniform among the eligible (prototype-like)
    hard_page_window: int = 3  # text_cloze hard: distractor pages at most this far away
    easy_pool_size: int = 1024  # easy: candidates drawn from other comics, per comic

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
        if task == "character_coherence":
            return CHARACTER_COHERENCE_OPTIONS
        value = self.n_options
        if isinstance(value, Mapping):
            value = value.get(task)
        return int(value) if value is not None else TASKS[task].n_options


class TaskSkipped(Exception):
    """The task cannot be generated from these features; `reason` says why."""

    def __init__(self, task: str, reason: str):
        super().__init__(f"{task}: {reason}")
        self.task = task
        self.reason = reason


# --- the page table, prepared once per call ----------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _content_ids(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(N, P) id per panel such that equal ids <=> byte-equal content; -1 where not valid.

    values: (N, P, ...) float; exact equality, no hashing collisions (np.unique on raw rows).
    """
    N, P = valid.shape
    rows = np.ascontiguousarray(values.reshape(N * P, -1)[valid.ravel()] + 0.0)  # -0.0 -> 0.0
    ids = np.full(N * P, -1, dtype=np.int64)
    if rows.shape[0]:
        keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
        _, inverse = np.unique(keys, return_inverse=True)
        ids[valid.ravel()] = inverse.ravel()
    return ids.reshape(N, P)


class _Table:
    """Per-page facts every task needs: comic and split codes, panel counts, vectors, contents."""

    def __init__(self, features: PageFeatures, split_of_comic: Mapping[str, str]):
        comic_ids = np.asarray(features.comic_ids).astype(str)
        missing = sorted(set(comic_ids) - set(split_of_comic))
        if missing:
            raise ValueError(f"comics {missing[:10]} have no split in split_of_comic "
                             f"({len(missing)} missing)")
        bad = sorted({split_of_comic[c] for c in set(comic_ids)} - set(SPLITS))
        if bad:
            raise ValueError(f"split_of_comic holds unknown splits {bad}; expected {list(SPLITS)}")
        mask = np.asarray(features.panel_mask, dtype=bool)
        self.n_panels = mask.sum(axis=1).astype(np.int64)  # (N,)
        if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] < self.n_panels[:, None]):
            bad_rows = np.flatnonzero((mask != (np.arange(mask.shape[1]) < self.n_panels[:, None])).any(1))
            raise ValueError(f"panel_mask is not a prefix on pages {bad_rows[:10].tolist()} "
                             f"(comic {comic_ids[bad_rows[0]]!r})")
        self.features = features
        self.mask = mask  # (N, P)
        self.N, self.P = mask.shape
        self.slots = np.arange(self.P)
        uniques, self.comic = np.unique(comic_ids, return_inverse=True)  # (N,) comic code
        self.comic_names = uniques
        self.split = np.asarray([SPLITS.index(split_of_comic[c]) for c in uniques])[self.comic]  # (N,)
        self.page_number = np.asarray(features.page_numbers, dtype=np.int64)
        self._cache: dict[str, np.ndarray] = {}

    # lazily computed views -------------------------------------------------------------------
    def panel_vectors(self, modality: str) -> np.ndarray:
        key = f"unit:{modality}"
        if key not in self._cache:
            self._cache[key] = _unit(np.asarray(getattr(self.features, modality), dtype=np.float32))
        return self._cache[key]  # (N, P, D) unit rows (zero where padded)

    def panel_content(self, modality: str) -> np.ndarray:
        key = f"content:{modality}"
        if key not in self._cache:
            self._cache[key] = _content_ids(np.asarray(getattr(self.features, modality)), self.mask)
        return self._cache[key]  # (N, P)

    @property
    def text_mask(self) -> np.ndarray:
        return np.asarray(self.features.text_mask, dtype=bool) & self.mask[:, :, None]  # (N, P, B)

    @property
    def n_boxes(self) -> np.ndarray:
        return self.text_mask.sum(axis=2)  # (N, P)

    def text_sums(self) -> np.ndarray:
        """(N, P, D) sum of a panel's unit text boxes (0 for a silent panel)."""
        if "text_sums" not in self._cache:
            text = np.asarray(self.features.text, dtype=np.float32)
            self._cache["text_sums"] = (_unit(text) * self.text_mask[..., None]).sum(axis=2)
        return self._cache["text_sums"]

    def text_vectors(self) -> np.ndarray:
        """(N, P, D) unit mean text of each panel: what a text option looks like to similarity."""
        if "text_vectors" not in self._cache:
            self._cache["text_vectors"] = _unit(self.text_sums())
        return self._cache["text_vectors"]

    def text_content(self) -> np.ndarray:
        if "text_content" not in self._cache:
            text = np.asarray(self.features.text) * self.text_mask[..., None]
            self._cache["text_content"] = _content_ids(text, self.n_boxes > 0)
        return self._cache["text_content"]  # (N, P); -1 for silent panels

    def comic_rows(self) -> list[np.ndarray]:
        order = np.argsort(self.comic, kind="stable")
        cuts = np.flatnonzero(np.diff(self.comic[order])) + 1
        return np.split(order, cuts)  # rows of each comic code, in page-table order


# --- drawing positions --------------------------------------------------------------------------
def _draw_positions(rng: np.random.Generator, eligible: np.ndarray, per_page: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_page` distinct eligible slots of every page, uniformly; (rows, slots) sorted by row.

    eligible: (N, P) bool.
    """
    keys = np.where(eligible, rng.random(eligible.shape), -1.0)  # (N, P)
    take = min(per_page, eligible.shape[1])
    chosen = np.argsort(-keys, axis=1, kind="stable")[:, :take]  # (N, take) best keys first
    ok = np.take_along_axis(eligible, chosen, axis=1)
    rows = np.broadcast_to(np.arange(eligible.shape[0])[:, None], chosen.shape)
    return rows[ok].astype(np.int64), chosen[ok].astype(np.int64)


@dataclass
class _Draw:
    """The samples of one task before options are chosen."""

    rows: np.ndarray  # (n,) page row
    answer: np.ndarray  # (n,) slot of the answer panel on that page
    context: np.ndarray  # (n, P) int16 context array (slots, PAD, MASK)
    context_slots: np.ndarray  # (n, P) bool: slots of `rows` that are context panels
    refs: np.ndarray  # (n, F, D) unit reference vectors similarity is matched against
    extra: dict[str, np.ndarray]  # task-specific fields


def _masked_mean_unit(vectors: np.ndarray, rows: np.ndarray, slots_mask: np.ndarray) -> np.ndarray:
    """(n, D) unit mean of vectors[rows] over the slots in slots_mask (n, P)."""
    total = np.einsum("np,npd->nd", slots_mask.astype(np.float32), vectors[rows])
    return _unit(total)


def _context_until(table: _Table, rows: np.ndarray, answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Context of panels 0..s-1: (n, P) int16 slots then PAD, and the (n, P) bool slot mask."""
    before = table.slots[None, :] < answer[:, None]  # (n, P)
    context = np.where(before, table.slots[None, :], PAD).astype(np.int16)
    return context, before


def _last_before(flags: np.ndarray, rows: np.ndarray, answer: np.ndarray, first: np.ndarray | None = None
                 ) -> np.ndarray:
    """(n,) last slot < answer (and >= first) of `rows` where flags (N, P) is set; -1 if none."""
    slots = np.arange(flags.shape[1])
    marked = np.where(flags[rows] & (slots[None, :] < answer[:, None]), slots[None, :], -1)
    if first is not None:
        marked = np.where(slots[None, :] >= first[:, None], marked, -1)
    return marked.max(axis=1)


# --- choosing distractors ---------------------------------------------------------------------
def _nearest(distance: np.ndarray, k: int) -> np.ndarray:
    """(n, k) column indices of the k smallest entries of distance (n, C), nearest first."""
    if distance.shape[1] > k:
        smallest = np.argpartition(distance, k - 1, axis=1)[:, :k]
    else:
        smallest = np.broadcast_to(np.arange(distance.shape[1])[None, :], distance.shape)
    order = np.argsort(np.take_along_axis(distance, smallest, axis=1), axis=1, kind="stable")
    return np.take_along_axis(smallest, order, axis=1)


def _choose_distractors(rng: np.random.Generator, answer_sim: np.ndarray, candidate_sim: np.ndarray,
                        eligible: np.ndarray, n_pick: int, match: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n_pick` eligible candidates per sample.

    answer_sim (n, F): the answer's similarity to each reference; candidate_sim (n, C, F): the
    candidates'; eligible (n, C) bool. With `match`, the nearest candidates in similarity are
    taken, a uniformly random number r of them below the answer on one random reference and the
    rest above: the answer's rank among the options on that similarity is then uniform.
    Returns picks (n, n_pick) candidate indices and ok (n,) (enough candidates).
    """
    n, C = eligible.shape
    available = eligible.sum(axis=1)
    ok = available >= n_pick
    if C < n_pick:
        return np.zeros((n, n_pick), dtype=np.int64), np.zeros(n, dtype=bool)
    if not match:
        return _nearest(np.where(eligible, rng.random((n, C)), np.inf), n_pick), ok
    delta = candidate_sim - answer_sim[:, None, :]  # (n, C, F)
    distance = np.abs(delta).sum(axis=2) + 1e-7 * rng.random((n, C))  # jitter breaks exact ties
    primary = rng.integers(delta.shape[2], size=n)  # (n,) the reference whose rank is balanced
    below = np.take_along_axis(delta, primary[:, None, None], axis=2)[..., 0] < 0  # (n, C)
    n_below = (eligible & below).sum(axis=1)
    n_above = (eligible & ~below).sum(axis=1)
    wanted = rng.integers(0, n_pick + 1, size=n)  # distractors below the answer
    take_below = np.clip(np.clip(wanted, n_pick - n_above, None), 0, n_below)  # (n,)
    nearest_below = _nearest(np.where(eligible & below, distance, np.inf), n_pick)
    nearest_above = _nearest(np.where(eligible & ~below, distance, np.inf), n_pick)
    j = np.arange(n_pick)[None, :]
    from_above = np.take_along_axis(nearest_above, np.clip(j - take_below[:, None], 0, n_pick - 1), axis=1)
    picks = np.where(j < take_below[:, None], nearest_below, from_above)
    return picks, ok


def _place_answer(rng: np.random.Generator, answer: np.ndarray, distractors: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Options (n, K) with the answer at a uniform random index and distractors shuffled."""
    n, k_minus_1 = distractors.shape
    K = k_minus_1 + 1
    shuffled = np.take_along_axis(distractors, np.argsort(rng.random((n, k_minus_1)), axis=1), axis=1)
    label = rng.integers(K, size=n)
    positions = np.arange(k_minus_1)[None, :]
    columns = positions + (positions >= label[:, None])  # (n, K-1) every column but the label's
    options = np.empty((n, K), dtype=np.int64)
    np.put_along_axis(options, columns, shuffled, axis=1)
    options[np.arange(n), label] = answer
    return options, label.astype(np.int16)


@dataclass
class _OptionSpace:
    """What options are: which panels may be one, and how they look to similarity/equality."""

    candidates: np.ndarray  # (N, P) bool panels that may be an option
    vectors: np.ndarray  # (N, P, D) unit vectors compared with the references
    content: np.ndarray  # (N, P) content id (equal content <=> equal id)


def _option_samples(table: _Table, rng: np.random.Generator, draw: _Draw, space: _OptionSpace,
                    n_options: int, policy: str, match: bool, config: TaskConfig,
                    page_window: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Options (n, K), labels (n,) and ok (n,) for every drawn sample, comic by comic."""
    P, n = table.P, len(draw.rows)
    n_pick = n_options - 1
    flat_content = space.content.reshape(-1)
    flat_vectors = space.vectors.reshape(-1, space.vectors.shape[-1])
    candidate_flat = np.flatnonzero(space.candidates.reshape(-1))  # (M,) all possible options
    candidate_comic = table.comic[candidate_flat // P]
    by_comic = np.argsort(candidate_comic, kind="stable")
    comic_bounds = np.searchsorted(candidate_comic[by_comic], np.arange(len(table.comic_names) + 1))
    candidate_split = table.split[candidate_flat // P]
    split_pools = [candidate_flat[candidate_split == code] for code in range(len(SPLITS))]
    answer_flat = draw.rows * P + draw.answer
    answer_content = flat_content[answer_flat]
    context_content = np.where(draw.context_slots, space.content[draw.rows], -1)  # (n, P)
    answer_sim = np.einsum("nfd,nd->nf", draw.refs, flat_vectors[answer_flat])  # (n, F)

    distractors = np.zeros((n, n_pick), dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    sample_comic = table.comic[draw.rows]
    order = np.argsort(sample_comic, kind="stable")
    cuts = np.flatnonzero(np.diff(sample_comic[order])) + 1
    for samples in np.split(order, cuts):
        if samples.size == 0:
            continue
        comic = sample_comic[samples[0]]
        if policy == "hard":
            pool = np.sort(candidate_flat[by_comic[comic_bounds[comic]:comic_bounds[comic + 1]]])
        else:  # easy: a seeded random pool from the other comics of the same split
            split_pool = split_pools[table.split[draw.rows[samples[0]]]]
            if split_pool.size > config.easy_pool_size:
                split_pool = split_pool[rng.choice(split_pool.size, size=config.easy_pool_size, replace=False)]
            pool = np.sort(split_pool[table.comic[split_pool // P] != comic])
        # one candidate per distinct content, so two options never look the same
        _, first = np.unique(flat_content[pool], return_index=True)
        pool = pool[np.sort(first)]  # (C,)
        rows = draw.rows[samples]
        eligible = flat_content[pool][None, :] != answer_content[samples][:, None]  # (m, C)
        eligible &= ~(flat_content[pool][None, :, None] == context_content[samples][:, None, :]).any(axis=2)
        if policy == "hard":
            pool_rows = pool // P
            eligible &= pool_rows[None, :] != rows[:, None]  # other pages only
            if page_window is not None:
                distance = np.abs(table.page_number[pool_rows][None, :] - table.page_number[rows][:, None])
                eligible &= distance <= page_window
        candidate_sim = (draw.refs[samples] @ flat_vectors[pool].T).transpose(0, 2, 1)  # (m, C, F)
        picks, comic_ok = _choose_distractors(rng, answer_sim[samples], candidate_sim, eligible,
                                              n_pick, match)
        distractors[samples] = pool[picks] if pool.size else 0
        ok[samples] = comic_ok
    options, label = _place_answer(rng, answer_flat, distractors)
    return options, label, ok


# --- the tasks --------------------------------------------------------------------------------
def _panel_modality(task: str, features: PageFeatures) -> str:
    if task == "visual_closure" and features.fused is None:
        return "visual"
    return "fused"


def _draw_sequence_filling(table: _Table, rng, per_page: int, modality: str) -> _Draw:
    rows, answer = _draw_positions(rng, table.mask & (table.n_panels >= 2)[:, None], per_page)
    n_panels = table.n_panels[rows]
    valid = table.slots[None, :] < n_panels[:, None]  # (n, P)
    context = np.where(valid, table.slots[None, :], PAD).astype(np.int16)
    context[np.arange(rows.size), answer] = MASK
    context_slots = valid & (table.slots[None, :] != answer[:, None])
    vectors = table.panel_vectors(modality)
    previous = np.where(answer > 0, answer - 1, answer + 1)  # a neighbour always exists (n >= 2)
    following = np.where(answer < n_panels - 1, answer + 1, answer - 1)
    refs = np.stack([_masked_mean_unit(vectors, rows, context_slots), vectors[rows, previous],
                     vectors[rows, following]], axis=1)  # (n, 3, D)
    return _Draw(rows, answer, context, context_slots, refs, {})


def _draw_closure(table: _Table, rng, per_page: int, modality: str) -> _Draw:
    rows, answer = _draw_positions(rng, table.mask & (table.slots[None, :] >= 1), per_page)
    context, context_slots = _context_until(table, rows, answer)
    vectors = table.panel_vectors(modality)
    refs = np.stack([_masked_mean_unit(vectors, rows, context_slots), vectors[rows, answer - 1]], axis=1)
    return _Draw(rows, answer, context, context_slots, refs, {})


def _draw_caption_relevance(table: _Table, rng, per_page: int) -> _Draw:
    rows, answer = _draw_positions(rng, table.mask & (table.slots[None, :] >= 1), per_page)
    described = answer - 1  # the panel whose caption is the whole context
    context = np.full((rows.size, table.P), PAD, dtype=np.int16)
    context_slots = table.slots[None, :] == described[:, None]
    refs = np.stack([table.panel_vectors("caption")[rows, described],
                     table.panel_vectors("fused")[rows, described]], axis=1)  # (n, 2, D)
    caption_of = (rows * table.P + described).astype(np.int64)
    return _Draw(rows, answer, context, context_slots, refs, {"caption_of": caption_of})


def _text_refs(table: _Table, rows: np.ndarray, answer: np.ndarray, first: np.ndarray) -> np.ndarray:
    """(n, 2, D): unit mean of all context text boxes, and the text of the last context panel
    that has text (zero when the context is silent). Context = slots first..answer-1."""
    window = (table.slots[None, :] >= first[:, None]) & (table.slots[None, :] < answer[:, None])
    sums = table.text_sums()
    mean = _unit(np.einsum("np,npd->nd", window.astype(np.float32), sums[rows]))
    last = _last_before(table.n_boxes > 0, rows, answer, first)
    last_text = np.where((last >= 0)[:, None], table.text_vectors()[rows, np.maximum(last, 0)], 0.0)
    return np.stack([mean, last_text.astype(np.float32)], axis=1)


def _draw_text_closure(table: _Table, rng, per_page: int) -> _Draw:
    has_text = table.n_boxes > 0
    rows, answer = _draw_positions(rng, has_text & (table.slots[None, :] >= 1), per_page)
    context, context_slots = _context_until(table, rows, answer)
    refs = _text_refs(table, rows, answer, np.zeros_like(answer))
    return _Draw(rows, answer, context, context_slots, refs,
                 {"option_visual": (rows * table.P + answer).astype(np.int64)})


def _draw_text_cloze(table: _Table, rng, per_page: int) -> _Draw:
    has_text = table.n_boxes > 0
    rows, answer = _draw_positions(rng, has_text & (table.slots[None, :] >= CLOZE_CONTEXT), per_page)
    first = answer - CLOZE_CONTEXT
    positions = np.arange(table.P)[None, :]
    context = np.where(positions < CLOZE_CONTEXT, first[:, None] + positions, PAD).astype(np.int16)
    context_slots = (table.slots[None, :] >= first[:, None]) & (table.slots[None, :] < answer[:, None])
    refs = _text_refs(table, rows, answer, first)
    return _Draw(rows, answer, context, context_slots, refs,
                 {"option_visual": (rows * table.P + answer).astype(np.int64)})


def _character_coherence(table: _Table, rng, per_page: int) -> dict[str, np.ndarray]:
    text = np.asarray(table.features.text)
    n_boxes = table.n_boxes
    # the two first boxes must differ, or the swapped order would look the same as the true one
    if text.shape[2] < 2:
        distinct = np.zeros_like(table.mask)
    else:
        distinct = (text[:, :, 0] != text[:, :, 1]).any(axis=-1)  # (N, P)
    eligible = table.mask & (table.slots[None, :] >= 1) & (n_boxes >= 2) & distinct
    rows, answer = _draw_positions(rng, eligible, per_page)
    context, _ = _context_until(table, rows, answer)
    B = text.shape[2]
    boxes = np.arange(B)[None, :]
    true_order = np.where(boxes < n_boxes[rows, answer][:, None], boxes, PAD)  # (n, B)
    swapped = true_order.copy()
    swapped[:, [0, 1]] = true_order[:, [1, 0]]
    label = rng.integers(CHARACTER_COHERENCE_OPTIONS, size=rows.size)
    box_order = np.where((label[:, None, None] == np.arange(2)[None, :, None]),
                         true_order[:, None, :], swapped[:, None, :]).astype(np.int16)  # (n, 2, B)
    answer_ref = (rows * table.P + answer).astype(np.int64)
    return {
        "page": rows.astype(np.int32),
        "context": context,
        "options": np.repeat(answer_ref[:, None], CHARACTER_COHERENCE_OPTIONS, axis=1),
        "label": label.astype(np.int16),
        "box_order": box_order,
    }


def _reading_order(table: _Table, rng, per_page: int) -> dict[str, np.ndarray]:
    pages = np.flatnonzero(table.n_panels >= 2)
    rows = np.repeat(pages, per_page)
    valid = table.mask[rows]  # (n, P)
    keys = np.where(valid, rng.random(valid.shape), np.inf)  # padded slots sort last
    shown = np.argsort(keys, axis=1)  # (n, P) a uniform random permutation of the valid slots
    order = np.where(valid, shown, PAD).astype(np.int16)  # valid is a prefix, so PAD follows
    return {"page": rows.astype(np.int32), "order": order}


# --- entry point --------------------------------------------------------------------------------
def generate_task(task: str, features: PageFeatures, split_of_comic: Mapping[str, str],
                  config: TaskConfig = TaskConfig()) -> TaskDataset:
    """Samples of `task` over every page of `features`, grouped by the split of their comic.

    Raises TaskSkipped when the features lack the task's modality, ValueError on bad input.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {list(TASK_NAMES)}")
    reason = TASKS[task].missing(features.modalities)
    if reason is not None:
        raise TaskSkipped(task, reason)
    if task in ("text_closure", "character_coherence", "text_cloze") and features.text_mask is None:
        raise TaskSkipped(task, "the store has text but no text_mask")
    table = _Table(features, split_of_comic)
    rng = np.random.default_rng([config.seed, TASK_NAMES.index(task)])
    per_page = config.samples_for(task)
    attrs: dict[str, object] = {"task": task, "seed": int(config.seed), "samples_per_page": per_page}

    if task == "reading_order":
        fields = _reading_order(table, rng, per_page)
        n_valid = (fields["order"] != PAD).sum(axis=1)
        inverse_factorial = np.array([1.0 / math.factorial(k) for k in range(table.P + 1)])
        exact_chance = float(inverse_factorial[n_valid].mean()) if n_valid.size else float("nan")
        attrs.update(n_options=0, distractor_policy="none", option_modality="fused",
                     chance=exact_chance, chance_pairwise=0.5)
    elif task == "character_coherence":
        fields = _character_coherence(table, rng, per_page)
        attrs.update(n_options=CHARACTER_COHERENCE_OPTIONS, chance=0.5, distractor_policy="swap",
                     option_modality="text", swapped_boxes=[0, 1])
    else:
        n_options = config.options_for(task)
        if task == "text_cloze":
            fields, skipped = _text_cloze(table, rng, per_page, n_options, config)
            policy = "easy+hard"
        else:
            policy = config.distractors
            if task == "sequence_filling":
                draw = _draw_sequence_filling(table, rng, per_page, "fused")
            elif task == "visual_closure":
                draw = _draw_closure(table, rng, per_page, _panel_modality(task, features))
            elif task == "caption_relevance":
                draw = _draw_caption_relevance(table, rng, per_page)
            else:  # text_closure
                draw = _draw_text_closure(table, rng, per_page)
            space = _space_of(table, task, features)
            options, label, ok = _option_samples(table, rng, draw, space, n_options, policy,
                                                 config.match_similarity, config)
            fields = {"page": draw.rows.astype(np.int32), "context": draw.context,
                      "options": options, "label": label, **draw.extra}
            fields = {name: array[ok] for name, array in fields.items()}
            skipped = int((~ok).sum())
        attrs.update(n_options=n_options, chance=1.0 / n_options, distractor_policy=policy,
                     similarity_matched=config.match_similarity,
                     option_modality="text" if task in ("text_closure", "text_cloze") else
                     _panel_modality(task, features),
                     skipped_without_distractors=skipped)
        if task == "text_cloze":
            attrs.update(hard_page_window=config.hard_page_window, variants={"easy": 0, "hard": 1})
        if policy != "hard":
            attrs["easy_pool_size"] = config.easy_pool_size

    sample_split = table.split[fields["page"]]
    splits = {split: {name: np.ascontiguousarray(array[sample_split == code])
                      for name, array in fields.items()} for code, split in enumerate(SPLITS)}
    attrs["samples"] = {split: int((sample_split == code).sum()) for code, split in enumerate(SPLITS)}
    attrs["pages"] = {split: int(np.unique(fields["page"][sample_split == code]).size)
                      for code, split in enumerate(SPLITS)}
    return TaskDataset(task=task, comic_ids=np.asarray(features.comic_ids),
                       page_numbers=np.asarray(features.page_numbers, dtype=np.int32),
                       max_panels=table.P, splits=splits, attrs=attrs)


def _space_of(table: _Table, task: str, features: PageFeatures) -> _OptionSpace:
    if task in ("text_closure", "text_cloze"):
        return _OptionSpace(table.n_boxes > 0, table.text_vectors(), table.text_content())
    modality = _panel_modality(task, features)
    return _OptionSpace(table.mask, table.panel_vectors(modality), table.panel_content(modality))


def _text_cloze(table: _Table, rng: np.random.Generator, per_page: int, n_options: int,
                config: TaskConfig) -> tuple[dict[str, np.ndarray], int]:
    """Both variants in one dataset: easy (other comics) and hard (neighbouring pages)."""
    space = _space_of(table, "text_cloze", table.features)
    parts, skipped = [], 0
    for variant, policy in ((0, "easy"), (1, "hard")):
        draw = _draw_text_cloze(table, rng, per_page)
        window = config.hard_page_window if policy == "hard" else None
        options, label, ok = _option_samples(table, rng, draw, space, n_options, policy,
                                             config.match_similarity, config, page_window=window)
        parts.append({"page": draw.rows.astype(np.int32)[ok], "context": draw.context[ok],
                      "options": options[ok], "label": label[ok],
                      "option_visual": draw.extra["option_visual"][ok],
                      "variant": np.full(int(ok.sum()), variant, dtype=np.int8)})
        skipped += int((~ok).sum())
    fields = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    order = np.argsort(fields["page"], kind="stable")  # page-table order, easy before hard
    return {name: array[order] for name, array in fields.items()}, skipped
