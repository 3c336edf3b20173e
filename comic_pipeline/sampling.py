"""The sampling machinery every task generator shares (DESIGN §4), pure numpy.

The page table (`PageTable`: comic and split codes, panel counts, unit vectors and content ids per
modality, prepared once per call), uniform draws of sample positions (`draw_positions`), and the
choice of distractors (`option_samples`).

Distractors
-----------
Hard distractors come from other pages of the same comic, easy ones from other comics of the same
split (never from another split). Among the eligible candidates the generator prefers those whose
cosine similarity to the context (its mean, and the panels next to the answer) is closest to the
answer's own, and it places the answer at a uniformly random rank on every one of those
similarities at once: so "pick the option most / least like the context" is at chance by
construction, on any corpus,
and what is left to tell the answer apart is how panels follow each other. Candidates are
de-duplicated by content and never equal (by reference or content) the answer or a context panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from comic_pipeline.schema import PAD, SPLITS, PageFeatures

# --- the page table, prepared once per call ----------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
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


class PageTable:
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
            self._cache[key] = unit(np.asarray(getattr(self.features, modality), dtype=np.float32))
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
            self._cache["text_sums"] = (unit(text) * self.text_mask[..., None]).sum(axis=2)
        return self._cache["text_sums"]

    def text_vectors(self) -> np.ndarray:
        """(N, P, D) unit mean text of each panel: what a text option looks like to similarity."""
        if "text_vectors" not in self._cache:
            self._cache["text_vectors"] = unit(self.text_sums())
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
def draw_positions(rng: np.random.Generator, eligible: np.ndarray, per_page: int
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
class Draw:
    """The samples of one task before options are chosen."""

    rows: np.ndarray  # (n,) page row
    answer: np.ndarray  # (n,) slot of the answer panel on that page
    context: np.ndarray  # (n, P) int16 context array (slots, PAD, MASK)
    context_slots: np.ndarray  # (n, P) bool: slots of `rows` that are context panels
    refs: np.ndarray  # (n, F, D) unit reference vectors similarity is matched against
    extra: dict[str, np.ndarray]  # task-specific fields


def masked_mean_unit(vectors: np.ndarray, rows: np.ndarray, slots_mask: np.ndarray) -> np.ndarray:
    """(n, D) unit mean of vectors[rows] over the slots in slots_mask (n, P)."""
    total = np.einsum("np,npd->nd", slots_mask.astype(np.float32), vectors[rows])
    return unit(total)


def context_until(table: PageTable, rows: np.ndarray, answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Context of panels 0..s-1: (n, P) int16 slots then PAD, and the (n, P) bool slot mask."""
    before = table.slots[None, :] < answer[:, None]  # (n, P)
    context = np.where(before, table.slots[None, :], PAD).astype(np.int16)
    return context, before


def last_before(flags: np.ndarray, rows: np.ndarray, answer: np.ndarray, first: np.ndarray | None = None
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
    """Pick `n_pick` distinct eligible candidates per sample.

    answer_sim (n, F): the answer's similarity to each reference; candidate_sim (n, C, F): the
    candidates'; eligible (n, C) bool. Without `match`, uniformly among the eligible.

    With `match`, the answer's rank among the options is uniform on every reference at once: for
    each reference f an independent uniform count r_f in 0..n_pick of distractors is to lie below
    the answer, spread over the distractor slots at random (reference by reference), which gives
    every slot a wanted below/above pattern over the F references. Each slot takes the nearest
    free candidate (summed |similarity delta| to the answer) with exactly that pattern; a slot
    whose pattern has run out of candidates takes the nearest free one that differs from it on
    the fewest references, so a sample is dropped only when it has fewer than n_pick eligible
    candidates. With F = 1 this is: r nearest below the answer, the rest nearest above.
    Returns picks (n, n_pick) candidate indices and ok (n,) (enough candidates).
    """
    n, C = eligible.shape
    ok = eligible.sum(axis=1) >= n_pick
    if C < n_pick:
        return np.zeros((n, n_pick), dtype=np.int64), np.zeros(n, dtype=bool)
    if not match:
        return _nearest(np.where(eligible, rng.random((n, C)), np.inf), n_pick), ok
    F = answer_sim.shape[1]
    delta = candidate_sim - answer_sim[:, None, :]  # (n, C, F)
    distance = np.abs(delta).sum(axis=2) + 1e-7 * rng.random((n, C))  # jitter breaks exact ties
    below = delta < 0  # (n, C, F) the candidate lies below the answer on reference f
    bits = 1 << np.arange(F)  # a below/above pattern as an integer code
    code = below @ bits  # (n, C)
    # the wanted patterns: r_f slots below on reference f, which slots drawn independently per f
    wanted_below = rng.integers(0, n_pick + 1, size=(n, F, 1))  # (n, F, 1) r_f
    slot_rank = np.argsort(rng.random((n, F, n_pick)), axis=2)  # (n, F, n_pick) random permutations
    want = (slot_rank < wanted_below).transpose(0, 2, 1)  # (n, n_pick, F)
    want_code = want @ bits  # (n, n_pick)

    rows = np.arange(n)
    free = eligible.copy()  # (n, C) eligible and not taken yet
    picks = np.zeros((n, n_pick), dtype=np.int64)
    filled = np.zeros((n, n_pick), dtype=bool)
    for j in range(n_pick):  # first every slot from its own pattern...
        cost = np.where(free & (code == want_code[:, j, None]), distance, np.inf)  # (n, C)
        best = np.argmin(cost, axis=1)
        filled[:, j] = np.isfinite(cost[rows, best])
        picks[:, j] = best
        free[rows[filled[:, j]], best[filled[:, j]]] = False
    short = np.flatnonzero(~filled.all(axis=1) & ok)
    if short.size:  # ...then the slots left over from the closest pattern (fewest references off)
        s_below, s_distance, s_free = below[short], distance[short], free[short]
        off_weight = 2.0 * F + 1.0  # > any summed |delta| (<= 2F): one reference off outweighs it
        for j in range(n_pick):
            todo = np.flatnonzero(~filled[short, j])
            if todo.size == 0:
                continue
            off = (s_below[todo] != want[short[todo], j, None, :]).sum(axis=2)  # (t, C) refs off
            cost = np.where(s_free[todo], off * off_weight + s_distance[todo], np.inf)
            best = np.argmin(cost, axis=1)
            picks[short[todo], j] = best
            s_free[todo, best] = False
    return picks, ok


def place_answer(rng: np.random.Generator, answer: np.ndarray, distractors: np.ndarray
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
class OptionSpace:
    """What options are: which panels may be one, and how they look to similarity/equality."""

    candidates: np.ndarray  # (N, P) bool panels that may be an option
    vectors: np.ndarray  # (N, P, D) unit vectors compared with the references
    content: np.ndarray  # (N, P) content id (equal content <=> equal id)


def option_samples(table: PageTable, rng: np.random.Generator, draw: Draw, space: OptionSpace,
                   n_options: int, policy: str, match: bool, *, easy_pool_size: int,
                   page_window: int | None = None, same_slot: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Options (n, K), labels (n,), ok (n,) and duplicates_context (n,) for every drawn sample,
    comic by comic. ok is False where there are too few distractors or where the answer equals a
    context panel by content (duplicates_context).

    same_slot: distractors only from the answer's own slot (on other pages), so an option's page
    position never tells which option is the answer (DESIGN §4)."""
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
            if same_slot:  # only the slots this comic's answers stand at
                split_pool = split_pool[np.isin(split_pool % P, draw.answer[samples])]
            if split_pool.size > easy_pool_size:
                split_pool = split_pool[rng.choice(split_pool.size, size=easy_pool_size, replace=False)]
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
        if same_slot:
            eligible &= (pool % P)[None, :] == draw.answer[samples][:, None]
        candidate_sim = (draw.refs[samples] @ flat_vectors[pool].T).transpose(0, 2, 1)  # (m, C, F)
        picks, comic_ok = _choose_distractors(rng, answer_sim[samples], candidate_sim, eligible,
                                              n_pick, match)
        distractors[samples] = pool[picks] if pool.size else 0
        ok[samples] = comic_ok
    # the answer visible in the context by content (a repeated panel): "pick the option that
    # repeats a context panel" would solve such a sample, so it is dropped
    duplicates_context = (context_content == answer_content[:, None]).any(axis=1)
    ok &= ~duplicates_context
    options, label = place_answer(rng, answer_flat, distractors)
    return options, label, ok, duplicates_context


# --- the slot oracle -----------------------------------------------------------------------------
def slot_oracle_scores(train_asked: np.ndarray, train_slots: np.ndarray, train_label: np.ndarray,
                       asked: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """(N, K) how a slot-only model rates each option: it knows the asked position and each
    option's source slot, nothing else. Fit on train: how often an option at slot j is the answer
    when position i is asked (a lookup table, Laplace-smoothed so unseen cells sit at chance).

    *_asked (N,) asked slot; *_slots (N, K) each option's source slot; train_label (N,)."""
    P = int(max(train_slots.max(initial=0), slots.max(initial=0), train_asked.max(initial=0),
                asked.max(initial=0))) + 1
    is_answer = np.arange(train_slots.shape[1])[None, :] == train_label[:, None]  # (N, K)
    cell = np.broadcast_to(train_asked[:, None], train_slots.shape) * P + train_slots  # (N, K)
    hits = np.bincount(cell.ravel(), weights=is_answer.ravel(), minlength=P * P)
    seen = np.bincount(cell.ravel(), minlength=P * P)
    rate = (hits + 1.0) / (seen + train_slots.shape[1])
    return rate[np.broadcast_to(asked[:, None], slots.shape) * P + slots]  # (N, K)


def expected_accuracy(scores: np.ndarray, label: np.ndarray) -> float:
    """Accuracy of picking the best-scored option with ties broken uniformly, in expectation
    (no tie-breaking noise: an uninformative scorer is exactly at chance)."""
    best = scores >= scores.max(axis=1, keepdims=True)  # (N, K)
    return float(np.mean(best[np.arange(len(label)), label] / best.sum(axis=1))) if len(label) else float("nan")
