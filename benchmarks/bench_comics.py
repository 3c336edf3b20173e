"""COMICS import: text-encoder throughput (cold cache vs warm cache) and import speed.

  encode strings/s (cold)   distinct fold strings encoded by all-MiniLM-L6-v2 into an empty cache
  encode strings/s (warm)   the same strings again from a fresh TextEncoder on the same home:
                            cache hits only (the model is never loaded)
  import rows/s (warm)      read folds + import into the text-only store, every vector cached

    .venv/bin/python benchmarks/bench_comics.py [--folds a.csv,b.csv] [--rows 300] [--threads 1]

By default the first --rows rows of each fold file in $COMICS_FOLDS (or ../shared/data/comics).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.figures import print_figures  # noqa: E402
from comic_pipeline import comics_folds, comics_import  # noqa: E402
from comic_pipeline.text_encoder import TextEncoder  # noqa: E402


def default_folds() -> str:
    if os.environ.get(comics_folds.FOLDS_ENV):
        return os.environ[comics_folds.FOLDS_ENV]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return ",".join(sorted(glob.glob(os.path.join(here, "..", "shared", "data", "comics", "*.csv"))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", default=None)
    parser.add_argument("--rows", type=int, default=300, help="rows read from each fold file")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the encoder")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    paths = comics_folds.fold_paths(args.folds or default_folds())
    folds, problems = comics_folds.read_folds(paths, limit=args.rows)
    strings = comics_import.fold_strings(folds)
    with tempfile.TemporaryDirectory() as home:
        cold = TextEncoder(home)
        cold.encode(strings[:8])  # load the model outside the timed part
        loaded = cold.stats.encoded
        started = time.perf_counter()
        cold.encode(strings)
        cold_seconds = time.perf_counter() - started
        n_cold = cold.stats.encoded - loaded

        warm = TextEncoder(home)
        started = time.perf_counter()
        warm.encode(strings)
        warm_seconds = time.perf_counter() - started

        started = time.perf_counter()
        folds, _ = comics_folds.read_folds(paths, limit=args.rows)
        report = comics_import.import_folds(folds, os.path.join(home, "s.zarr"), warm, log=lambda _: None)
        import_seconds = time.perf_counter() - started
    rows = sum(len(f.rows) for f in folds)
    print_figures([
        ("fold files", ", ".join(f"{f.name} ({len(f.rows)} rows)" for f in folds)),
        ("distinct strings", f"{len(strings):,}"),
        (f"encode strings/s (cold, {args.threads} thread)", f"{n_cold / cold_seconds:,.0f}"),
        ("encode strings/s (warm cache)", f"{len(strings) / warm_seconds:,.0f} "
                                         f"(encoded {warm.stats.encoded})"),
        ("warm / cold speed-up", f"{(len(strings) / warm_seconds) / (n_cold / cold_seconds):,.0f}x"),
        ("import rows/s (warm cache)", f"{rows / import_seconds:,.0f} ({report.books} books, "
                                       f"{report.pages} pages)"),
    ])
    for problem in problems:
        print(f"left out: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
