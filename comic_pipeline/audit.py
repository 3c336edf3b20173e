"""The shortcut audit as a command: every label-free heuristic, the slot oracle and the learned
option-only baseline on the demo generator, as margins over chance (task x heuristic).

    python -m comic_pipeline.audit                      # today's sampling, demo size, test split
    python -m comic_pipeline.audit --sampling old       # distractors from any slot, unmatched
    python -m comic_pipeline.audit --slot-signature 0.5 # the planted per-slot trace (DESIGN §4)

`--sampling old` is the sampling before slot matching and similarity matching (any slot, uniform
among the eligible): the "before" of the audit; `new` (default) is what the tasks assets generate.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pandas as pd

from comic_pipeline import corpus, shortcuts, tasks
from comic_pipeline.schema import TASK_NAMES
from comic_pipeline.splits import assign_splits

OPTION_ONLY = "option_only (learned)"


def audit_table(size: str = "demo", split: str = "test", sampling: str = "new",
                slot_signature: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """heuristic x task margins over chance (value - chance) of the audit on one generated corpus."""
    if sampling not in ("new", "old"):
        raise ValueError(f"sampling must be 'new' or 'old', got {sampling!r}")
    config = dataclasses.replace(corpus.SIZES[size], slot_signature=slot_signature)
    features = corpus.corpus_features(config)
    split_of = assign_splits(sorted(set(features.comic_ids)))
    task_config = tasks.TaskConfig(seed=seed, match_similarity=sampling == "new",
                                   slot_matched=sampling == "new")
    datasets = {task: tasks.generate_task(task, features, split_of, task_config) for task in TASK_NAMES}
    matrix = shortcuts.margin_matrix(shortcuts.shortcut_table(datasets, features, split, seed))
    if split != "all":  # the option-only baseline trains on train and scores one split
        learned = {task: shortcuts.option_only_accuracy(dataset, features, split) - float(dataset.attrs["chance"])
                   for task, dataset in datasets.items()
                   if tasks.spec_of(task).family == "option" and dataset.n_samples(split)}
        matrix.loc[OPTION_ONLY] = pd.Series(learned)
    return matrix


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", choices=sorted(corpus.SIZES))
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    parser.add_argument("--sampling", default="new", choices=["new", "old"])
    parser.add_argument("--slot-signature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    matrix = audit_table(args.size, args.split, args.sampling, args.slot_signature, args.seed)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(f"margin over chance, {args.size} corpus, {args.split} split, {args.sampling} sampling, "
              f"slot signature {args.slot_signature}")
        print(matrix.round(3).to_string())
    worst = np.nanmax(matrix.to_numpy(dtype=float))
    print(f"largest margin: {worst:+.3f}")


if __name__ == "__main__":
    main()
