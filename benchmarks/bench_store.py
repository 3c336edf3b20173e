"""Throughput and memory of the Stage 3 store: writing the demo corpus and validating it.

One row per corpus size; each size runs in a fresh subprocess so that its peak RSS is its own:
  generation pages/s   corpus.write_demo_store (generate + validate + write every comic)
  validation pages/s   Stage3Store.open + ComicReader.validate of every comic (reads all
                       modalities, checks them, hashes the content)
  peak RSS MB          ru_maxrss of that subprocess (includes the interpreter and imports)

    .venv/bin/python benchmarks/bench_store.py [--sizes tiny demo] [--scale 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(size: str, scale: float) -> dict:
    """Runs inside the child: write, then validate, one corpus size."""
    from comic_pipeline import corpus
    from comic_pipeline.store import Stage3Store

    config = corpus.SIZES[size]
    config = dataclasses.replace(config, n_comics=max(1, round(config.n_comics * scale)))
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "stage3.zarr")
        start = time.perf_counter()
        comic_ids = corpus.write_demo_store(url, config)
        generation_s = time.perf_counter() - start

        start = time.perf_counter()
        store = Stage3Store.open(url)
        summaries = [store.comic(comic_id).validate() for comic_id in store.comic_ids()]
        validation_s = time.perf_counter() - start

        store_bytes = sum(os.path.getsize(os.path.join(folder, name))
                          for folder, _, names in os.walk(url) for name in names)
    pages = sum(summary.n_pages for summary in summaries)
    assert len(summaries) == len(comic_ids)
    return {
        "size": size if scale == 1 else f"{size} x{scale:g}",
        "comics": len(comic_ids),
        "pages": pages,
        "dim": config.dim,
        "generation_pages_s": pages / generation_s,
        "validation_pages_s": pages / validation_s,
        "store_mb": store_bytes / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "demo"], help="corpus.SIZES keys")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply n_comics of every size")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "SCALE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], float(args.child[1]))))
        return

    rows = []
    for size in args.sizes:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", size,
                               str(args.scale)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench_store: size {size!r} failed:\n{done.stderr}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    header = (f"{'corpus':<12} {'comics':>7} {'pages':>7} {'dim':>5} {'gen pages/s':>12} "
              f"{'val pages/s':>12} {'store MB':>9} {'peak RSS MB':>12}")
    print("Stage 3 store: write (corpus.write_demo_store) and validate (ComicReader.validate)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['size']:<12} {row['comics']:>7} {row['pages']:>7} {row['dim']:>5} "
              f"{row['generation_pages_s']:>12.0f} {row['validation_pages_s']:>12.0f} "
              f"{row['store_mb']:>9.1f} {row['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
