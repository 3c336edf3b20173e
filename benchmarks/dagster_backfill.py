"""Dagster overhead of a contextualized-embedding backfill: its Dagster runs vs the pure compute.

A backfill of contextualized_embeddings batches many comics per run: the asset's backfill policy
gives each run at most max_partitions_per_run comics (COMIC_PIPELINE_EMBEDDING_RUN_COMICS, 1,000 by
default), so N comics take ceil(N / that) runs.
This times those runs one after the other (each a dg.materialize over its slice of the "comics"
partition range, tags dagster/asset_partition_range_*, in this process: what a run does once
its process is up; the launch of a run process is bench_run_overhead.py's figure) against the
same work without Dagster (embedding_pipeline.embed_and_write over all N comics with the same
champion model and batch size, model loaded once), in one process, and prints both and the
ratio. --per-run 0 puts every comic in one run.

Setup (not timed): a temporary home, a Stage 3 demo store of N comics in it, the comics registered
as dynamic partitions of a test Dagster instance, and a champion: a SequenceModel at the "demo"
preset (random init, seeded) logged and registered through MLflow and given the champion alias —
the embedding asset only needs a champion version, not a trained one.

Timed: the dg.materialize calls (instance and definitions built before), which include what a
run does besides computing (event log writes, one materialization per comic, the pins lookup,
the champion's model load from the registry in every run, the asset check); and embed_and_write
alone (model loaded before the timer). Both load their comics lazily from the Stage 3 store as
the asset does. The table also gives the seconds of the asset's summary line inside the runs:
from the start of its embed_and_write until its per-comic materializations have been yielded (so
stored in the event log), not the embedding alone.

Also the DAGSTER_BACKFILL_HOOK of bench_embeddings.py: dagster_backfill_seconds(stage3_url,
out_url, comic_ids) runs the Dagster half over a given store.

    .venv/bin/python benchmarks/dagster_backfill.py [--comics 2000] [--size demo|tiny]
        [--batch-pages 256] [--threads 1] [--rounds 2] [--per-run N]
        [--instances sqlite,postgres,postgres-pooled]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from figures import print_figures  # noqa: E402  (beside this script)

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
ASSET = "contextualized_embeddings"


# --- setup -------------------------------------------------------------------------------------
def write_store(url: str, n_comics: int, size: str) -> list[str]:
    """The demo corpus generator at `size` ("demo" or "tiny" pages), scaled to n_comics."""
    from comic_pipeline import corpus

    config = dataclasses.replace(corpus.SIZES[size], n_comics=n_comics)
    return list(corpus.write_demo_store(url, config))


def register_champion(tracking, stage3_url: str, preset: str = "demo", seed: int = 0) -> str:
    """Log + register a seeded, untrained SequenceModel sized for the store; make it champion.

    Returns the registered version. Honest for an embedding benchmark: the asset's cost does not
    depend on the weights, only on the model's shape."""
    import torch

    from comic_pipeline import model as model_module
    from comic_pipeline.store import Stage3Store
    from comic_pipeline.tracking import model_requirements
    from comic_pipeline.train_config import PRESETS

    store = Stage3Store.open(stage3_url)
    config = PRESETS[preset].sized_for(dim=store.dim, max_panels=store.max_panels, max_boxes=store.max_boxes,
                                       modalities=store.modalities())
    torch.manual_seed(seed)
    sequence_model = model_module.SequenceModel(config).eval()
    first = store.comic(store.comic_ids()[0]).features()
    example = first.fused[:2] if first.fused is not None else None
    with tracking.start_run(run_name="bench-dagster-backfill", tags={"purpose": "benchmark"}):
        _, version = tracking.log_and_register_model(sequence_model, example,
                                                     pip_requirements=model_requirements())
    tracking.set_champion(version)
    return version


def record_champion_ref(pipeline_resources: dict, version: str) -> None:
    """What champion_model hands contextualized_embeddings (a ModelRef), stored by the pipeline's
    IO manager as if champion_model had promoted `version`."""
    import dagster as dg

    from comic_pipeline.defs.keys import CHAMPION_MODEL
    from comic_pipeline.defs.refs import ModelRef

    tracking = pipeline_resources["mlflow_tracking"].tracking()
    ref = ModelRef(name=tracking.registered_model_name, version=version, run_id=tracking.run_id_of(version),
                   uri=f"models:/{tracking.registered_model_name}/{version}", datasets={})
    pipeline_resources["io_manager"].handle_output(dg.build_output_context(asset_key=CHAMPION_MODEL), ref)


def validate_comics(instance, pipeline_resources: dict, comic_ids: list[str]) -> None:
    """Materialize stage3_panel_embeddings for comic_ids (contiguous partitions of `instance`):
    contextualized_embeddings embeds only comics whose Stage 3 content was validated."""
    import dagster as dg

    from comic_pipeline.definitions import defs
    from comic_pipeline.demo import graph_definitions
    from comic_pipeline.defs.stage3 import stage3_panel_embeddings

    validated = set()
    for run_comics in runs_of(comic_ids, partitions_per_run(stage3_panel_embeddings)):  # as its policy cuts runs
        result = dg.materialize(
            assets=graph_definitions(defs()), resources=pipeline_resources, selection=["stage3_panel_embeddings"],
            instance=instance, tags={RANGE_START: run_comics[0], RANGE_END: run_comics[-1]},
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        validated |= {m.partition for m in result.asset_materializations_for_node("stage3_panel_embeddings")}
    if validated != set(comic_ids):
        raise RuntimeError(f"validation left out {sorted(set(comic_ids) - validated)}")


def build_resources(home: str, stage3_url: str | None, out_url: str) -> dict:
    """The pipeline's resources over `home`, reading stage3_url (None: the home's demo store) and
    writing the contextualized store at out_url."""
    from comic_pipeline.defs import resources

    storage = resources.PipelineStorage(home=home, contextualized_store=out_url)
    built = resources.build_resources(storage)
    if stage3_url is not None:
        built["stage3"] = resources.Stage3StoreResource(storage=storage, url=stage3_url)
    return built


# --- the two halves ----------------------------------------------------------------------------
def runs_of(comic_ids: list[str], per_run: int | None) -> list[list[str]]:
    """The comics of each run of a backfill: consecutive slices of at most `per_run` (None or 0:
    one run), as a multi-run backfill policy cuts a partition range."""
    size = per_run or len(comic_ids)
    return [comic_ids[start:start + size] for start in range(0, len(comic_ids), size)]


def partitions_per_run(asset) -> int | None:
    """max_partitions_per_run of `asset`'s backfill policy (None: one run)."""
    policy = asset.backfill_policy
    return getattr(policy, "max_partitions_per_run", None) if policy is not None else None


def embedding_partitions_per_run() -> int | None:
    from comic_pipeline.defs.embeddings import contextualized_embeddings

    return partitions_per_run(contextualized_embeddings)


_SUMMARY = re.compile(r"comics \((\d+) pages\) embedded in ([0-9.]+) s")


def _asset_seconds(instance, run_id: str) -> float:
    """The seconds the asset's summary line gives for its run (embed_and_write plus yielding its
    per-comic materializations), NaN when absent."""
    for entry in instance.all_logs(run_id):
        match = _SUMMARY.search(entry.user_message or "")
        if match:
            return float(match.group(2))
    return float("nan")


READER_PROCESSES = 0  # --reader-processes: the asset's reader_processes, in both halves


def time_dagster_run(instance, pipeline_resources: dict, comic_ids: list[str], batch_pages: int | None
                     ) -> tuple[float, float]:
    """(wall seconds of one dg.materialize of contextualized_embeddings over comic_ids' partition
    range, seconds its summary line gives: embedding + storing its materializations). comic_ids must be contiguous in the
    instance's "comics" partitions. The run includes the asset's check, as a backfill run does."""
    import dagster as dg

    from comic_pipeline.definitions import defs
    from comic_pipeline.demo import graph_definitions

    assets = graph_definitions(defs())
    # console at WARNING keeps the terminal readable; every event still goes to the instance
    run_config: dict = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    asset_config = {"batch_pages": batch_pages} if batch_pages else {}
    if READER_PROCESSES:
        asset_config["reader_processes"] = READER_PROCESSES
    if asset_config:
        run_config["ops"] = {ASSET: {"config": asset_config}}
    started = time.perf_counter()
    result = dg.materialize(
        assets=assets, resources=pipeline_resources, selection=[ASSET], instance=instance,
        run_config=run_config, tags={RANGE_START: comic_ids[0], RANGE_END: comic_ids[-1]},
    )
    seconds = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(f"the Dagster run of {ASSET} over {len(comic_ids)} comics failed")
    written = {m.partition for m in result.asset_materializations_for_node(ASSET)}  # one per comic
    if written != set(comic_ids):
        raise RuntimeError(f"the Dagster run embedded {len(written)} comics, expected {len(comic_ids)}: "
                           f"missing {sorted(set(comic_ids) - written)[:5]}")
    return seconds, _asset_seconds(instance, result.run_id)


def time_dagster_backfill(instance, pipeline_resources: dict, comic_ids: list[str], batch_pages: int | None,
                          per_run: int | None) -> tuple[float, float, int]:
    """(wall seconds of every run of the backfill, seconds of embedding inside them, runs)."""
    runs = runs_of(comic_ids, per_run)
    wall = in_asset = 0.0
    for run_comics in runs:
        seconds, asset_seconds = time_dagster_run(instance, pipeline_resources, run_comics, batch_pages)
        wall += seconds
        in_asset += asset_seconds
    return wall, in_asset, len(runs)


def time_pure_compute(tracking, stage3_url: str, out_url: str, comic_ids: list[str], batch_pages: int,
                      device: str = "auto") -> float:
    """Seconds of embed_and_write over the same comics with the champion model, as the asset's
    body does it (lazy inputs with all modalities, content hash validated on load, reader
    processes as --reader-processes says, started inside the timing as a run starts them),
    minus Dagster."""
    from comic_pipeline import embedding_pipeline, inference
    from comic_pipeline.store import Stage3Store

    version = tracking.champion_version()
    model = tracking.load_model(version)
    run_id = tracking.run_id_of(version)
    count = embedding_pipeline.reader_process_count(READER_PROCESSES, len(comic_ids))
    started = time.perf_counter()  # the store's listing and the inputs are the asset's work too
    with contextlib.ExitStack() as closing:
        processes = closing.enter_context(embedding_pipeline.reader_processes(count)) if count else None
        store = Stage3Store.open(stage3_url)
        comics = [embedding_pipeline.ComicInput.from_store(store, comic_id, processes=processes)
                  for comic_id in comic_ids]
        written = embedding_pipeline.embed_and_write(
            out_url, comics, encode=lambda features: inference.embed_pages(model, features, device=device),
            batch_pages=batch_pages, model_name=tracking.registered_model_name, model_version=version,
            mlflow_run_id=run_id,
        )
    seconds = time.perf_counter() - started
    if len(written) != len(comic_ids):
        raise RuntimeError(f"embed_and_write wrote {len(written)} comics, expected {len(comic_ids)}")
    return seconds


# --- bench_embeddings.py's hook ----------------------------------------------------------------
def dagster_backfill_seconds(stage3_url: str, out_url: str, comic_ids: list[str]) -> float:
    """DAGSTER_BACKFILL_HOOK: the Dagster runs of a backfill (the asset's backfill policy)
    embedding comic_ids of stage3_url into out_url, with a seeded demo-preset champion registered
    in a throwaway home (setup not timed). Torch threads are left as the caller set them, so both
    halves of a comparison run alike."""
    import dagster as dg

    with tempfile.TemporaryDirectory(prefix="bench_dagster_home_") as home:
        pipeline_resources = build_resources(home, stage3_url, out_url)
        version = register_champion(pipeline_resources["mlflow_tracking"].tracking(), stage3_url)
        record_champion_ref(pipeline_resources, version)
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("comics", list(comic_ids))
            validate_comics(instance, pipeline_resources, list(comic_ids))
            return time_dagster_backfill(instance, pipeline_resources, list(comic_ids), None,
                                         embedding_partitions_per_run())[0]


# --- main --------------------------------------------------------------------------------------
INSTANCE_KINDS = {
    "sqlite": "the local profile's storage",
    "postgres": "dagster-postgres as shipped: a new connection per stored event",
    "postgres-pooled": "the production profile's (deploy/dagster.yaml): the event log pooled",
}


@contextlib.contextmanager
def dagster_instance(kind: str):
    """A throwaway Dagster instance of one of INSTANCE_KINDS; the PostgreSQL kinds start a
    throwaway cluster with fsync on, as the prod tests start one."""
    import dagster as dg

    if kind not in INSTANCE_KINDS:
        raise ValueError(f"unknown instance kind {kind!r}: {', '.join(INSTANCE_KINDS)}")
    if kind == "sqlite":
        with dg.instance_for_test() as instance:
            yield instance
        return
    from pathlib import Path

    from comic_pipeline.dagster_storage import postgres_storage_config
    from comic_pipeline_tests.prod.servers import start_postgres

    folder = tempfile.mkdtemp(prefix="bench-backfill-pg-")
    os.chmod(folder, 0o755)  # postgres runs as its own user
    postgres, port = start_postgres(Path(folder), fsync=True)
    try:
        postgres_db = {"hostname": "127.0.0.1", "port": port, "username": "postgres", "password": "",
                       "db_name": "postgres", "scheme": "postgresql+psycopg2"}
        overrides = (postgres_storage_config(postgres_db) if kind == "postgres-pooled"
                     else {"storage": {"postgres": {"postgres_db": postgres_db}}})
        with dg.instance_for_test(overrides=overrides) as instance:
            yield instance
    finally:
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comics", type=int, default=2000)
    parser.add_argument("--size", choices=("demo", "tiny"), default="demo",
                        help="page sizes of the generated corpus (corpus.SIZES)")
    parser.add_argument("--batch-pages", type=int, default=None,
                        help="pages per model batch (default: the asset's EmbeddingConfig default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in both halves")
    parser.add_argument("--reader-processes", type=int, default=0,
                        help="Stage 3 reader processes per run in both halves (the asset's reader_processes)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved rounds (pure, then each instance's backfill), best of each")
    parser.add_argument("--per-run", type=int, default=None,
                        help="comics per Dagster run (default: the asset's backfill policy; 0: one run)")
    parser.add_argument("--instances", default="sqlite",
                        help="Dagster instance storages, comma-separated: "
                             + "; ".join(f"{kind} ({what})" for kind, what in INSTANCE_KINDS.items()))
    args = parser.parse_args()
    kinds = args.instances.split(",")
    global READER_PROCESSES
    READER_PROCESSES = args.reader_processes

    import torch

    from comic_pipeline import embedding_pipeline
    from comic_pipeline import home as home_module
    from comic_pipeline.defs.embeddings import EmbeddingConfig

    torch.set_num_threads(args.threads)
    batch_pages = args.batch_pages or EmbeddingConfig().batch_pages
    per_run = embedding_partitions_per_run() if args.per_run is None else args.per_run
    rows: list[tuple[str, str]] = []
    home = tempfile.mkdtemp(prefix="bench_dagster_backfill_")
    try:
        stage3_url = home_module.demo_store_url(home)
        t0 = time.perf_counter()
        comic_ids = write_store(stage3_url, args.comics, args.size)
        setup = {"store": time.perf_counter() - t0}
        t0 = time.perf_counter()
        # the home's own demo store (Stage3StoreResource's default) and contextualized store
        pipeline_resources = build_resources(home, None, home_module.contextualized_store_url(home))
        tracking = pipeline_resources["mlflow_tracking"].tracking()
        version = register_champion(tracking, stage3_url)
        record_champion_ref(pipeline_resources, version)
        setup["champion"] = time.perf_counter() - t0

        from comic_pipeline.store import Stage3Store

        store = Stage3Store.open(stage3_url)
        n_pages = sum(store.comic(comic_id).n_pages for comic_id in comic_ids)
        pure_seconds: list[float] = []
        dagster_seconds: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
        n_runs = len(runs_of(comic_ids, per_run))
        with contextlib.ExitStack() as stack:
            instances = {}
            for kind in kinds:
                instances[kind] = stack.enter_context(dagster_instance(kind))
                t0 = time.perf_counter()
                instances[kind].add_dynamic_partitions("comics", comic_ids)
                validate_comics(instances[kind], pipeline_resources, comic_ids)
                setup[f"validate {kind}"] = time.perf_counter() - t0
                print(f"{kind}: {len(comic_ids)} comics validated in {setup[f'validate {kind}']:.1f} s",
                      file=sys.stderr, flush=True)
            for round_index in range(args.rounds):
                pure_seconds.append(time_pure_compute(
                    tracking, stage3_url, os.path.join(home, f"pure_{round_index}.zarr"), comic_ids, batch_pages))
                print(f"round {round_index}: pure {pure_seconds[-1]:.2f} s", file=sys.stderr, flush=True)
                for kind, instance in instances.items():
                    round_resources = build_resources(home, None,
                                                      os.path.join(home, f"dagster_{kind}_{round_index}.zarr"))
                    wall, in_asset, _ = time_dagster_backfill(instance, round_resources, comic_ids, batch_pages,
                                                              per_run)
                    dagster_seconds[kind].append((wall, in_asset))
                    print(f"round {round_index}: Dagster ({kind}) {wall:.2f} s", file=sys.stderr, flush=True)
        pure = min(pure_seconds)
        rows += [
            ("corpus", f"demo generator, {args.size} page sizes, {len(comic_ids)} comics, {n_pages} pages "
                       f"(written in {setup['store']:.1f} s)"),
            ("model", f"SequenceModel demo preset, random init (seed 0), MLflow version {version} as champion "
                      f"(set up in {setup['champion']:.1f} s)"),
            ("settings", f"batch_pages {batch_pages}, torch threads {args.threads}, Stage 3 reader "
                         f"processes per run {embedding_pipeline.reader_process_count(READER_PROCESSES, per_run or len(comic_ids))}, "
                         f"best of {args.rounds} interleaved round(s); {n_runs} run(s) of at most "
                         f"{per_run or len(comic_ids)} comics, each a dg.materialize in this process "
                         f"(run-process launch not included: bench_run_overhead.py)"),
            (f"(c) backfill {len(comic_ids)} comics, pure compute", f"{pure:.2f} s (embed_and_write, no Dagster)"),
        ]
        for kind in kinds:
            dagster, in_asset = min(dagster_seconds[kind])
            rows += [
                (f"(c) backfill {len(comic_ids)} comics, Dagster on {kind}",
                 f"{dagster:.2f} s ({in_asset:.2f} s of it in the asset's summary line: embedding + its per-comic "
                 f"materializations; "
                 f"validating the comics took {setup[f'validate {kind}']:.1f} s, not timed)"),
                (f"(c) Dagster overhead, {kind}", f"{dagster / pure:.2f}x pure compute "
                                                  f"(+{dagster - pure:.2f} s; target <= 1.3x)"),
            ]
    finally:
        shutil.rmtree(home, ignore_errors=True)

    print_figures(rows)


if __name__ == "__main__":
    main()
