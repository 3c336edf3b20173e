"""Test-split evaluation: per-task metrics beside chance and shortcuts, strip retrieval, reports.

Pure Python over the model, the task datasets and the page features (no dagster import).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from comic_pipeline import inference, metrics, schema, shortcuts
from comic_pipeline.tasks import TASK_NAMES, slot_oracle_accuracy, spec_of


class EvaluationSkipped(ValueError):
    """The task cannot be evaluated on this split (e.g. no test samples); `reason` says why. The
    other tasks go on: a caller records the reason instead of failing."""

    def __init__(self, task: str, reason: str):
        super().__init__(f"{task}: {reason}")
        self.task = task
        self.reason = reason


@dataclass
class TaskEvaluation:
    task: str
    # accuracy, accuracy_ci_low/high, chance, best_shortcut, slot_oracle_accuracy, n_samples, and
    # per variant accuracy_<v>, accuracy_<v>_ci_low/high, chance_<v>, best_shortcut_<v>, n_samples_<v>
    metrics: dict[str, float]
    shortcut_accuracies: dict[str, float] = field(default_factory=dict)
    ci_method: str = "cluster_bootstrap"  # how the intervals were made (metrics.accuracy_report)
    variants: tuple[str, ...] = ()  # the task's variants, each gated on its own

    @property
    def best_shortcut_name(self) -> str:
        if not self.shortcut_accuracies:
            return "none"
        return max(self.shortcut_accuracies, key=self.shortcut_accuracies.get)

    def metadata(self) -> dict[str, object]:
        """Numeric metadata (so the UI plots them across retrains) + the shortcut table."""
        values: dict[str, object] = {
            k: (int(v) if k.startswith("n_samples") else round(float(v), 4)) for k, v in self.metrics.items()
        }
        values["best_shortcut_name"] = self.best_shortcut_name
        values["ci_method"] = self.ci_method
        return values


def evaluate_task(
    model, dataset: schema.TaskDataset, features: schema.PageFeatures, *, split: str = "test",
    device: str = "auto", seed: int = 0, batch_size: int = 256,
) -> TaskEvaluation:
    """Score `model` on `split` of `dataset`, beside chance (from the dataset's own K) and the
    shortcuts on the same samples; 95% intervals by a seeded bootstrap over comics.

    Raises EvaluationSkipped when the split has no samples."""
    if dataset.n_samples(split) == 0:
        raise EvaluationSkipped(dataset.task, f"no {split!r} samples to evaluate")
    spec = spec_of(dataset.task)
    samples = dataset.splits[split]
    comics = np.asarray(dataset.comic_ids)[samples.page]  # (N,) the cluster of each sample
    outputs = inference.predict(model, dataset, features, split, device=device, batch_size=batch_size)
    predictions = shortcuts.shortcut_predictions(dataset, features, split, seed=seed)
    if spec.family == "order":
        # Exact match is near zero for long pages whatever the model, so the gated "accuracy" is
        # the pairwise accuracy (chance 0.5): averaged over a page's shuffles first, then over
        # pages, with an interval from resampling comics.
        predicted, order = outputs["predicted_order"], outputs["order"]
        report = metrics.reading_order_report(predicted, order)
        page_mean, page_comic = _page_means(metrics.pairwise_accuracy(predicted, order), samples.page, comics)
        low, high = metrics.cluster_bootstrap_interval(page_mean, page_comic, seed=seed)
        values = {
            "accuracy": float(page_mean.mean()), "accuracy_ci_low": low, "accuracy_ci_high": high,
            "chance": spec.chance(),
            "kendall_tau": float(report["kendall_tau"]),
            "pairwise_accuracy": float(report["pairwise_accuracy"]),
            "exact_match": float(report["exact_match"]),
            "exact_match_chance": float(report["exact_match_chance"]),
        }
        heuristics = {name: float(np.nanmean(metrics.pairwise_accuracy(guess, order)))
                      for name, guess in predictions.items()}
    else:
        chance = spec.chance(dataset.n_options or None)
        values = _accuracy_figures("", outputs["prediction"], outputs["label"], comics, chance, seed)
        heuristics = {name: float(np.mean(chosen == samples.label)) for name, chosen in predictions.items()}
        values["slot_oracle_accuracy"] = slot_oracle_accuracy(dataset, split)  # ties in expectation
        # the learned option-only baseline (fit on train, no context) is a shortcut like the others
        values["option_only_accuracy"] = heuristics["option_only"] = shortcuts.option_only_accuracy(
            dataset, features, split)
        for code, variant in enumerate(spec.variants):
            rows = samples.variant == code
            if not rows.any():
                continue
            values.update(_accuracy_figures(f"_{variant}", outputs["prediction"][rows], outputs["label"][rows],
                                            comics[rows], chance, seed))
            values[f"best_shortcut_{variant}"] = max(float(np.mean(chosen[rows] == samples.label[rows]))
                                                     for chosen in predictions.values())
    values["best_shortcut"] = max(heuristics.values()) if heuristics else values["chance"]
    values["n_samples"] = float(dataset.n_samples(split))
    return TaskEvaluation(dataset.task, values, dict(heuristics), "cluster_bootstrap",
                          tuple(v for v in spec.variants if f"accuracy_{v}" in values))


def _accuracy_figures(suffix: str, prediction, label, comics, chance: float, seed: int) -> dict[str, float]:
    report = metrics.accuracy_report(prediction, label, chance, clusters=comics, seed=seed)
    figures = {f"accuracy{suffix}": report.accuracy, f"accuracy{suffix}_ci_low": report.ci_low,
               f"accuracy{suffix}_ci_high": report.ci_high, "chance": report.chance}
    if suffix:
        figures = {**{k: v for k, v in figures.items() if k != "chance"}, f"chance{suffix}": report.chance,
                   f"n_samples{suffix}": float(report.n_samples)}
    return figures


def _page_means(values: np.ndarray, page: np.ndarray, comics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` per page (nan skipped) and the comic of each page."""
    pages, index = np.unique(page, return_inverse=True)
    defined = ~np.isnan(values)
    sums = np.bincount(index[defined], weights=values[defined], minlength=len(pages))
    counts = np.bincount(index[defined], minlength=len(pages))
    first = np.zeros(len(pages), dtype=np.int64)
    first[index[::-1]] = np.arange(len(index))[::-1]
    keep = counts > 0
    return (sums / np.maximum(counts, 1))[keep], comics[first][keep]


def test_page_rows(datasets: Mapping[str, schema.TaskDataset], split: str = "test") -> np.ndarray:
    """Page-table rows that any task samples from in `split` (all datasets share one table)."""
    rows = [d.splits[split].page for d in datasets.values() if d.n_samples(split)]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def evaluate_strips(model, features: schema.PageFeatures, rows: np.ndarray, *, device: str = "auto",
                    seed: int = 0) -> dict[str, float]:
    """Strip-embedding retrieval on `rows`: a page's other panel-dropout view (recall@1) and pages
    of the same comic (recall@10), each beside its chance level."""
    if len(rows) < 2:
        raise ValueError("strip evaluation needs at least two test pages")
    view_a, view_b = inference.strip_views(model, features, rows, device=device, seed=seed)
    _, strips = inference.embed_pages(model, features, rows, device=device)
    same_comic, same_comic_chance = metrics.same_comic_recall_at_k(
        strips, features.comic_ids[rows], k=10
    )
    return {
        "view_recall_at_1": float(metrics.view_retrieval_recall_at_1(view_a, view_b)),
        "view_recall_at_1_chance": 1.0 / len(rows),
        "same_comic_recall_at_10": float(same_comic),
        "same_comic_recall_at_10_chance": float(same_comic_chance),
    }


def metric_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every per-epoch curve of a training run: train/val loss and val accuracy per task."""
    run = client.get_run(run_id)
    names = [n for n in run.data.metrics if n.startswith(("train_", "val_"))]
    return {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        for name in sorted(names)
    }


def summary_markdown(
    results: Mapping[str, TaskEvaluation], skipped: Mapping[str, str], strips: Mapping[str, float],
    model_version: str,
) -> str:
    lines = [
        f"**Test split, model version {model_version}**",
        "",
        "| task | n | accuracy | 95% CI | chance | best shortcut | other |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in TASK_NAMES:
        if name in skipped:
            lines.append(f"| {name} | – | skipped | – | – | – | {skipped[name]} |")
            continue
        if name not in results:
            continue
        m = results[name].metrics
        other = ", ".join(
            f"{k} {m[k]:.3f}" for k in ("kendall_tau", "pairwise_accuracy", "accuracy_easy", "accuracy_hard")
            if k in m
        )
        lines.append(
            f"| {name} | {int(m['n_samples'])} | {m['accuracy']:.3f} | "
            f"[{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}] | {m['chance']:.3f} | "
            f"{m['best_shortcut']:.3f} ({results[name].best_shortcut_name}) | {other} |"
        )
    if strips:
        lines += [
            "",
            "| strip embeddings | value | chance |",
            "|---|---:|---:|",
            f"| view retrieval recall@1 | {strips['view_recall_at_1']:.3f} | "
            f"{strips['view_recall_at_1_chance']:.3f} |",
            f"| same-comic recall@10 | {strips['same_comic_recall_at_10']:.3f} | "
            f"{strips['same_comic_recall_at_10_chance']:.3f} |",
        ]
    return "\n".join(lines)


def plot_accuracy(results: Mapping[str, TaskEvaluation], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    accuracy = np.array([results[n].metrics["accuracy"] for n in names])
    low = accuracy - np.array([results[n].metrics["accuracy_ci_low"] for n in names])
    high = np.array([results[n].metrics["accuracy_ci_high"] for n in names]) - accuracy
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x, accuracy, yerr=[low, high], capsize=3, label="model (95% CI)", color="#4477aa")
    ax.scatter(x, [results[n].metrics["chance"] for n in names], marker="_", s=600, color="black",
               label="chance", zorder=3)
    ax.scatter(x, [results[n].metrics["best_shortcut"] for n in names], marker="x", color="#cc3311",
               label="best shortcut", zorder=3)
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training_curves(history: Mapping[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in history.items():
        if not points:
            continue
        steps, values = zip(*points)
        if name.endswith("loss"):
            loss_ax.plot(steps, values, marker=".", label=name)
        elif name.startswith("val_accuracy_"):
            acc_ax.plot(steps, values, marker=".", label=name[len("val_accuracy_"):])
    loss_ax.set_title("loss")
    acc_ax.set_title("validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def base64_png(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
