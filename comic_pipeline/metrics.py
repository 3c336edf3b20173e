"""Evaluation metrics of Stage 4 (DESIGN §6), pure numpy.

- option tasks: accuracy with a 95% interval beside chance: a cluster bootstrap over comics when
  the samples' comics are given (samples of one comic are not independent), else Wilson;
- reading order: Kendall's tau, pairwise accuracy and exact match per sample, PAD aware;
- strip embeddings: cosine retrieval recall@k (view retrieval, same-comic retrieval).

Order arrays follow comic_pipeline.schema: ``order[i]`` is the true slot of the panel shown at
input position ``i``; PAD (-1) fills the positions after the page's panels. A predicted order has
the same form (``predicted[i]`` = the slot the model puts the panel of input ``i`` in).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple

import numpy as np

from comic_pipeline.schema import PAD

# Rows of the (queries x keys) similarity matrix computed at once: bounds memory at
# chunk_rows * n_keys float32 (4096 x 100k keys = 1.6 GB would be too much, so it adapts).
_SIMILARITY_BUDGET_ELEMENTS = 32 * 1024 * 1024  # 128 MB of float32 per chunk


# --- accuracy ---------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default: 95%).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or n successes.
    With n == 0 nothing is known: (0.0, 1.0).
    """
    successes, n = int(successes), int(n)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got successes={successes}, n={n}")
    if z <= 0:
        raise ValueError(f"wilson_interval: z must be positive, got {z}")
    if n == 0:
        return 0.0, 1.0
    p_hat = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p_hat + z2 / (2 * n)) / denominator
    half_width = z * math.sqrt(p_hat * (1 - p_hat) / n + z2 / (4 * n * n)) / denominator
    # clamp float rounding at the ends (e.g. successes == n gives 1 + 1e-17)
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


BOOTSTRAP_RESAMPLES = 2000


def cluster_bootstrap_interval(values, clusters, *, level: float = 0.95, n_resamples: int = BOOTSTRAP_RESAMPLES,
                               seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (N,) when whole clusters are resampled.

    clusters (N,): the cluster (e.g. comic) of each value. Each resample draws as many clusters as
    there are, with replacement, and takes the mean over all their values (a ratio estimator, so
    big and small comics weigh by their samples). Seeded: the same inputs, the same interval.
    No values: (nan, nan). One cluster says nothing about the spread between comics: (0.0, 1.0),
    the whole range of an accuracy (nothing is claimed)."""
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters)
    if values.ndim != 1 or clusters.shape != values.shape:
        raise ValueError(f"cluster_bootstrap_interval: values and clusters must both be (N,); got "
                         f"{values.shape} and {clusters.shape}")
    if not 0 < level < 1:
        raise ValueError(f"cluster_bootstrap_interval: level must be in (0, 1), got {level}")
    if values.size == 0:
        return float("nan"), float("nan")
    _, cluster_index = np.unique(clusters, return_inverse=True)
    n_clusters = int(cluster_index.max()) + 1
    if n_clusters < 2:
        return 0.0, 1.0
    sums = np.bincount(cluster_index, weights=values, minlength=n_clusters)  # (C,)
    counts = np.bincount(cluster_index, minlength=n_clusters).astype(np.float64)  # (C,)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_resamples)  # (R, C)
    means = (weights @ sums) / np.maximum(weights @ counts, 1e-12)  # (R,)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class AccuracyReport:
    accuracy: float  # nan when there are no samples
    ci_low: float  # 95% interval (ci_method)
    ci_high: float
    n_samples: int
    chance: float  # accuracy of a uniform guess
    ci_method: str = "wilson"  # "wilson" | "cluster_bootstrap"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def accuracy_report(predictions, labels, chance: float, *, clusters=None, seed: int = 0) -> AccuracyReport:
    """Accuracy of option predictions with its 95% interval.

    predictions: (N,) chosen option index, or (N, K) option scores (argmax is taken).
    labels:      (N,) index of the true option.
    clusters:    (N,) the comic of each sample: a seeded cluster bootstrap over comics; None:
                 a Wilson interval (independent samples).
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=1)  # (N, K) scores -> (N,) choice
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"accuracy_report: predictions must be (N,) or (N, K) and labels (N,); "
                         f"got {predictions.shape} and {labels.shape}")
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy_report: {predictions.shape[0]} predictions for {labels.shape[0]} labels")
    n = int(labels.shape[0])
    correct = int(np.count_nonzero(predictions == labels))
    if clusters is None:
        (low, high), method = wilson_interval(correct, n), "wilson"
    else:
        (low, high), method = cluster_bootstrap_interval(predictions == labels, clusters, seed=seed), \
            "cluster_bootstrap"
    return AccuracyReport(
        accuracy=correct / n if n else float("nan"),
        ci_low=low,
        ci_high=high,
        n_samples=n,
        chance=float(chance),
        ci_method=method,
    )


# --- reading order ----------------------------------------------------------------------------
def _order_signs(predicted_order, true_order) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairwise comparison signs of both orders over the valid pairs i < j.

    Returns (sign_pred, sign_true, pair_valid, n_valid): (N, P, P) int8, (N, P, P) int8,
    (N, P, P) bool (i < j, both valid), (N,) panels per sample.
    """
    predicted = np.atleast_2d(np.asarray(predicted_order))  # a single (P,) order is one sample
    true = np.atleast_2d(np.asarray(true_order))
    if true.ndim != 2 or predicted.shape != true.shape:
        raise ValueError(f"reading order: predicted and true orders must both be (N, P); "
                         f"got {np.shape(predicted_order)} and {np.shape(true_order)}")
    valid = true != PAD  # (N, P)
    if not np.array_equal(valid, predicted != PAD):
        bad = np.flatnonzero((valid != (predicted != PAD)).any(axis=1))
        raise ValueError(f"reading order: predicted PAD positions differ from the true ones in "
                         f"samples {bad[:10].tolist()}")
    n_valid = valid.sum(axis=1)  # (N,)
    positions = np.arange(true.shape[1])
    if not np.array_equal(valid, positions[None, :] < n_valid[:, None]):
        raise ValueError("reading order: PAD must only follow the valid panels (a prefix per sample)")
    out_of_range = valid & ((true < 0) | (true >= n_valid[:, None]))
    if out_of_range.any():
        bad = np.flatnonzero(out_of_range.any(axis=1))
        raise ValueError(f"reading order: true slots outside 0..n-1 in samples {bad[:10].tolist()}")

    pred = predicted.astype(np.int32)
    tru = true.astype(np.int32)
    sign_pred = np.sign(pred[:, :, None] - pred[:, None, :]).astype(np.int8)  # (N, P, P)
    sign_true = np.sign(tru[:, :, None] - tru[:, None, :]).astype(np.int8)  # (N, P, P)
    upper = np.triu(np.ones((true.shape[1],) * 2, dtype=bool), k=1)  # (P, P) pairs i < j
    pair_valid = upper[None] & valid[:, :, None] & valid[:, None, :]  # (N, P, P)
    return sign_pred, sign_true, pair_valid, n_valid


def kendall_tau(predicted_order, true_order) -> np.ndarray:
    """Kendall's tau-b per sample between predicted and true orders over the valid panels.

    (N,) float64 in [-1, 1]; equals scipy.stats.kendalltau (tau-b, so tied predicted slots are
    handled). nan where it is undefined: fewer than 2 panels, or all predicted slots tied.
    """
    sign_pred, sign_true, pair_valid, _ = _order_signs(predicted_order, true_order)
    agreement = (sign_pred.astype(np.int32) * sign_true * pair_valid).sum(axis=(1, 2))  # (N,) nc - nd
    untied_pred = (np.abs(sign_pred) * pair_valid).sum(axis=(1, 2))  # (N,) pairs not tied in pred
    untied_true = (np.abs(sign_true) * pair_valid).sum(axis=(1, 2))
    denominator = np.sqrt(untied_pred.astype(np.float64) * untied_true)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, agreement / np.where(denominator > 0, denominator, 1), np.nan)


def pairwise_accuracy(predicted_order, true_order) -> np.ndarray:
    """Fraction of panel pairs put in the right relative order, per sample.

    (N,) float64; a tie in the prediction counts as wrong. nan for pages with fewer than 2 panels.
    """
    sign_pred, sign_true, pair_valid, n_valid = _order_signs(predicted_order, true_order)
    correct = ((sign_pred == sign_true) & (sign_true != 0) & pair_valid).sum(axis=(1, 2))  # (N,)
    n_pairs = n_valid * (n_valid - 1) // 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pairs > 0, correct / np.maximum(n_pairs, 1), np.nan)


def exact_match(predicted_order, true_order) -> np.ndarray:
    """(N,) bool: the whole predicted order equals the true one."""
    _order_signs(predicted_order, true_order)  # validation only
    predicted = np.atleast_2d(np.asarray(predicted_order))
    true = np.atleast_2d(np.asarray(true_order))
    return (predicted == true).all(axis=1)


def reading_order_report(predicted_order, true_order) -> dict[str, float]:
    """Means of the three reading-order metrics beside their chance values.

    Chance is a uniformly random permutation of each page's panels: tau 0, pairwise accuracy
    0.5, exact match the mean over samples of 1/n! (n = panels of that page). Means skip the
    samples where a metric is undefined (pages with fewer than 2 panels).
    """
    tau = kendall_tau(predicted_order, true_order)
    pairwise = pairwise_accuracy(predicted_order, true_order)
    exact = exact_match(predicted_order, true_order)
    n_valid = (np.atleast_2d(np.asarray(true_order)) != PAD).sum(axis=1)
    n = int(exact.shape[0])
    # 1/n! through lgamma: exact for the small n of a page, no overflow for any n
    chance_exact = np.exp(-np.array([math.lgamma(k + 1) for k in range(int(n_valid.max(initial=0)) + 1)]))
    low, high = wilson_interval(int(exact.sum()), n)

    def mean(values: np.ndarray) -> float:
        defined = values[~np.isnan(values)]
        return float(defined.mean()) if defined.size else float("nan")

    return {
        "kendall_tau": mean(tau),
        "pairwise_accuracy": mean(pairwise),
        "exact_match": float(exact.mean()) if n else float("nan"),
        "exact_match_ci_low": low,
        "exact_match_ci_high": high,
        "kendall_tau_chance": 0.0,
        "pairwise_accuracy_chance": 0.5,
        "exact_match_chance": float(chance_exact[n_valid].mean()) if n else float("nan"),
        "n_samples": n,
    }


# --- retrieval --------------------------------------------------------------------------------
def _unit_rows(vectors: np.ndarray, name: str) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name} holds NaN or Inf")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, 1)
    return vectors / np.maximum(norms, 1e-12)


def top_k_cosine(queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool = False,
                 chunk_rows: int | None = None) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Top-k keys by cosine similarity for each query, in chunks of queries.

    Yields (rows, indices, scores): the slice of queries in this chunk, (rows, k) key indices
    best first and their (rows, k) cosine scores. The similarity matrix is never held whole:
    at most chunk_rows x N_keys floats at a time. exclude_self: query i is key i (same set),
    never returned for itself.
    """
    q = _unit_rows(queries, "queries")  # (Nq, D)
    kk = _unit_rows(keys, "keys")  # (Nk, D)
    n_queries, n_keys = q.shape[0], kk.shape[0]
    if q.shape[1] != kk.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but keys {kk.shape[1]}")
    if exclude_self and n_queries > n_keys:
        raise ValueError(f"exclude_self needs query i to be key i, but there are {n_queries} "
                         f"queries and {n_keys} keys")
    available = n_keys - (1 if exclude_self else 0)
    if k < 1 or k > available:
        raise ValueError(f"k must be in 1..{available} (keys to rank), got {k}")
    if chunk_rows is None:
        chunk_rows = max(1, _SIMILARITY_BUDGET_ELEMENTS // max(n_keys, 1))
    for start in range(0, n_queries, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_queries))
        similarity = q[rows] @ kk.T  # (rows, Nk)
        if exclude_self:
            own = np.arange(rows.start, rows.stop)
            similarity[own - rows.start, own] = -np.inf
        # unordered top-k, then sort only those k
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # (rows, k)
        top_scores = np.take_along_axis(similarity, top, axis=1)
        by_score = np.argsort(-top_scores, axis=1, kind="stable")
        yield rows, np.take_along_axis(top, by_score, axis=1), np.take_along_axis(top_scores, by_score, axis=1)


def recall_at_k(queries, keys, positives, k: int, exclude_self: bool = False) -> float:
    """Fraction of queries whose k nearest keys (cosine) contain a relevant key.

    positives: (Nq,) int index of the one relevant key per query, or (Nq, Nk) bool relevance.
    exclude_self: query i is key i and is not ranked for itself (nor counted as relevant).
    Queries with no relevant key left are not counted; nan if none is left.
    """
    positives = np.asarray(positives)
    n_queries, n_keys = np.shape(queries)[0], np.shape(keys)[0]
    if positives.dtype == bool:
        if positives.shape != (n_queries, n_keys):
            raise ValueError(f"boolean positives must be (Nq, Nk) = {(n_queries, n_keys)}, "
                             f"got {positives.shape}")
        relevance = positives.copy()
    else:
        if positives.shape != (n_queries,):
            raise ValueError(f"index positives must be (Nq,) = ({n_queries},), got {positives.shape}")
        if ((positives < 0) | (positives >= n_keys)).any():
            raise ValueError(f"positives hold key indices outside 0..{n_keys - 1}")
        relevance = None
    hits = np.zeros(n_queries, dtype=bool)
    countable = np.ones(n_queries, dtype=bool)
    if relevance is not None:
        if exclude_self:
            relevance[np.arange(n_queries), np.arange(n_queries)] = False
        countable = relevance.any(axis=1)
    elif exclude_self:
        countable = positives != np.arange(n_queries)
    for rows, top, _ in top_k_cosine(queries, keys, k, exclude_self):
        if relevance is not None:
            hits[rows] = np.take_along_axis(relevance[rows], top, axis=1).any(axis=1)
        else:
            hits[rows] = (top == positives[rows, None]).any(axis=1)
    n = int(countable.sum())
    return float(hits[countable].sum() / n) if n else float("nan")


def view_retrieval_recall_at_1(view_a, view_b) -> float:
    """Row i of view_a must retrieve row i of view_b (its other view) among all rows of view_b."""
    view_a, view_b = np.asarray(view_a), np.asarray(view_b)
    if view_a.shape != view_b.shape:
        raise ValueError(f"the two views must have the same shape, got {view_a.shape} and {view_b.shape}")
    return recall_at_k(view_a, view_b, np.arange(view_a.shape[0]), k=1)


class SameComicRecall(NamedTuple):
    recall: float  # fraction of counted queries with a same-comic page in their top k
    chance: float  # expected recall under a uniformly random ranking


def same_comic_recall_at_k(strips, comic_ids, k: int = 10) -> SameComicRecall:
    """Same-comic retrieval of strip (page) embeddings: (recall, chance), a NamedTuple.

    Each page queries all other pages (itself excluded) by cosine similarity; a hit is a page
    of its own comic among the top k. Pages that are the only page of their comic cannot hit
    and are not counted.

    chance: the expected recall when the k retrieved pages are a uniformly random k-subset of
    the N - 1 other pages. A query whose comic has m pages (m - 1 other relevant ones) misses
    with probability C(N - m, k) / C(N - 1, k); chance = mean over counted queries of
    1 - that.
    """
    strips = np.asarray(strips)
    comic_ids = np.asarray(comic_ids)
    if strips.ndim != 2 or comic_ids.shape != (strips.shape[0],):
        raise ValueError(f"strips must be (N, D) and comic_ids (N,); got {strips.shape} and {comic_ids.shape}")
    n = strips.shape[0]
    _, comic_index, pages_per_comic = np.unique(comic_ids, return_inverse=True, return_counts=True)
    pages_of_own_comic = pages_per_comic[comic_index]  # (N,) m per query
    countable = pages_of_own_comic >= 2
    if not countable.any():
        return SameComicRecall(float("nan"), float("nan"))
    k = min(k, n - 1)
    hits = np.zeros(n, dtype=bool)
    for rows, top, _ in top_k_cosine(strips, strips, k, exclude_self=True):
        hits[rows] = (comic_index[top] == comic_index[rows, None]).any(axis=1)
    # miss probability prod_{i<k} (N - m - i) / (N - 1 - i), per distinct m
    m_values, m_index = np.unique(pages_of_own_comic[countable], return_inverse=True)
    i = np.arange(k)
    factors = np.clip((n - m_values[:, None] - i[None, :]) / (n - 1 - i[None, :]), 0.0, None)
    miss_probability = factors.prod(axis=1)  # (distinct m,)
    chance = float((1.0 - miss_probability[m_index]).mean())
    return SameComicRecall(float(hits[countable].mean()), chance)
