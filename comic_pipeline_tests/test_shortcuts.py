"""The shortcut audit on the demo corpus, and proof that its tasks are still learnable.

Acceptance bar: no label-free heuristic beats chance by more than 5 points on any task, while a
linear probe fit on the train split beats chance by at least 25 points. A corpus of pure noise
would pass the first and fail the second; the prototype's same-page distractors fail the first.
"""

import dataclasses

import numpy as np
import pytest

from comic_pipeline import corpus, shortcuts, tasks
from comic_pipeline.schema import SPLITS, TASK_NAMES
from comic_pipeline.splits import assign_splits

MAX_MARGIN = 0.05
PROBE_MARGIN = 0.25


@pytest.fixture(scope="module")
def demo():
    features = corpus.corpus_features(corpus.SIZES["demo"])
    split_of = assign_splits(sorted(set(features.comic_ids)))
    datasets = {task: tasks.generate_task(task, features, split_of, tasks.TaskConfig())
                for task in TASK_NAMES}
    return features, split_of, datasets


@pytest.mark.parametrize("split", ["test", "all"])
def test_no_heuristic_beats_chance_by_more_than_5_points(demo, split):
    features, _, datasets = demo
    table = shortcuts.shortcut_table(datasets, features, split)
    assert set(table["task"]) >= set(TASK_NAMES)
    assert set(table["heuristic"]) == (set(shortcuts.HEURISTICS) | set(shortcuts.ORDER_HEURISTICS)
                                       | {shortcuts.SLOT_ORACLE})
    assert (table["n"] >= 500).all(), "too few samples for the audit to mean anything"
    worst = table.loc[table["margin"].idxmax()]
    assert worst["margin"] <= MAX_MARGIN, (
        f"{worst['heuristic']} solves {worst['task']} ({worst['metric']}) at {worst['value']:.3f} "
        f"vs chance {worst['chance']:.3f}:\n{shortcuts.margin_matrix(table).round(3).to_string()}")


def test_the_audit_catches_the_prototype_shortcuts(demo):
    """Without similarity matching the same corpus is solvable by similarity, and options with
    duplicates (sampling with replacement) are solved by duplicates_nothing: the audit can fail."""
    features, split_of, datasets = demo
    unmatched = tasks.generate_task("visual_closure", features, split_of,
                                    tasks.TaskConfig(match_similarity=False))
    accuracy = shortcuts.shortcut_accuracies(unmatched, features, "test")
    assert accuracy["most_similar_to_last_context"] > 0.2 + 0.10  # far above the bar, not just over it

    # prototype-like: every distractor is the same panel drawn again
    with_replacement = dataclasses.replace(datasets["visual_closure"], splits={
        split: dataclasses.replace(samples) for split, samples in datasets["visual_closure"].splits.items()})
    test = with_replacement.splits["test"]
    options, label = test.options.copy(), test.label.astype(int)
    first_distractor = np.where(label == 0, options[:, 1], options[:, 0])
    distractor = np.arange(options.shape[1])[None] != label[:, None]
    options[distractor] = np.repeat(first_distractor, options.shape[1] - 1)
    test.options = options
    assert shortcuts.shortcut_accuracies(with_replacement, features, "test")["duplicates_nothing"] > 0.95


def test_a_planted_slot_signature_is_flagged_with_any_slot_distractors_and_not_with_slot_matched():
    """Real panels carry their page position. With a per-slot signature planted in every panel,
    the slot oracle (asked position + option slots, fit on train) solves the old any-slot sampling
    and is at chance once distractors come from the answer's slot."""
    config = dataclasses.replace(corpus.SIZES["tiny"], n_comics=60, slot_signature=0.5)
    features = corpus.corpus_features(config)
    split_of = assign_splits(sorted(set(features.comic_ids)))
    for task in ("sequence_filling", "visual_closure", "text_closure", "caption_relevance", "text_cloze"):
        old = tasks.generate_task(task, features, split_of, tasks.TaskConfig(slot_matched=False))
        new = tasks.generate_task(task, features, split_of, tasks.TaskConfig())
        chance = new.attrs["chance"]
        flagged = shortcuts.shortcut_accuracies(old, features, "all")[shortcuts.SLOT_ORACLE]
        assert flagged > chance + 0.3, (task, flagged)
        matched = shortcuts.shortcut_accuracies(new, features, "all")[shortcuts.SLOT_ORACLE]
        assert matched <= chance + 0.05, (task, matched)


def test_the_learned_option_only_baseline_sees_the_planted_signature_only_with_any_slot_distractors():
    config = dataclasses.replace(corpus.SIZES["tiny"], n_comics=60, slot_signature=0.5)
    features = corpus.corpus_features(config)
    split_of = assign_splits(sorted(set(features.comic_ids)))
    for task in ("visual_closure", "text_cloze"):
        old = tasks.generate_task(task, features, split_of, tasks.TaskConfig(slot_matched=False))
        new = tasks.generate_task(task, features, split_of, tasks.TaskConfig())
        chance = new.attrs["chance"]
        assert shortcuts.option_only_accuracy(old, features, "test") > chance + 0.3, task
        # ~100 test samples: a standard error of ~5 points
        assert shortcuts.option_only_accuracy(new, features, "test") <= chance + 0.1, task


def test_ties_are_broken_at_random():
    """Identical option scores give a uniform choice, so an uninformative heuristic sits at chance."""
    chosen = shortcuts._pick(np.zeros((20000, 4)), np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(chosen, minlength=4) / 20000, 0.25, atol=0.02)
    scores = np.array([[0.1, 0.5, 0.5, 0.2]] * 1000)
    assert set(shortcuts._pick(scores, np.random.default_rng(0))) == {1, 2}


def test_predictions_have_one_choice_per_sample(demo):
    features, _, datasets = demo
    for task, dataset in datasets.items():
        predictions = shortcuts.shortcut_predictions(dataset, features, "val", seed=1)
        n = dataset.n_samples("val")
        for name, chosen in predictions.items():
            if tasks.TASKS[task].family == "order":
                assert chosen.shape == (n, dataset.max_panels)
                valid = dataset.splits["val"].order >= 0
                for row, ok in zip(chosen[:50], valid[:50]):
                    assert sorted(row[ok]) == list(range(ok.sum()))  # a permutation
            else:
                assert chosen.shape == (n,) and chosen.min() >= 0
                assert chosen.max() < dataset.attrs["n_options"]


# --- learnability: linear probes fit on train, scored on val and test --------------------------
def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


def ridge(x, y, strength=1.0):
    return np.linalg.solve(x.T @ x + strength * np.eye(x.shape[1]), x.T @ y)


def probe_accuracy(dataset, inputs, targets, input_refs, split_fields=SPLITS):
    """Ridge from inputs[input_refs(fields)] to targets[answer] on train; on each other split pick
    the option whose target vector is nearest (cosine) to the prediction."""
    def answer(fields):
        return np.take_along_axis(fields.options, fields.label[:, None].astype(int), axis=1)[:, 0]

    train = dataset.splits["train"]
    weights = ridge(inputs[input_refs(train)], targets[answer(train)])
    accuracy = {}
    for split in ("val", "test"):
        fields = dataset.splits[split]
        predicted = unit(inputs[input_refs(fields)] @ weights)  # (N, D)
        scores = np.einsum("nkd,nd->nk", targets[fields.options], predicted)
        accuracy[split] = float(np.mean(np.argmax(scores, axis=1) == fields.label))
    return accuracy


def test_visual_closure_is_learnable_by_a_linear_probe(demo):
    features, _, datasets = demo
    dataset = datasets["visual_closure"]
    P = features.max_panels
    fused = unit(features.fused).reshape(-1, features.dim)

    def last_context_panel(fields):
        last = (fields.context >= 0).sum(axis=1) - 1
        return fields.page.astype(np.int64) * P + fields.context[np.arange(len(last)), last]

    accuracy = probe_accuracy(dataset, fused, fused, last_context_panel)
    print("visual_closure linear probe", accuracy)
    for split, value in accuracy.items():
        assert value >= dataset.attrs["chance"] + PROBE_MARGIN, (split, value)


@pytest.mark.parametrize("task", ["text_closure", "text_cloze"])
def test_text_tasks_are_learnable_by_a_linear_probe(demo, task):
    """Regress a panel's mean text from its visual; pick the option text nearest the prediction."""
    features, _, datasets = demo
    dataset = datasets[task]
    visual = unit(features.visual).reshape(-1, features.dim)
    boxes = unit(features.text) * features.text_mask[..., None]
    panel_text = unit(boxes.sum(axis=2)).reshape(-1, features.dim)
    accuracy = probe_accuracy(dataset, visual, panel_text, lambda fields: fields.option_visual)
    print(f"{task} linear probe", accuracy)
    for split, value in accuracy.items():
        assert value >= dataset.attrs["chance"] + PROBE_MARGIN, (split, value)


def test_the_audit_command_prints_margins_before_and_after():
    from comic_pipeline import audit

    after = audit.audit_table(size="tiny", split="test", sampling="new", slot_signature=0.5)
    before = audit.audit_table(size="tiny", split="test", sampling="old", slot_signature=0.5)
    for matrix in (before, after):
        assert {"slot_oracle", audit.OPTION_ONLY} <= set(matrix.index)
        assert "visual_closure" in matrix.columns
    # the planted per-slot trace gives the old sampling away to the slot oracle, not the new one
    assert before.loc["slot_oracle", "visual_closure"] > 0.2
    assert after.loc["slot_oracle", "visual_closure"] < 0.1
