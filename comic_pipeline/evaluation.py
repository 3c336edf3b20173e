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
from comic_pipeline.tasks import TASK_NAMES, spec_of


@dataclass
class TaskEvaluation:
    task: str
    metrics: dict[str, float]  # accuracy, accuracy_ci_low/high, chance, best_shortcut, n_samples, ...
    shortcut_accuracies: dict[str, float] = field(default_factory=dict)

    @property
    def best_shortcut_name(self) -> str:
        if not self.shortcut_accuracies:
            return "none"
        return max(self.shortcut_accuracies, key=self.shortcut_accuracies.get)

    def metadata(self) -> dict[str, object]:
        """Numeric metadata (so the UI plots them across retrains) + the shortcut table."""
        values: dict[str, object] = {
            k: (int(v) if k == "n_samples" else round(float(v), 4)) for k, v in self.metrics.items()
        }
        values["best_shortcut_name"] = self.best_shortcut_name
        return values


def evaluate_task(
    model, dataset: schema.TaskDataset, features: schema.PageFeatures, *, split: str = "test",
    device: str = "auto", seed: int = 0, batch_size: int = 256,
) -> TaskEvaluation:
    """Score `model` on `split` of `dataset`, with the shortcut heuristics on the same samples."""
    if dataset.n_samples(split) == 0:
        raise ValueError(f"task {dataset.task!r} has no {split!r} samples to evaluate")
    spec = spec_of(dataset.task)
    outputs = inference.predict(model, dataset, features, split, device=device, batch_size=batch_size)
    if spec.family == "order":
        # Exact match is near zero for long pages whatever the model, so the gated "accuracy" is
        # the per-page pairwise accuracy (chance 0.5), with a normal interval over pages (pairs
        # within one page are not independent; pages are).
        predicted, order = outputs["predicted_order"], outputs["order"]
        report = metrics.reading_order_report(predicted, order)
        per_page = metrics.pairwise_accuracy(predicted, order)
        per_page = per_page[~np.isnan(per_page)]
        half_width = 1.96 * per_page.std(ddof=1) / np.sqrt(len(per_page)) if len(per_page) > 1 else 1.0
        values = {
            "accuracy": float(per_page.mean()),
            "accuracy_ci_low": float(per_page.mean() - half_width),
            "accuracy_ci_high": float(per_page.mean() + half_width),
            "chance": 0.5,
            "kendall_tau": float(report["kendall_tau"]),
            "pairwise_accuracy": float(report["pairwise_accuracy"]),
            "exact_match": float(report["exact_match"]),
            "exact_match_chance": float(report["exact_match_chance"]),
        }
        heuristics = {
            name: float(np.nanmean(metrics.pairwise_accuracy(guess, order)))
            for name, guess in shortcuts.shortcut_predictions(dataset, features, split, seed=seed).items()
        }
    else:
        heuristics = shortcuts.shortcut_accuracies(dataset, features, split, seed=seed)
        report = metrics.accuracy_report(  # chance from the dataset's own K
            outputs["prediction"], outputs["label"], spec.chance(dataset.n_options or None)
        )
        values = {
            "accuracy": report.accuracy,
            "accuracy_ci_low": report.ci_low,
            "accuracy_ci_high": report.ci_high,
            "chance": report.chance,
        }
        if spec.variants:
            variant = dataset.splits[split].variant
            correct = outputs["prediction"] == outputs["label"]
            for code, name in enumerate(spec.variants):
                if (variant == code).any():
                    values[f"accuracy_{name}"] = float(correct[variant == code].mean())
    values["best_shortcut"] = max(heuristics.values()) if heuristics else values["chance"]
    values["n_samples"] = float(dataset.n_samples(split))
    return TaskEvaluation(dataset.task, values, dict(heuristics))


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
