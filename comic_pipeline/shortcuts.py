"""The shortcut audit: label-free heuristics that answer a task without learning anything, and
the slot oracle (fit on train; it knows only the asked position and each option's source slot).

A task set is only worth training on when none of these beats chance by much: the prototype drew
distractors from the same page with replacement, and "pick the option with no duplicate" or "pick
the option least like the context" solved most of its questions. Every heuristic here scores the
options in the modality they live in (fused panel vectors for panel options, a panel's mean text
for text options, the first box shown for box orders) against the sample's context in the same
modality (for caption_relevance: its caption). Ties are broken at random (seeded), so a heuristic
with nothing to go on is exactly at chance.

Reading order has its own heuristics, scored by exact match (chance: mean 1/n!; what
shortcut_accuracies reports, like evaluation's reading-order accuracy), pairwise accuracy (chance
0.5) and Kendall's tau (chance 0).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from comic_pipeline import metrics
from comic_pipeline.schema import (
    MASK,
    PAD,
    SPLITS,
    OptionSamples,
    OrderSamples,
    PageFeatures,
    Samples,
    TaskDataset,
    page_table_matches,
)
from comic_pipeline.sampling import expected_accuracy
from comic_pipeline.tasks import TASK_NAMES, OptionTask, slot_oracle_scores, spec_of

HEURISTICS: tuple[str, ...] = (
    "most_similar_to_context_mean",
    "least_similar_to_context_mean",
    "most_similar_to_last_context",
    "least_similar_to_last_context",
    "duplicates_nothing",
    "duplicates_context",  # the option that repeats a context panel by content
    "largest_norm",
    "smallest_norm",
    "odd_one_out",  # least like the other options
    "most_like_other_options",
    # the option whose similarity is the median one: matched distractors cluster around the
    # answer, so a careless matcher would leave the answer in the middle
    "median_similarity_to_context_mean",
    "median_similarity_to_last_context",
)
# Fit on the train split, no context: knows only the asked position and each option's source slot
SLOT_ORACLE = "slot_oracle"
ORDER_HEURISTICS: tuple[str, ...] = ("keep_input_order", "nearest_neighbour_chain", "most_central_first")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _samples(dataset: TaskDataset, split: str) -> Samples | None:
    """The samples of `split` ("all": every split's), None when there are none."""
    if split == "all":
        parts = [dataset.splits[s] for s in SPLITS if dataset.n_samples(s)]
        return type(parts[0]).concatenate(parts) if parts else None
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {list(SPLITS)} or 'all'")
    return dataset.splits[split] if dataset.n_samples(split) else None


def _pick(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) argmax of scores (N, K), exact ties broken uniformly at random."""
    best = scores >= scores.max(axis=1, keepdims=True)
    return np.argmax(np.where(best, rng.random(scores.shape), -1.0), axis=1)


class _OptionView:
    """What one option task's samples look like to a heuristic (vectors, contexts, contents)."""

    def __init__(self, spec: OptionTask, dataset: TaskDataset, features: PageFeatures, samples: OptionSamples):
        task = dataset.task
        P = features.max_panels
        page = samples.page.astype(np.int64)  # (N,)
        context = samples.context.astype(np.int64)  # (N, P)
        options = samples.options  # (N, K) flat refs
        option_rows, option_slots = options // P, options % P
        in_context = context >= 0  # (N, P) positions holding a real panel (not PAD / MASK)
        context_slots = np.where(in_context, context, 0)

        if spec.option_kind in ("text", "box_order"):
            if features.text is None or features.text_mask is None:
                raise ValueError(f"{task}: the features hold no text to audit against")
            box_mask = features.text_mask & features.panel_mask[:, :, None]  # (N_pages, P, B)
            text = features.text * box_mask[..., None]  # (N_pages, P, B, D)
            n_boxes = box_mask.sum(axis=2)  # (N_pages, P)
            panel_text = text.sum(axis=2) / np.maximum(n_boxes, 1)[..., None]  # mean text of a panel
            # context reference: all boxes of the context panels, and the last one that speaks
            ctx_boxes = text[page[:, None], context_slots] * in_context[:, :, None, None]  # (N, P, B, D)
            ctx_has_text = in_context & (n_boxes[page[:, None], context_slots] > 0)  # (N, P)
            self.context_mean = ctx_boxes.sum(axis=(1, 2))
            last_position = np.where(ctx_has_text, np.arange(P)[None, :], -1).max(axis=1)  # (N,)
            last_slot = context_slots[np.arange(len(page)), np.maximum(last_position, 0)]
            if spec.option_kind == "box_order":
                last_box = np.maximum(n_boxes[page, last_slot] - 1, 0)
                last_vector = text[page, last_slot, last_box]
                box_order = samples.box_order.astype(np.int64)  # (N, K, B)
                # an option is its boxes in the order shown; similarity sees the first one
                shown = text[option_rows[:, :, None], option_slots[:, :, None], np.maximum(box_order, 0)]
                shown = shown * (box_order >= 0)[..., None]  # (N, K, B, D)
                self.vectors = shown[:, :, 0]
                self.content = shown.reshape(*shown.shape[:2], -1)
                self.context_content = np.zeros((len(page), 0, self.content.shape[-1]))
            else:
                last_vector = panel_text[page, last_slot]
                self.vectors = panel_text[option_rows, option_slots]  # (N, K, D)
                self.content = text[option_rows, option_slots].reshape(*options.shape, -1)
                self.context_content = (text[page[:, None], context_slots] * ctx_has_text[:, :, None, None]
                                        ).reshape(len(page), P, -1)
            self.context_last = np.where((last_position >= 0)[:, None], last_vector, 0.0)
        else:
            modality = str(dataset.attrs.get("option_modality", "fused"))
            values = getattr(features, modality)
            if values is None:
                raise ValueError(f"{task}: the features hold no {modality!r} vectors to audit")
            self.vectors = values[option_rows, option_slots]  # (N, K, D)
            self.content = self.vectors
            if spec.context_kind == "caption":
                described = samples.caption_of
                caption = features.caption[described // P, described % P]  # (N, D)
                self.context_mean = caption
                self.context_last = caption
                self.context_content = values[described // P, described % P][:, None, :]
            else:
                ctx = _unit(values[page[:, None], context_slots]) * in_context[:, :, None]  # (N, P, D)
                self.context_mean = ctx.sum(axis=1)
                if spec.query == "mask":
                    # the panel next to the masked one: before it, or after it when it is first
                    mask_position = np.argmax(context == MASK, axis=1)
                    anchor = np.where(mask_position > 0, mask_position - 1, mask_position + 1)
                else:
                    anchor = in_context.sum(axis=1) - 1  # the last context panel
                self.context_last = values[page, context_slots[np.arange(len(page)), anchor]]
                self.context_content = values[page[:, None], context_slots] * in_context[:, :, None]
                self.context_content = np.where(in_context[:, :, None], self.context_content, np.nan)

    def scores(self) -> dict[str, np.ndarray]:
        unit = _unit(self.vectors)  # (N, K, D)
        to_mean = np.einsum("nkd,nd->nk", unit, _unit(self.context_mean))
        to_last = np.einsum("nkd,nd->nk", unit, _unit(self.context_last))
        among = np.einsum("nkd,njd->nkj", unit, unit)  # (N, K, K)
        K = unit.shape[1]
        to_others = (among.sum(axis=2) - np.einsum("nkk->nk", among)) / max(K - 1, 1)
        equal_options = (self.content[:, :, None, :] == self.content[:, None, :, :]).all(axis=3)  # (N, K, K)
        equal_context = (self.content[:, :, None, :] == self.context_content[:, None, :, :]).all(axis=3)
        duplicates = equal_options.sum(axis=2) - 1 + equal_context.sum(axis=2)  # (N, K)
        norm = np.linalg.norm(self.vectors, axis=-1)

        def nearest_median(similarity):
            return -np.abs(similarity - np.median(similarity, axis=1, keepdims=True))

        return {
            "most_similar_to_context_mean": to_mean,
            "least_similar_to_context_mean": -to_mean,
            "most_similar_to_last_context": to_last,
            "least_similar_to_last_context": -to_last,
            "duplicates_nothing": -duplicates.astype(np.float64),
            "duplicates_context": equal_context.any(axis=2).astype(np.float64),
            "largest_norm": norm,
            "smallest_norm": -norm,
            "odd_one_out": -to_others,
            "most_like_other_options": to_others,
            "median_similarity_to_context_mean": nearest_median(to_mean),
            "median_similarity_to_last_context": nearest_median(to_last),
        }


# --- the learned option-only baseline ------------------------------------------------------------
def option_only_scores(dataset: TaskDataset, features: PageFeatures, split: str = "test", *,
                       steps: int = 300, lr: float = 0.5, l2: float = 1e-3) -> np.ndarray:
    """(N, K) scores of the learned option-only baseline on `split`: the "hypothesis-only" control.

    A conditional logit fit on the train split that sees each option's vector (as the audit sees
    it: fused/visual, mean text, first box shown) and the asked position, but no context:
    score_k = <x_k, w + W[asked]>, full-batch gradient descent on the cross-entropy. It wins only
    where options alone give the answer away (e.g. "what a panel at slot s looks like")."""
    spec = spec_of(dataset.task)
    if spec.family != "option":
        raise ValueError(f"{dataset.task}: the option-only baseline is for option tasks")
    samples = dataset.splits.get(split)
    train = dataset.splits.get("train")
    if samples is None or len(samples) == 0 or train is None or len(train) == 0:
        return np.zeros((0 if samples is None else len(samples), dataset.n_options or spec.n_options))
    P = dataset.max_panels

    def inputs(of: OptionSamples) -> tuple[np.ndarray, np.ndarray]:
        vectors = _unit(_OptionView(spec, dataset, features, of).vectors).astype(np.float64)  # (N, K, D)
        return vectors, np.clip(spec.asked_slot(of, P), 0, P)

    x, asked = inputs(train)
    label = train.label.astype(np.int64)
    N, K, D = x.shape
    w, W = np.zeros(D), np.zeros((P + 1, D))
    target = np.eye(K)[label]  # (N, K)
    for _ in range(steps):
        logits = np.einsum("nkd,nd->nk", x, w + W[asked])
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = np.einsum("nk,nkd->nd", p - target, x) / N  # (N, D) gradient wrt each sample's query
        w -= lr * (g.sum(axis=0) + l2 * w)
        W_grad = np.zeros_like(W)
        np.add.at(W_grad, asked, g)
        W -= lr * (W_grad + l2 * W)
    x, asked = inputs(samples)
    return np.einsum("nkd,nd->nk", x, w + W[asked])


def option_only_accuracy(dataset: TaskDataset, features: PageFeatures, split: str = "test") -> float:
    """Accuracy of the learned option-only baseline on `split` (nan without samples)."""
    if dataset.n_samples(split) == 0:
        return float("nan")
    scores = option_only_scores(dataset, features, split)
    return expected_accuracy(np.round(scores, 9), dataset.splits[split].label.astype(np.int64))


def _reading_order_predictions(features: PageFeatures, samples: OrderSamples,
                               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """heuristic -> (N, P) predicted order (predicted true slot of each input position; PAD)."""
    page = samples.page.astype(np.int64)
    order = samples.order.astype(np.int64)  # (N, P)
    valid = order != PAD
    N, P = order.shape
    shown = _unit(features.fused[page[:, None], np.maximum(order, 0)]) * valid[..., None]  # (N, P, D)
    similarity = np.einsum("npd,nqd->npq", shown, shown)  # (N, P, P)
    pair = valid[:, :, None] & valid[:, None, :] & ~np.eye(P, dtype=bool)[None]
    n_valid = valid.sum(axis=1)
    mean_similarity = (similarity * pair).sum(axis=2) / np.maximum(n_valid - 1, 1)[:, None]
    centrality = np.where(valid, mean_similarity, -np.inf)  # (N, P)
    jitter = 1e-9 * rng.random((N, P))

    def ranks_from_sequence(sequence: np.ndarray) -> np.ndarray:
        ranks = np.full((N, P), PAD, dtype=np.int64)
        steps = np.broadcast_to(np.arange(P)[None, :], (N, P))
        np.put_along_axis(ranks, sequence, steps, axis=1)
        return np.where(valid, ranks, PAD)

    # nearest-neighbour chain from the most central panel
    current = np.argmax(centrality + jitter, axis=1)
    visited = ~valid.copy()
    sequence = np.zeros((N, P), dtype=np.int64)
    for step in range(P):
        sequence[:, step] = current
        visited[np.arange(N), current] = True
        candidate = np.where(visited, -np.inf, similarity[np.arange(N), current] + jitter)
        current = np.where(np.isfinite(candidate.max(axis=1)), np.argmax(candidate, axis=1), current)
    # padded positions come last in the sequence (they are "visited" from the start, so the
    # chain stops on its last valid panel; fill the tail with the padded positions in order)
    tail = np.argsort(~valid, axis=1, kind="stable")  # valid positions first, then the padded
    chain = np.where(np.arange(P)[None, :] < n_valid[:, None], sequence, tail)
    central_first = np.argsort(-(centrality + jitter), axis=1, kind="stable")
    return {
        "keep_input_order": np.where(valid, np.arange(P)[None, :], PAD),
        "nearest_neighbour_chain": ranks_from_sequence(chain),
        "most_central_first": ranks_from_sequence(central_first),
    }


def shortcut_predictions(dataset: TaskDataset, features: PageFeatures, split: str,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """heuristic -> (N,) chosen option index; for reading_order heuristic -> (N, P) order."""
    if not page_table_matches(dataset, features):
        raise ValueError(f"{dataset.task}: the dataset's page table does not match these features")
    spec = spec_of(dataset.task)
    samples = _samples(dataset, split)
    rng = np.random.default_rng([seed, TASK_NAMES.index(dataset.task)])
    if samples is None:
        shape = (0, dataset.max_panels) if spec.family == "order" else (0,)
        names = ORDER_HEURISTICS if spec.family == "order" else (*HEURISTICS, SLOT_ORACLE)
        return {name: np.zeros(shape, dtype=np.int64) for name in names}
    if spec.family == "order":
        return _reading_order_predictions(features, samples, rng)
    scores = _OptionView(spec, dataset, features, samples).scores()
    chosen = {name: _pick(score, rng) for name, score in scores.items()}
    oracle = (np.concatenate([slot_oracle_scores(dataset, s) for s in SPLITS if dataset.n_samples(s)])
              if split == "all" else slot_oracle_scores(dataset, split))
    chosen[SLOT_ORACLE] = _pick(oracle, rng)
    return chosen


def _reading_order_chance(order: np.ndarray) -> float:
    n_valid = (order != PAD).sum(axis=1)
    log_factorial = np.array([np.sum(np.log(np.arange(1, k + 1))) for k in range(order.shape[1] + 1)])
    return float(np.mean(np.exp(-log_factorial[n_valid])))


def shortcut_scores(dataset: TaskDataset, features: PageFeatures, split: str,
                    seed: int = 0) -> pd.DataFrame:
    """Long table: task, heuristic, metric, value, chance, margin (value - chance), n.

    text_cloze also gets rows per variant (task "text_cloze[easy]" / "text_cloze[hard]").
    """
    spec = spec_of(dataset.task)
    samples = _samples(dataset, split)
    predictions = shortcut_predictions(dataset, features, split, seed)
    rows = []
    if spec.family == "order":
        order = samples.order if samples is not None else np.zeros((0, dataset.max_panels), dtype=np.int64)
        chance = {"pairwise_accuracy": 0.5, "exact_match": _reading_order_chance(order), "kendall_tau": 0.0}
        for name, predicted in predictions.items():
            values = {
                "pairwise_accuracy": metrics.pairwise_accuracy(predicted, order),
                "exact_match": metrics.exact_match(predicted, order).astype(np.float64),
                "kendall_tau": metrics.kendall_tau(predicted, order),
            }
            for metric, per_sample in values.items():
                value = float(np.nanmean(per_sample)) if len(per_sample) else float("nan")
                rows.append((dataset.task, name, metric, value, chance[metric], len(order)))
    else:
        label = samples.label if samples is not None else np.zeros(0, dtype=np.int64)
        K = dataset.n_options or spec.n_options
        groups = {dataset.task: np.ones(len(label), dtype=bool)}
        if spec.variants and len(label):
            for code, variant in enumerate(spec.variants):
                groups[f"{dataset.task}[{variant}]"] = samples.variant == code
        for task_name, rows_of in groups.items():
            for name, chosen in predictions.items():
                n = int(rows_of.sum())
                value = float(np.mean(chosen[rows_of] == label[rows_of])) if n else float("nan")
                rows.append((task_name, name, "accuracy", value, 1.0 / K, n))
    table = pd.DataFrame(rows, columns=["task", "heuristic", "metric", "value", "chance", "n"])
    table["margin"] = table["value"] - table["chance"]
    return table


def shortcut_accuracies(dataset: TaskDataset, features: PageFeatures, split: str,
                        seed: int = 0) -> dict[str, float]:
    """heuristic -> accuracy on `split`.

    For reading_order the accuracy is the exact-match rate (a page put wholly in its true order),
    the same quantity evaluation reports as that task's accuracy; pairwise accuracy and Kendall's
    tau are in shortcut_scores.
    """
    table = shortcut_scores(dataset, features, split, seed)
    metric = "exact_match" if spec_of(dataset.task).family == "order" else "accuracy"
    table = table[(table["task"] == dataset.task) & (table["metric"] == metric)]
    return dict(zip(table["heuristic"], table["value"].astype(float)))


def shortcut_table(datasets: Mapping[str, TaskDataset], features: PageFeatures, split: str,
                   seed: int = 0) -> pd.DataFrame:
    """Every heuristic on every dataset (long format, see shortcut_scores)."""
    parts = [shortcut_scores(dataset, features, split, seed) for dataset in datasets.values()]
    if not parts:
        return pd.DataFrame(columns=["task", "heuristic", "metric", "value", "chance", "n", "margin"])
    return pd.concat(parts, ignore_index=True)


def margin_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """heuristic x task(/metric) matrix of value - chance, for printing."""
    columns = np.where(table["metric"].isin(["accuracy"]), table["task"],
                       table["task"] + ":" + table["metric"])
    return table.assign(column=columns).pivot_table(index="heuristic", columns="column",
                                                    values="margin", aggfunc="first", sort=False)
