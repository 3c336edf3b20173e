import itertools
import math

import numpy as np
import pytest
from scipy import stats

from comic_pipeline import metrics
from comic_pipeline.schema import PAD


# --- accuracy ---------------------------------------------------------------------------------
def test_wilson_interval_matches_reference_values():
    # reference: statsmodels proportion_confint(8, 10, method="wilson") = (0.4902, 0.9433)
    low, high = metrics.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    low, high = metrics.wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = metrics.wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(0.8389, abs=1e-4)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_covers_true_rate_about_95_percent():
    rng = np.random.default_rng(0)
    p, n = 0.3, 50
    draws = rng.binomial(n, p, size=2000)
    covered = [lo <= p <= hi for lo, hi in (metrics.wilson_interval(int(s), n) for s in draws)]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="successes"):
        metrics.wilson_interval(5, 3)
    with pytest.raises(ValueError, match="successes"):
        metrics.wilson_interval(-1, 3)


def test_accuracy_report_from_choices_and_scores():
    labels = np.array([0, 1, 2, 3, 0])
    report = metrics.accuracy_report(np.array([0, 1, 2, 0, 1]), labels, chance=0.25)
    assert report.accuracy == pytest.approx(0.6)
    assert report.n_samples == 5 and report.chance == 0.25
    assert (report.ci_low, report.ci_high) == pytest.approx(metrics.wilson_interval(3, 5))
    scores = np.eye(4)[[0, 1, 2, 0, 1]]  # (5, 4) one-hot of the same choices
    assert metrics.accuracy_report(scores, labels, 0.25) == report
    assert set(report.as_dict()) == {"accuracy", "ci_low", "ci_high", "n_samples", "chance", "ci_method"}


def test_accuracy_report_errors_and_empty():
    with pytest.raises(ValueError, match="4 predictions for 5 labels"):
        metrics.accuracy_report(np.zeros(4, int), np.zeros(5, int), 0.5)
    empty = metrics.accuracy_report(np.zeros(0, int), np.zeros(0, int), 0.5)
    assert math.isnan(empty.accuracy) and empty.n_samples == 0


# --- reading order ----------------------------------------------------------------------------
def _random_orders(rng, n_samples, max_panels, allow_ties=False):
    """Random true/predicted orders with PAD after a random number of panels (2..P)."""
    true = np.full((n_samples, max_panels), PAD, dtype=np.int16)
    predicted = np.full_like(true, PAD)
    for row in range(n_samples):
        n = rng.integers(2, max_panels + 1)
        true[row, :n] = rng.permutation(n)
        predicted[row, :n] = rng.integers(0, n, size=n) if allow_ties else rng.permutation(n)
    return predicted, true


@pytest.mark.parametrize("allow_ties", [False, True])
def test_kendall_tau_matches_scipy(allow_ties):
    rng = np.random.default_rng(1)
    predicted, true = _random_orders(rng, 60, 7, allow_ties)
    tau = metrics.kendall_tau(predicted, true)
    for row in range(60):
        valid = true[row] != PAD
        expected = stats.kendalltau(predicted[row, valid], true[row, valid]).statistic
        if np.isnan(expected):
            assert np.isnan(tau[row])
        else:
            assert tau[row] == pytest.approx(expected, abs=1e-12)


def test_pairwise_accuracy_and_exact_match_by_brute_force():
    rng = np.random.default_rng(2)
    predicted, true = _random_orders(rng, 50, 6, allow_ties=True)
    predicted[:5] = true[:5]  # some exact matches
    pairwise = metrics.pairwise_accuracy(predicted, true)
    exact = metrics.exact_match(predicted, true)
    for row in range(50):
        n = int((true[row] != PAD).sum())
        pairs = list(itertools.combinations(range(n), 2))
        right = sum(
            (predicted[row, i] - predicted[row, j]) * (true[row, i] - true[row, j]) > 0 for i, j in pairs
        )
        assert pairwise[row] == pytest.approx(right / len(pairs))
        assert exact[row] == bool(np.array_equal(predicted[row, :n], true[row, :n]))
    assert exact[:5].all()
    assert np.allclose(metrics.kendall_tau(true, true), 1.0)
    reversed_pred = np.where(true != PAD, (true != PAD).sum(1, keepdims=True) - 1 - true, PAD)
    assert np.allclose(metrics.kendall_tau(reversed_pred, true), -1.0)
    assert np.allclose(metrics.pairwise_accuracy(reversed_pred, true), 0.0)


def test_reading_order_report_chance_and_means():
    true = np.array([[1, 0, PAD, PAD], [2, 0, 1, PAD], [3, 1, 0, 2]])
    predicted = np.array([[1, 0, PAD, PAD], [0, 1, 2, PAD], [3, 1, 0, 2]])
    report = metrics.reading_order_report(predicted, true)
    assert report["exact_match"] == pytest.approx(2 / 3)
    assert report["exact_match_chance"] == pytest.approx((1 / 2 + 1 / 6 + 1 / 24) / 3)
    assert report["kendall_tau_chance"] == 0.0 and report["pairwise_accuracy_chance"] == 0.5
    tau_middle = stats.kendalltau([0, 1, 2], [2, 0, 1]).statistic
    assert report["kendall_tau"] == pytest.approx((1 + tau_middle + 1) / 3)
    assert report["pairwise_accuracy"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert report["n_samples"] == 3


def test_random_predictions_score_near_chance():
    rng = np.random.default_rng(3)
    predicted, true = _random_orders(rng, 3000, 5)
    report = metrics.reading_order_report(predicted, true)
    assert abs(report["kendall_tau"]) < 0.03
    assert report["pairwise_accuracy"] == pytest.approx(0.5, abs=0.02)
    assert report["exact_match"] == pytest.approx(report["exact_match_chance"], abs=0.02)


def test_single_panel_pages_are_undefined_not_perfect():
    true = np.array([[0, PAD, PAD]])
    assert np.isnan(metrics.kendall_tau(true, true)[0])
    assert np.isnan(metrics.pairwise_accuracy(true, true)[0])
    assert metrics.exact_match(true, true)[0]


def test_reading_order_rejects_mismatched_pad_and_bad_slots():
    true = np.array([[1, 0, PAD]])
    with pytest.raises(ValueError, match="PAD positions differ"):
        metrics.kendall_tau(np.array([[1, 0, 2]]), true)
    with pytest.raises(ValueError, match="outside 0..n-1"):
        metrics.kendall_tau(np.array([[1, 0, PAD]]), np.array([[1, 5, PAD]]))
    with pytest.raises(ValueError, match="prefix"):
        metrics.kendall_tau(np.array([[PAD, 0, 1]]), np.array([[PAD, 0, 1]]))
    with pytest.raises(ValueError, match=r"\(N, P\)"):
        metrics.kendall_tau(np.zeros((2, 3)), np.zeros((2, 4)))


# --- retrieval --------------------------------------------------------------------------------
def _brute_force_recall(queries, keys, relevance, k, exclude_self):
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    similarity = qn @ kn.T
    relevance = relevance.copy()
    if exclude_self:
        np.fill_diagonal(similarity, -np.inf)
        np.fill_diagonal(relevance, False)
    hits = []
    for row in range(len(queries)):
        if not relevance[row].any():
            continue
        top = np.argsort(-similarity[row])[:k]
        hits.append(relevance[row, top].any())
    return float(np.mean(hits))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_recall_at_k_matches_brute_force_and_chunking(exclude_self, monkeypatch):
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(40, 8))
    queries = keys + rng.normal(scale=1.5, size=keys.shape)
    relevance = rng.random((40, 40)) < 0.08
    expected = _brute_force_recall(queries, keys, relevance, 3, exclude_self)
    assert metrics.recall_at_k(queries, keys, relevance, 3, exclude_self) == pytest.approx(expected)
    monkeypatch.setattr(metrics, "_SIMILARITY_BUDGET_ELEMENTS", 7 * 40)  # 7-row chunks
    assert metrics.recall_at_k(queries, keys, relevance, 3, exclude_self) == pytest.approx(expected)
    # index form == boolean one-hot form
    index = rng.integers(0, 40, size=40)
    one_hot = np.zeros((40, 40), bool)
    one_hot[np.arange(40), index] = True
    assert metrics.recall_at_k(queries, keys, index, 3, exclude_self) == pytest.approx(
        _brute_force_recall(queries, keys, one_hot, 3, exclude_self))


def test_top_k_cosine_orders_scores_and_excludes_self():
    rng = np.random.default_rng(5)
    keys = rng.normal(size=(30, 4))
    chunks = list(metrics.top_k_cosine(keys, keys, 5, exclude_self=True, chunk_rows=8))
    assert [c[0].start for c in chunks] == [0, 8, 16, 24]
    top = np.concatenate([c[1] for c in chunks])
    scores = np.concatenate([c[2] for c in chunks])
    assert not (top == np.arange(30)[:, None]).any()
    assert (np.diff(scores, axis=1) <= 1e-7).all()


def test_view_retrieval_recall_at_1():
    rng = np.random.default_rng(6)
    view_a = rng.normal(size=(50, 16))
    assert metrics.view_retrieval_recall_at_1(view_a, view_a + 0.01 * rng.normal(size=view_a.shape)) == 1.0
    shuffled = view_a[rng.permutation(50)]
    assert metrics.view_retrieval_recall_at_1(view_a, shuffled) < 0.2
    with pytest.raises(ValueError, match="same shape"):
        metrics.view_retrieval_recall_at_1(view_a, view_a[:10])


def test_recall_rejects_bad_input():
    keys = np.ones((5, 3))
    with pytest.raises(ValueError, match="k must be in 1..4"):
        metrics.recall_at_k(keys, keys, np.arange(5), k=5, exclude_self=True)
    with pytest.raises(ValueError, match="NaN"):
        metrics.recall_at_k(np.full((5, 3), np.nan), keys, np.arange(5), k=1)
    with pytest.raises(ValueError, match="dimension"):
        metrics.recall_at_k(np.ones((5, 2)), keys, np.arange(5), k=1)


def test_same_comic_recall_planted_clusters_and_chance():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, 12))
    comic_ids = np.repeat([f"c{i}" for i in range(6)], [5, 5, 4, 4, 3, 1])
    comic_of_row = np.repeat(np.arange(6), [5, 5, 4, 4, 3, 1])
    strips = centres[comic_of_row] + 0.05 * rng.normal(size=(22, 12))
    result = metrics.same_comic_recall_at_k(strips, comic_ids, k=2)
    assert result.recall == 1.0
    recall, chance = result  # unpacks as a pair
    assert (recall, chance) == (result.recall, result.chance)
    # chance by brute force: enumerate every k-subset of the other pages
    n, k = 22, 2
    expected = []
    for row in range(n):
        m = int((comic_of_row == comic_of_row[row]).sum())
        if m < 2:
            continue
        others = [comic_of_row[j] == comic_of_row[row] for j in range(n) if j != row]
        subsets = list(itertools.combinations(others, k))
        expected.append(np.mean([any(s) for s in subsets]))
    assert result.chance == pytest.approx(np.mean(expected))
    random_strips = rng.normal(size=(22, 12))
    assert metrics.same_comic_recall_at_k(random_strips, comic_ids, k=2).recall < 1.0


# --- cluster bootstrap --------------------------------------------------------------------------
def test_cluster_bootstrap_is_wider_than_wilson_when_comics_differ_and_seeded():
    rng = np.random.default_rng(0)
    # 20 comics x 50 samples: a model right on all of half the comics and wrong on the rest is
    # 50% accurate, but the 1000 samples are worth ~20 independent ones
    clusters = np.repeat(np.arange(20), 50)
    correct = (clusters % 2 == 0).astype(float)
    low, high = metrics.cluster_bootstrap_interval(correct, clusters, seed=1)
    w_low, w_high = metrics.wilson_interval(int(correct.sum()), correct.size)
    assert low < 0.5 < high and (high - low) > 3 * (w_high - w_low)
    assert metrics.cluster_bootstrap_interval(correct, clusters, seed=1) == (low, high)
    # independent samples, one per comic: close to Wilson
    values = (rng.random(2000) < 0.7).astype(float)
    low, high = metrics.cluster_bootstrap_interval(values, np.arange(2000), seed=0)
    w_low, w_high = metrics.wilson_interval(int(values.sum()), 2000)
    assert abs(low - w_low) < 0.01 and abs(high - w_high) < 0.01
    assert metrics.cluster_bootstrap_interval(np.ones(5), np.zeros(5)) == (0.0, 1.0)  # one comic
    report = metrics.accuracy_report(np.zeros(1000, int), 1 - correct.astype(int), 0.5, clusters=clusters)
    assert report.ci_method == "cluster_bootstrap" and report.accuracy == 0.5
    with pytest.raises(ValueError, match="values and clusters"):
        metrics.cluster_bootstrap_interval(np.ones(3), np.zeros(4))
