"""Task generation throughput, the shortcut audit and linear probes on the demo corpus.

    .venv/bin/python benchmarks/bench_tasks.py [--scale 10] [--skip-large]

Prints: corpus sizes; samples/s of generate_task for all seven tasks on the demo corpus and on one
`scale` times larger (features generated in memory, only generate_task is timed); the shortcut
table (heuristic x task, accuracy minus chance, test split); linear-probe accuracies (fit on
train) that show the tasks are learnable.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comic_pipeline import corpus, shortcuts, tasks  # noqa: E402
from comic_pipeline.schema import TASK_NAMES  # noqa: E402
from comic_pipeline.splits import assign_splits  # noqa: E402


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def corpus_summary(name: str, features, split_of) -> dict[str, object]:
    split_of_row = np.vectorize(split_of.get)(features.comic_ids)
    return {"corpus": name, "comics": len(set(features.comic_ids)), "pages": features.n_pages,
            "panels": int(features.panel_mask.sum()), "text boxes": int(features.text_mask.sum()),
            "dim": features.dim, **{f"{s} pages": int((split_of_row == s).sum()) for s in ("train", "val", "test")}}


def time_tasks(name: str, features, split_of, config: tasks.TaskConfig):
    rows, datasets = [], {}
    for task in TASK_NAMES:
        started = time.perf_counter()
        dataset = tasks.generate_task(task, features, split_of, config)
        seconds = time.perf_counter() - started
        n = sum(dataset.attrs["samples"].values())
        datasets[task] = dataset
        rows.append({"corpus": name, "task": task, "samples": n, "test samples": dataset.n_samples("test"),
                     "seconds": round(seconds, 3), "samples/s": int(n / seconds)})
    return rows, datasets


# --- linear probes (also in comic_pipeline_tests/test_shortcuts.py; not part of the package) ----
def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-9)


def ridge(x, y, strength=1.0):
    return np.linalg.solve(x.T @ x + strength * np.eye(x.shape[1]), x.T @ y)


def probe(dataset, inputs, targets):
    """Ridge inputs(fields) -> the answer's target vector on train; on val/test pick the option
    whose target vector is nearest (cosine) to the prediction."""
    def answer(fields):
        return np.take_along_axis(fields["options"], fields["label"][:, None].astype(int), axis=1)[:, 0]

    train = dataset.splits["train"].fields()
    weights = ridge(inputs(train), targets[answer(train)])
    result = {}
    for split in ("val", "test"):
        fields = dataset.splits[split].fields()
        scores = np.einsum("nkd,nd->nk", targets[fields["options"]], unit(inputs(fields) @ weights))
        correct = np.argmax(scores, axis=1) == fields["label"]
        result[split] = float(correct.mean())
        if "variant" in fields:
            for variant, code in (("easy", 0), ("hard", 1)):
                result[f"{split} {variant}"] = float(correct[fields["variant"] == code].mean())
    return result


def probes(features, datasets) -> pd.DataFrame:
    P, D = features.max_panels, features.dim
    fused = unit(features.fused).reshape(-1, D)
    visual = unit(features.visual).reshape(-1, D)
    caption = unit(features.caption).reshape(-1, D)
    boxes = unit(features.text) * features.text_mask[..., None]
    panel_text = unit(boxes.sum(axis=2)).reshape(-1, D)
    box_table = boxes.reshape(-1, features.max_boxes, D)

    def last_context(fields):
        last = (fields["context"] >= 0).sum(axis=1) - 1
        return fused[fields["page"].astype(np.int64) * P + fields["context"][np.arange(len(last)), last]]

    def neighbours(fields):  # sequence_filling: the panels either side of the mask
        at = np.argmax(fields["context"] == -2, axis=1)
        n = (fields["context"] != -1).sum(axis=1)
        page = fields["page"].astype(np.int64) * P
        before = fused[page + np.where(at > 0, at - 1, at + 1)]
        after = fused[page + np.where(at < n - 1, at + 1, at - 1)]
        return np.concatenate([before, after], axis=1)

    rows = []
    runs = {
        "sequence_filling: fused of both neighbours -> fused": (datasets["sequence_filling"], neighbours, fused),
        "visual_closure: fused of panel s -> fused of s+1": (datasets["visual_closure"], last_context, fused),
        "caption_relevance: caption of s -> fused of s+1":
            (datasets["caption_relevance"], lambda f: caption[f["caption_of"]], fused),
        "text_closure: visual -> mean text": (datasets["text_closure"], lambda f: visual[f["option_visual"]], panel_text),
        "text_cloze: visual -> mean text": (datasets["text_cloze"], lambda f: visual[f["option_visual"]], panel_text),
    }
    for name, (dataset, inputs, targets) in runs.items():
        rows.append({"probe": name, "chance": dataset.attrs["chance"], **probe(dataset, inputs, targets)})
    # character_coherence: predict the second shown box from the first, per option order
    dataset = datasets["character_coherence"]

    train = dataset.splits["train"].fields()
    order = np.maximum(train["box_order"].astype(np.int64), 0)
    true = order[np.arange(len(order)), train["label"].astype(int)]
    weights = ridge(box_table[train["options"][:, 0], true[:, 0]], box_table[train["options"][:, 0], true[:, 1]])
    result = {}
    for split in ("val", "test"):
        fields = dataset.splits[split].fields()
        order = np.maximum(fields["box_order"].astype(np.int64), 0)
        shown = box_table[fields["options"][:, :, None], order]  # (N, 2, B, D)
        scores = np.einsum("nkd,nkd->nk", unit(shown[:, :, 0] @ weights), shown[:, :, 1])
        result[split] = float(np.mean(np.argmax(scores, axis=1) == fields["label"]))
    rows.append({"probe": "character_coherence: box 1 from box 0 (reply map)", "chance": 0.5, **result})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="the larger corpus has scale x n_comics")
    parser.add_argument("--skip-large", action="store_true", help="only the demo corpus")
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 40)
    pd.set_option("display.max_colwidth", 60)

    demo_config = corpus.SIZES["demo"]
    started = time.perf_counter()
    features = corpus.corpus_features(demo_config)
    demo_seconds = time.perf_counter() - started
    split_of = assign_splits(sorted(set(features.comic_ids)))
    summaries = [dict(corpus_summary("demo", features, split_of), **{"generate s": round(demo_seconds, 1)})]
    timing, datasets = time_tasks("demo", features, split_of, tasks.TaskConfig())

    if not args.skip_large:
        large_config = dataclasses.replace(demo_config, n_comics=demo_config.n_comics * args.scale)
        started = time.perf_counter()
        large = corpus.corpus_features(large_config)
        large_seconds = time.perf_counter() - started
        large_split = assign_splits(sorted(set(large.comic_ids)))
        summaries.append(dict(corpus_summary(f"demo x{args.scale}", large, large_split),
                              **{"generate s": round(large_seconds, 1)}))
        large_timing, _ = time_tasks(f"demo x{args.scale}", large, large_split, tasks.TaskConfig())
        timing += large_timing
        del large

    print("\n== corpora (features generated in memory) ==")
    print(pd.DataFrame(summaries).to_string(index=False))
    print(f"\n== generate_task throughput (TaskConfig defaults: {tasks.DEFAULT_SAMPLES_PER_PAGE} samples/page, "
          f"hard distractors; peak RSS {rss_gib():.2f} GiB) ==")
    print(pd.DataFrame(timing).to_string(index=False))

    table = shortcuts.shortcut_table(datasets, features, "test")
    print("\n== shortcut audit, demo corpus, test split: accuracy - chance (points) ==")
    print((100 * shortcuts.margin_matrix(table)).round(1).to_string())
    worst = table.loc[table.groupby("task")["margin"].idxmax(), ["task", "heuristic", "metric", "value",
                                                                   "chance", "margin", "n"]]
    print("\nbest heuristic per task:")
    print(worst.round(3).to_string(index=False))

    easy = {t: tasks.generate_task(t, features, split_of, tasks.TaskConfig(distractors="easy"))
            for t in ("sequence_filling", "visual_closure", "text_closure", "caption_relevance")}
    easy_table = shortcuts.shortcut_table(easy, features, "test")
    easy_worst = easy_table.loc[easy_table.groupby("task")["margin"].idxmax(),
                                ["task", "heuristic", "value", "chance", "margin"]]
    print("\nfor comparison, distractors='easy' (other comics) on panel tasks, best heuristic:")
    print(easy_worst.round(3).to_string(index=False))

    print("\n== linear probes (ridge fit on train; pick the option nearest the prediction) ==")
    print(probes(features, datasets).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
