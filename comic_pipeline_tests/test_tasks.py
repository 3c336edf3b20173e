"""Task generation rules (DESIGN §4): splits, distractors, labels, reading order, seeding."""

import dataclasses

import numpy as np
import pytest

from comic_pipeline import corpus, sampling, tasks
from comic_pipeline.schema import MASK, PAD, SPLITS, TASK_NAMES, load_task_dataset, save_task_dataset
from comic_pipeline.splits import assign_splits

CONFIG = dataclasses.replace(corpus.SIZES["tiny"], n_comics=30)
DISTRACTOR_TASKS = ("sequence_filling", "visual_closure", "text_closure", "caption_relevance", "text_cloze")
TEXT_OPTION_TASKS = ("text_closure", "text_cloze")


@pytest.fixture(scope="module")
def features():
    return corpus.corpus_features(CONFIG)


@pytest.fixture(scope="module")
def split_of(features):
    ids = sorted(set(features.comic_ids))
    return {comic: SPLITS[i % 3] for i, comic in enumerate(ids)}  # every split has 10 comics


@pytest.fixture(scope="module")
def datasets(features, split_of):
    return {task: tasks.generate_task(task, features, split_of, tasks.TaskConfig(seed=3))
            for task in TASK_NAMES}


@pytest.fixture(scope="module")
def easy_datasets(features, split_of):
    config = tasks.TaskConfig(seed=3, distractors="easy")
    return {task: tasks.generate_task(task, features, split_of, config) for task in DISTRACTOR_TASKS}


def all_samples(dataset):
    """Every split's samples with a `split` field added."""
    parts = [dict(samples.fields(), split=np.full(dataset.n_samples(s), s))
             for s, samples in dataset.splits.items() if dataset.n_samples(s)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def option_content(dataset, features, refs):
    """(N, K, X) what each option shows: a panel's fused vector, or its whole text for text options."""
    P = features.max_panels
    rows, slots = refs // P, refs % P
    if dataset.task in TEXT_OPTION_TASKS:
        text = features.text * features.text_mask[..., None]
        return text[rows, slots].reshape(*refs.shape, -1)
    return features.fused[rows, slots]


# --- splits -------------------------------------------------------------------------------------
def test_assign_splits_is_stable_per_comic_and_roughly_proportional():
    ids = [f"comic-{i}" for i in range(3000)]
    splits = assign_splits(ids)
    assert set(splits.values()) == set(SPLITS)
    # a comic keeps its split whatever else exists, and in any order
    assert assign_splits(ids[:7][::-1]) == {c: splits[c] for c in ids[:7]}
    assert all(assign_splits([c])[c] == splits[c] for c in ids[:50])
    shares = np.array([sum(v == s for v in splits.values()) for s in SPLITS]) / len(ids)
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.03)
    assert assign_splits(ids[:200], salt="other") != {c: splits[c] for c in ids[:200]}
    assert set(assign_splits(ids[:100], fractions=(0, 0, 1)).values()) == {"test"}
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(ids, fractions=(0.5, 0.5))


def test_no_comic_in_two_splits_and_samples_follow_their_comic(datasets, split_of):
    for task, dataset in datasets.items():
        seen = {}
        for split, samples in dataset.splits.items():
            comics = set(dataset.comic_ids[samples.page]) if dataset.n_samples(split) else set()
            assert all(split_of[c] == split for c in comics), task
            for c in comics:
                assert seen.setdefault(c, split) == split, f"{task}: {c} in two splits"
        assert sum(dataset.attrs["samples"].values()) > 50, task


# --- distractors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["hard", "easy"])
def test_distractors_come_from_the_same_split_and_the_policy_source(datasets, easy_datasets, policy, split_of):
    chosen = datasets if policy == "hard" else easy_datasets
    for task in DISTRACTOR_TASKS:
        dataset = chosen[task]
        s = all_samples(dataset)
        P = dataset.max_panels
        rows = s["options"] // P
        answer_row = np.take_along_axis(rows, s["label"][:, None].astype(int), axis=1)[:, 0]
        is_distractor = np.arange(rows.shape[1])[None] != s["label"][:, None]
        option_split = np.vectorize(split_of.get)(dataset.comic_ids[rows])
        assert (option_split == s["split"][:, None]).all(), f"{task}: an option from another split"
        same_comic = dataset.comic_ids[rows] == dataset.comic_ids[s["page"]][:, None]
        assert (answer_row == s["page"]).all(), task  # the answer is on the context page
        if task == "text_cloze":
            hard = s["variant"] == 1
            assert hard.any() and (~hard).any()
            assert same_comic[hard][is_distractor[hard]].all()
            assert not same_comic[~hard][is_distractor[~hard]].any()
            page_gap = np.abs(dataset.page_numbers[rows] - dataset.page_numbers[s["page"]][:, None])
            assert (page_gap[hard][is_distractor[hard]] <= dataset.attrs["hard_page_window"]).all()
            assert (page_gap[hard][is_distractor[hard]] >= 1).all()
        elif policy == "hard":
            assert same_comic[is_distractor].all(), task
            other_page = rows != s["page"][:, None]
            assert other_page[is_distractor].all(), f"{task}: a distractor from the context page"
        else:
            assert not same_comic[is_distractor].any(), task


def test_answer_never_visible_in_the_context(datasets):
    for task in DISTRACTOR_TASKS + ("character_coherence",):
        s = all_samples(datasets[task])
        P = datasets[task].max_panels
        answer = np.take_along_axis(s["options"], s["label"][:, None].astype(int), axis=1)[:, 0]
        answer_slot = answer % P
        assert not (s["context"] == answer_slot[:, None]).any(), f"{task}: answer slot in the context"
        if task == "sequence_filling":
            mask_at = np.argmax(s["context"] == MASK, axis=1)
            assert ((s["context"] == MASK).sum(axis=1) == 1).all()
            np.testing.assert_array_equal(mask_at, answer_slot)  # the mask stands where it was
        if task == "caption_relevance":
            assert (s["context"] == PAD).all()
            np.testing.assert_array_equal(s["caption_of"], answer - 1)  # the caption of panel s
        if task in TEXT_OPTION_TASKS:
            np.testing.assert_array_equal(s["option_visual"], answer)
        if task == "text_cloze":
            first = s["context"][:, 0].astype(int)
            np.testing.assert_array_equal(s["context"][:, :3], first[:, None] + np.arange(3))
            np.testing.assert_array_equal(first + 3, answer_slot)
            assert (s["context"][:, 3:] == PAD).all()
        if task in ("visual_closure", "text_closure", "character_coherence"):
            n_context = (s["context"] != PAD).sum(axis=1)
            np.testing.assert_array_equal(n_context, answer_slot)  # panels 1..s, then s+1


def duplicated_features(features):
    """Features in which some panels of one page reappear (same content) on other pages."""
    copy = dataclasses.replace(features, fused=features.fused.copy(), text=features.text.copy(),
                               text_mask=features.text_mask.copy(), visual=features.visual.copy(),
                               caption=features.caption.copy())
    rows = np.flatnonzero(features.comic_ids == features.comic_ids[0])
    for target in rows[1:]:
        copy.fused[target, 1] = copy.fused[rows[0], 0]  # repeated panel, e.g. a recap
        copy.fused[target, 2] = copy.fused[rows[0], 1]
        copy.text[target, 1] = copy.text[rows[0], 0]
        copy.text_mask[target, 1] = copy.text_mask[rows[0], 0]
    return copy


@pytest.mark.parametrize("task", DISTRACTOR_TASKS)
def test_no_distractor_equals_the_answer_or_the_context_nor_another_option(task, features, split_of):
    dup = duplicated_features(features)
    for policy in ("hard", "easy"):
        dataset = tasks.generate_task(task, dup, split_of, tasks.TaskConfig(seed=1, distractors=policy))
        s = all_samples(dataset)
        P = dataset.max_panels
        options = s["options"]
        K = options.shape[1]
        # by reference
        assert all(len(set(row)) == K for row in options.tolist()), "duplicate option refs"
        # by content: no two options look the same
        content = option_content(dataset, dup, options)  # (N, K, X)
        same = (content[:, :, None] == content[:, None, :]).all(axis=-1)
        assert same.sum() == same.shape[0] * K, f"{task}/{policy}: two options with equal content"
        # and no option looks like a context panel
        context = s["context"].astype(int)
        in_context = context >= 0
        if task == "caption_relevance":
            context = (s["caption_of"] % P)[:, None]
            in_context = np.ones_like(context, dtype=bool)
        ctx_refs = s["page"][:, None].astype(np.int64) * P + np.maximum(context, 0)
        ctx_content = option_content(dataset, dup, ctx_refs)
        equal = (content[:, :, None] == ctx_content[:, None, :]).all(axis=-1) & in_context[:, None, :]
        if task in TEXT_OPTION_TASKS:  # silent context panels have no text to be equal to
            equal &= dup.text_mask[s["page"][:, None], np.maximum(context, 0), 0][:, None, :]
        assert not equal.any(), f"{task}/{policy}: an option equals a context panel"


@pytest.mark.parametrize("policy", ["hard", "easy"])
def test_distractors_stand_at_the_answer_slot(datasets, easy_datasets, policy):
    """An option's page position never tells the answer: every distractor comes from the
    answer's own slot, so a slot-only model is at chance (DESIGN §4)."""
    chosen = datasets if policy == "hard" else easy_datasets
    for task in DISTRACTOR_TASKS:
        dataset = chosen[task]
        s = all_samples(dataset)
        slots = s["options"] % dataset.max_panels
        assert (slots == slots[:, :1]).all(), f"{task}/{policy}: a distractor from another slot"
        assert dataset.attrs["slot_matched"] is True
        oracle = tasks.slot_oracle_accuracy(dataset, "test")
        assert oracle == dataset.attrs["slot_oracle_accuracy"]
        assert oracle == pytest.approx(dataset.attrs["chance"], abs=1e-3), (task, policy, oracle)


def test_an_answer_equal_to_a_context_panel_by_content_is_dropped(features, split_of):
    dup = duplicated_features(features)
    repeated = np.flatnonzero(features.panel_mask.sum(axis=1) >= 4)
    for name in ("fused", "visual", "caption"):  # a panel repeated on its own page (a recap)
        getattr(dup, name)[repeated, 3] = getattr(dup, name)[repeated, 1]
    dup.text[repeated, 3], dup.text_mask[repeated, 3] = dup.text[repeated, 1], dup.text_mask[repeated, 1]
    for task in DISTRACTOR_TASKS:
        dataset = tasks.generate_task(task, dup, split_of, tasks.TaskConfig(seed=1))
        s = all_samples(dataset)
        P = dataset.max_panels
        answer = np.take_along_axis(s["options"], s["label"][:, None].astype(int), axis=1)
        context = s["context"].astype(int)
        if "caption_of" in s:
            context = (s["caption_of"] % P)[:, None]
        in_context = context >= 0
        ctx_refs = s["page"][:, None].astype(np.int64) * P + np.maximum(context, 0)
        equal = (option_content(dataset, dup, answer)[:, :, None]
                 == option_content(dataset, dup, ctx_refs)[:, None, :]).all(axis=-1) & in_context[:, None, :]
        if task in TEXT_OPTION_TASKS:  # silent context panels have no text to be equal to
            equal &= dup.text_mask[s["page"][:, None], np.maximum(context, 0), 0][:, None, :]
        assert not equal.any(), f"{task}: the answer repeats a context panel"
    # the repeated panels are there to be dropped
    assert tasks.generate_task("visual_closure", dup, split_of).attrs["dropped_answer_in_context"] > 0


def test_the_answer_position_is_uniform_and_uncorrelated(features, split_of):
    for task in DISTRACTOR_TASKS + ("character_coherence",):
        dataset = tasks.generate_task(task, features, split_of, tasks.TaskConfig(seed=5, samples_per_page=8))
        s = all_samples(dataset)
        K = dataset.attrs["n_options"]
        label = s["label"].astype(int)
        counts = np.bincount(label, minlength=K)
        expected = len(label) / K
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 25, f"{task}: label counts {counts}"  # df <= 4: p < 1e-4 only if biased
        answer = np.take_along_axis(s["options"], label[:, None], axis=1)[:, 0]
        for name, other in (("slot", answer % dataset.max_panels), ("page", s["page"])):
            r = np.corrcoef(label, other)[0, 1]
            assert abs(r) < 4 / np.sqrt(len(label)), f"{task}: label correlates with {name} (r={r:.3f})"


def similarity_draw(n_refs, n=3000, n_candidates=24, shift=0.8, seed=0):
    """Answer and candidate similarities to n_refs correlated references; the answer is more like
    its context than most candidates (as a panel of the context's own page is): about half the
    answers have fewer than 4 candidates above them on a reference, one in eight none."""
    rng = np.random.default_rng(seed)
    candidate_sim = (0.7 * rng.normal(size=(n, n_candidates, 1))
                     + 0.5 * rng.normal(size=(n, n_candidates, n_refs)))  # (n, C, F)
    answer_sim = shift + 0.5 * rng.normal(size=(n, n_refs))  # (n, F)
    eligible = rng.random((n, n_candidates)) < 0.8
    return answer_sim, candidate_sim, eligible


@pytest.mark.parametrize("n_refs", [1, 2, 3])
def test_matched_distractors_put_the_answer_at_a_uniform_rank_on_every_reference(n_refs):
    """On each reference the number of distractors below the answer is uniform in 0..K-1, even
    though many answers have too few candidates above them to be anything but on top."""
    answer_sim, candidate_sim, eligible = similarity_draw(n_refs)
    n_pick = 4
    n_above = ((candidate_sim >= answer_sim[:, None, :]) & eligible[..., None]).sum(axis=1)
    assert (n_above == 0).mean() > 0.1 and (n_above < n_pick).mean() > 0.4  # the hard case
    picks, ok = sampling._choose_distractors(np.random.default_rng(1), answer_sim, candidate_sim,
                                             eligible, n_pick, match=True)
    assert ok.all() and np.take_along_axis(eligible, picks, axis=1).all()
    assert (np.diff(np.sort(picks, axis=1), axis=1) > 0).all(), "a candidate picked twice"
    picked = np.take_along_axis(candidate_sim, picks[..., None], axis=1)  # (n, k, F)
    below = (picked < answer_sim[:, None, :]).sum(axis=1)  # (n, F)
    for f in range(n_refs):
        share = np.bincount(below[:, f], minlength=n_pick + 1) / len(below)
        np.testing.assert_allclose(share, 1 / (n_pick + 1), atol=0.03, err_msg=f"reference {f}")


def test_with_one_reference_and_candidates_to_spare_the_nearest_below_and_above_are_taken():
    """F = 1: r ~ U{0..k} nearest candidates below the answer, the other k - r nearest above."""
    rng = np.random.default_rng(2)
    n, n_candidates, n_pick = 2000, 40, 4
    candidate_sim = rng.uniform(-1, 1, size=(n, n_candidates, 1))
    answer_sim = np.zeros((n, 1))
    eligible = np.ones((n, n_candidates), dtype=bool)
    picks, ok = sampling._choose_distractors(rng, answer_sim, candidate_sim, eligible, n_pick, match=True)
    delta = candidate_sim[..., 0]  # (n, C)
    r = (np.take_along_axis(delta, picks, axis=1) < 0).sum(axis=1)
    np.testing.assert_allclose(np.bincount(r, minlength=n_pick + 1) / n, 1 / (n_pick + 1), atol=0.03)
    by_nearness = np.argsort(np.abs(delta), axis=1)
    for row in range(0, n, 97):
        near_below = [c for c in by_nearness[row] if delta[row, c] < 0][:r[row]]
        near_above = [c for c in by_nearness[row] if delta[row, c] >= 0][:n_pick - r[row]]
        assert sorted(picks[row]) == sorted(near_below + near_above)


# --- reading order ---------------------------------------------------------------------------------
def test_reading_order_input_carries_no_trace_of_the_true_order(datasets, features):
    dataset = datasets["reading_order"]
    for samples in dataset.splits.values():
        assert set(samples.fields()) == {"page", "order"}  # the order array is the only place the truth lives
    s = all_samples(dataset)
    order = s["order"].astype(int)
    n_panels = features.panel_mask.sum(axis=1)[s["page"]]
    valid = np.arange(order.shape[1])[None] < n_panels[:, None]
    np.testing.assert_array_equal(order != PAD, valid)
    for row, n in zip(order, n_panels):
        assert sorted(row[:n]) == list(range(n))  # a permutation of the page's panels
    # Kendall tau of input position vs true slot: ~0 on average
    i, j = np.triu_indices(order.shape[1], k=1)
    pair = valid[:, i] & valid[:, j]
    concordance = np.sign(order[:, j] - order[:, i]) * pair
    tau = concordance.sum(axis=1) / pair.sum(axis=1)
    assert abs(tau.mean()) < 4 * tau.std() / np.sqrt(len(tau))
    assert np.mean([np.array_equal(r[:n], np.arange(n)) for r, n in zip(order, n_panels)]) < 0.05
    assert 0 < dataset.attrs["chance"] < 0.2


# --- structure, seeding, skipping -------------------------------------------------------------
def test_character_coherence_offers_the_true_and_the_swapped_box_order(datasets, features):
    s = all_samples(datasets["character_coherence"])
    assert (s["options"][:, 0] == s["options"][:, 1]).all()
    P = features.max_panels
    n_boxes = features.text_mask.sum(axis=2)[s["options"][:, 0] // P, s["options"][:, 0] % P]
    assert (n_boxes >= 2).all()
    B = features.max_boxes
    true = np.where(np.arange(B)[None] < n_boxes[:, None], np.arange(B)[None], PAD)
    label = s["label"].astype(int)
    np.testing.assert_array_equal(s["box_order"][np.arange(len(label)), label], true)
    wrong = s["box_order"][np.arange(len(label)), 1 - label]
    np.testing.assert_array_equal(wrong[:, :2], true[:, [1, 0]])
    np.testing.assert_array_equal(wrong[:, 2:], true[:, 2:])


def test_same_seed_same_arrays_other_seed_other_arrays(features, split_of, datasets):
    for task in TASK_NAMES:
        again = tasks.generate_task(task, features, split_of, tasks.TaskConfig(seed=3))
        other = tasks.generate_task(task, features, split_of, tasks.TaskConfig(seed=4))
        for split, samples in datasets[task].splits.items():
            for name, array in samples.fields().items():
                np.testing.assert_array_equal(array, again.splits[split].fields()[name], err_msg=f"{task}/{name}")
        assert any(not np.array_equal(a, other.splits["train"].fields().get(name))
                   for name, a in datasets[task].splits["train"].fields().items()), task


def test_a_fused_only_store_skips_the_tasks_it_cannot_make(split_of):
    fused_only = corpus.corpus_features(corpus.with_modalities(CONFIG, ["fused"]))
    made = {}
    for task in TASK_NAMES:
        try:
            made[task] = tasks.generate_task(task, fused_only, split_of)
        except tasks.TaskSkipped as skipped:
            assert "needs" in skipped.reason and "fused" in skipped.reason
            made[task] = None
    assert {t for t, d in made.items() if d is None} == {"text_closure", "caption_relevance",
                                                         "character_coherence", "text_cloze"}
    for task in ("sequence_filling", "visual_closure", "reading_order"):
        assert made[task].n_samples("train") > 0


def test_a_text_only_store_runs_the_text_tasks_in_their_text_only_form(split_of):
    # COMICS imported as text: fused (the mean of a panel's boxes) and text, no visual or caption
    text_only = corpus.corpus_features(corpus.with_modalities(CONFIG, ["fused", "text"]))
    for task in TASK_NAMES:
        spec = tasks.TASKS[task]
        if spec.missing(text_only.modalities):
            with pytest.raises(tasks.TaskSkipped, match="caption"):
                tasks.generate_task(task, text_only, split_of)
            continue
        dataset = tasks.generate_task(task, text_only, split_of)
        assert dataset.n_samples("train") > 0, task
    assert tasks.TASKS["caption_relevance"].missing(text_only.modalities)
    assert tasks.TASKS["character_coherence"].option_modalities(text_only.modalities) == ("text",)


def test_pages_too_short_or_silent_are_skipped_not_padded(features, split_of):
    short = dataclasses.replace(features, panel_mask=features.panel_mask.copy(),
                                text_mask=features.text_mask.copy())
    short.panel_mask[::2, 1:] = False  # every other page has a single panel
    short.text_mask[1::4] = False  # and some pages have no text at all
    one_panel, silent = np.arange(short.n_pages)[::2], np.arange(short.n_pages)[1::4]
    for task in TASK_NAMES:
        # any-slot distractors: this corpus has too few same-slot pages left for every task
        dataset = tasks.generate_task(task, short, split_of, tasks.TaskConfig(slot_matched=False))
        s = all_samples(dataset)
        assert not np.isin(s["page"], one_panel).any(), f"{task} used a one-panel page"
        if task in ("text_closure", "text_cloze", "character_coherence"):
            assert not np.isin(s["page"], silent).any(), f"{task} used a page without text"
            P = dataset.max_panels
            refs = s["option_visual"] if "option_visual" in s else s["options"][:, 0]
            assert short.text_mask[refs // P, refs % P, 0].all()
        if task in DISTRACTOR_TASKS:
            P = dataset.max_panels
            assert short.panel_mask[s["options"] // P, s["options"] % P].all()  # no padded option
            if task in TEXT_OPTION_TASKS:
                assert short.text_mask[s["options"] // P, s["options"] % P, 0].all()


def test_bad_input_raises_naming_the_problem(features, split_of):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate_task("panel_poetry", features, split_of)
    partial = dict(split_of)
    partial.pop("demo-0004")
    with pytest.raises(ValueError, match="demo-0004"):
        tasks.generate_task("visual_closure", features, partial)
    with pytest.raises(ValueError, match="holdout"):
        tasks.generate_task("visual_closure", features, {**split_of, "demo-0001": "holdout"})
    with pytest.raises(ValueError, match="distractors"):
        tasks.TaskConfig(distractors="medium")
    with pytest.raises(ValueError, match="samples_per_page"):
        tasks.TaskConfig(samples_per_page=0)


def test_options_and_samples_per_page_are_configurable(features, split_of):
    config = tasks.TaskConfig(n_options={"visual_closure": 3}, samples_per_page={"visual_closure": 1})
    dataset = tasks.generate_task("visual_closure", features, split_of, config)
    s = all_samples(dataset)
    assert s["options"].shape[1] == 3 and dataset.attrs["chance"] == pytest.approx(1 / 3)
    assert len(np.unique(s["page"])) == len(s["page"])  # one sample per page


def test_datasets_round_trip_through_the_schema_file(datasets, tmp_path):
    dataset = datasets["text_cloze"]
    save_task_dataset(str(tmp_path / "text_cloze.npz"), dataset)
    loaded = load_task_dataset(str(tmp_path / "text_cloze.npz"))
    assert loaded.attrs == dataset.attrs
    for split, samples in dataset.splits.items():
        assert type(loaded.splits[split]) is type(samples)
        for name, array in samples.fields().items():
            np.testing.assert_array_equal(loaded.splits[split].fields()[name], array)
