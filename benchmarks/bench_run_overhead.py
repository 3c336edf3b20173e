"""The fixed cost of one Dagster run: launch -> first comic written, per executor.

What a user waits for when one new comic arrives: a run of contextualized_embeddings for one
partition, launched as a process (`dagster asset materialize`, the same run process a launcher
starts), until the comic's materialization is in the event log, and until the process has exited.
Measured for each executor COMIC_PIPELINE_EXECUTOR can name on one machine (in_process, the
default, and multiprocess, which starts one more process per step).

Setup (not timed): a home with a Stage 3 demo store of a few tiny comics, a seeded untrained
demo-preset champion registered in the home's MLflow (dagster_backfill.py's helpers: the cost of
a run does not depend on the weights), and a Dagster instance in the home with the comics
registered as partitions and validated.

    .venv/bin/python benchmarks/bench_run_overhead.py [--rounds 2] [--executors in_process,multiprocess]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dagster_backfill import (  # noqa: E402  (beside this script)
    build_resources, record_champion_ref, register_champion, validate_comics, write_store,
)
from figures import print_figures  # noqa: E402  (beside this script)

ASSET = "contextualized_embeddings"
N_COMICS = 4


def first_written(instance, partition: str, after: float) -> float | None:
    """Wall clock (time.time()) of the first materialization of ASSET's `partition` after `after`."""
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(ASSET), asset_partitions=[partition], after_timestamp=after),
        limit=1, ascending=True).records
    return records[0].timestamp if records else None


def one_run(env: dict[str, str], instance, partition: str) -> tuple[float, float]:
    """(launch -> comic written, launch -> process exited) seconds of one run process."""
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    started = time.time()
    done = subprocess.run(
        [dagster, "asset", "materialize", "-m", "comic_pipeline.definitions", "--select", ASSET,
         "--partition", partition],
        env=env, capture_output=True, text=True)
    exited = time.time() - started
    if os.environ.get("BENCH_SHOW_RUN_LOG"):
        print(done.stderr, file=sys.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the run of {ASSET}[{partition}] failed ({done.returncode}):\n{done.stderr[-3000:]}")
    written = first_written(instance, partition, started)
    if written is None:
        raise RuntimeError(f"the run of {ASSET}[{partition}] succeeded but recorded no materialization")
    return written - started, exited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per executor, best of each")
    parser.add_argument("--executors", default="in_process,multiprocess")
    args = parser.parse_args()
    executors = args.executors.split(",")

    import dagster as dg

    from comic_pipeline import corpus
    from comic_pipeline import home as home_module

    home = tempfile.mkdtemp(prefix="bench_run_overhead_")
    try:
        stage3_url = home_module.demo_store_url(home)
        comic_ids = write_store(stage3_url, N_COMICS, "tiny")
        pipeline_resources = build_resources(home, None, home_module.contextualized_store_url(home))
        version = register_champion(pipeline_resources["mlflow_tracking"].tracking(), stage3_url)
        record_champion_ref(pipeline_resources, version)
        dagster_home = home_module.dagster_home(home)
        os.makedirs(dagster_home, exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "dagster_home", "dagster.yaml"), dagster_home)
        base_env = {**os.environ, "COMIC_PIPELINE_HOME": home, "DAGSTER_HOME": dagster_home,
                    "COMIC_PIPELINE_PROFILE": "tiny"}
        base_env.pop("COMIC_STAGE3_STORE", None)
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in executors}
        with dg.DagsterInstance.from_config(dagster_home) as instance:
            instance.add_dynamic_partitions("comics", comic_ids)
            validate_comics(instance, pipeline_resources, comic_ids)
            partitions = iter(comic_ids * (args.rounds + 1))
            for round_index in range(args.rounds):
                for name in executors:
                    timing = one_run({**base_env, "COMIC_PIPELINE_EXECUTOR": name}, instance, next(partitions))
                    timings[name].append(timing)
                    print(f"round {round_index} {name}: written after {timing[0]:.1f} s, exited after "
                          f"{timing[1]:.1f} s", file=sys.stderr, flush=True)
        rows = [("run", f"{ASSET} of one tiny comic ({corpus.SIZES['tiny'].pages_max} pages at most), "
                        f"`dagster asset materialize` process, champion v{version} (demo preset), "
                        f"best of {args.rounds}")]
        best = {name: min(timings[name]) for name in executors}
        for name in executors:
            written, exited = best[name]
            rows.append((f"{name}: launch -> comic written", f"{written:.1f} s"))
            rows.append((f"{name}: launch -> run process exited", f"{exited:.1f} s"))
        if len(executors) == 2:
            (a, b) = executors
            rows.append((f"{b} / {a}, launch -> comic written", f"{best[b][0] / best[a][0]:.2f}x"))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print_figures(rows)


if __name__ == "__main__":
    main()
