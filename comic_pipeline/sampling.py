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
similarities at once (where an answer's candidates leave it no choice, the other samples make up
for it): so "pick the option most / least like the context" is at chance by construction, on any
corpus, and what is left to tell the answer apart is how panels follow each other. Candidates are
de-duplicated by content and never equal (by reference or content) the answer or a context panel.
"""

from __future__ import annotations

import functools
import itertools
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


@functools.cache
def _allocations(n_pick: int, n_refs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every way to spread `n_pick` distractors over the 2**F below/above patterns of F references.

    A pattern is an int whose bit f says "below the answer on reference f". Returns, per
    allocation: slots (A, n_pick) the pattern of each distractor slot; counts (A, 2**F) how many
    distractors have each pattern; margins (A, F) how many lie below the answer on each
    reference; prior (A,) its chance when the number below is uniform in 0..n_pick on every
    reference independently and which distractors lie below is random (per reference): the ideal,
    under which the answer's rank on each reference is uniform.
    """
    n_patterns = 2 ** n_refs
    slots = np.array(list(itertools.combinations_with_replacement(range(n_patterns), n_pick)))
    counts = np.stack([np.bincount(row, minlength=n_patterns) for row in slots])  # (A, O)
    bits = (np.arange(n_patterns)[:, None] >> np.arange(n_refs)[None, :]) & 1  # (O, F)
    margins = counts @ bits  # (A, F)
    # P(allocation) = P(margins) * P(patterns | margins) ∝ multinomial(counts) / prod_f C(n_pick, r_f)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_pick + 1)))])
    log_multinomial = log_factorial[n_pick] - log_factorial[counts].sum(axis=1)
    log_binomials = (log_factorial[n_pick] - log_factorial[margins] - log_factorial[n_pick - margins]).sum(axis=1)
    prior = np.exp(log_multinomial - log_binomials)
    order = np.lexsort(margins.T[::-1])  # equal margin vectors in contiguous runs
    return slots[order], counts[order], margins[order], prior[order] / prior.sum()


def _allocation_weights(feasible: np.ndarray, margins: np.ndarray, prior: np.ndarray,
                        counted: np.ndarray, iterations: int = 30, tolerance: float = 0.02) -> np.ndarray:
    """(n, A) each sample's chances over the allocations its candidates can fill (feasible (n, A)).

    The prior where every allocation is feasible. An answer more like the context than nearly all
    its candidates can only stand on top, though; left alone, such samples make "pick the most
    similar option" win more often than 1 in K. So the prior is reweighted by one factor per
    reference and number below, fitted by iterative proportional fitting until, over the samples
    of this call, every number below is equally frequent on every reference to within
    `tolerance` (well below sampling noise), where that can be done: the free samples make up for
    the forced ones. counted (n, F) float: 1 where a sample counts on reference f (a sample
    dropped, or whose candidates all tie with the answer on f, is at chance there whatever its
    allocation).
    """
    n_refs, n_counts = margins.shape[1], int(margins.max()) + 1
    refs = np.arange(n_refs)
    # the fit only sees the numbers below: it runs on the distinct margin vectors (M <= A), which
    # _allocations keeps in contiguous runs
    levels, first, level_of = np.unique(margins, axis=0, return_index=True, return_inverse=True)
    feasible = np.where(feasible.any(axis=1, keepdims=True), feasible, True)  # a dropped sample: any
    base = np.add.reduceat(feasible * prior, first, axis=1)  # (n, M) prior mass per margin vector
    is_count = (levels[:, :, None] == np.arange(n_counts)).astype(float)  # (M, F, R)
    target = counted.sum(axis=0)[:, None] / n_counts  # (F, 1) samples wanted at each number below
    log_factors = np.zeros((n_refs, n_counts))  # (F, R)
    for _ in range(iterations):
        weight = base * np.exp(log_factors[refs, levels].sum(axis=1))  # (n, M)
        weight /= weight.sum(axis=1, keepdims=True)
        mass = np.einsum("nf,nm->fm", counted, weight)  # (F, M) counted samples per margin vector
        load = np.einsum("fm,mfr->fr", mass, is_count)  # (F, R) samples at each number below
        if np.all(np.abs(load - target) <= tolerance * target + 1e-9):
            break
        log_factors += np.log(np.where(load > 0, target / np.maximum(load, 1e-12), 1.0))
        log_factors -= log_factors.max(axis=1, keepdims=True)
    weight = feasible * prior * np.exp(log_factors[refs, levels].sum(axis=1))[level_of]  # (n, A)
    return weight / weight.sum(axis=1, keepdims=True)


def _choose_distractors(rng: np.random.Generator, answer_sim: np.ndarray, candidate_sim: np.ndarray,
                        eligible: np.ndarray, n_pick: int, match: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pick `n_pick` distinct eligible candidates per sample.

    answer_sim (n, F): the answer's similarity to each reference; candidate_sim (n, C, F): the
    candidates'; eligible (n, C) bool. Without `match`, uniformly among the eligible.

    With `match`, the answer's rank among the options is uniform on every reference at once. Each
    candidate has a pattern: below or above the answer on each of the F references. A sample
    draws an allocation (how many distractors of each pattern, _allocations) among those its
    candidates can fill, with chances that make the number below the answer on every reference
    uniform in 0..n_pick over the samples (_allocation_weights), then takes for each distractor
    the nearest free candidate of its pattern (summed |similarity delta| to the answer). With
    F = 1 and candidates on both sides to spare, this is: r ~ U{0..n_pick} nearest below the
    answer, the rest nearest above. Returns picks (n, n_pick) candidate indices and ok (n,)
    (enough candidates).
    """
    n, C = eligible.shape
    ok = eligible.sum(axis=1) >= n_pick
    if C < n_pick:
        return np.zeros((n, n_pick), dtype=np.int64), np.zeros(n, dtype=bool)
    if not match:
        return _nearest(np.where(eligible, rng.random((n, C)), np.inf), n_pick), ok
    F = answer_sim.shape[1]
    slots, counts, margins, prior = _allocations(n_pick, F)
    n_patterns = counts.shape[1]
    distance = 1e-7 * rng.random((n, C))  # (n, C) summed |similarity delta|; jitter breaks exact ties
    pattern = np.zeros((n, C), dtype=np.int8)  # bit f: below the answer on reference f
    informative = np.zeros((n, F), dtype=bool)  # an all-tied reference (a silent context) tells nothing
    for f in range(F):  # (n, C) slices: the candidates' similarities come reference-major
        delta = candidate_sim[:, :, f] - answer_sim[:, f, None]
        gap = np.abs(delta)
        distance += gap
        pattern |= (delta < 0).view(np.int8) << f
        informative[:, f] = gap.max(axis=1) > 0
    pattern = np.where(eligible, pattern, n_patterns)  # the ineligible: a pattern nobody wants
    per_row = np.arange(n)[:, None] * (n_patterns + 1) + pattern
    available = np.bincount(per_row.ravel(), minlength=n * (n_patterns + 1)).reshape(n, -1)[:, :-1]
    feasible = (counts[None, :, :] <= available[:, None, :]).all(axis=2)  # (n, A)
    weight = _allocation_weights(feasible, margins, prior, (informative & ok[:, None]).astype(float))
    chosen = (rng.random((n, 1)) > np.cumsum(weight, axis=1)[:, :-1]).sum(axis=1)  # (n,)
    wanted = slots[chosen]  # (n, n_pick) the pattern of each distractor

    rows = np.arange(n)
    picks = np.zeros((n, n_pick), dtype=np.int64)
    for j in range(n_pick):  # the nearest free candidate of the wanted pattern (one exists if ok)
        picks[:, j] = np.argmin(np.where(pattern == wanted[:, j, None], distance, np.inf), axis=1)
        distance[rows, picks[:, j]] = np.inf  # taken
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
