"""The pipeline on a home of its own, for tests of the Dagster layer and the prod profile.

`build_trained_home` runs store -> validation -> splits -> tasks -> training -> evaluation ->
champion -> embeddings on the tiny corpus as a real Stage 3 store holds it (`write_named_tiny_store`:
the legacy layout of the original Stage 3 scripts, fused embeddings only, comics with real-looking
names; a configured store inside the home). Every test of the prebuilt home thus sees names that
are not their own partition keys, and the four tasks a fused-only store cannot feed skipped. The
session fixture `prebuilt_home` (conftest.py) builds it once and tests work on copies (`copy_home`).
Its finished training checkpoint also lets other homes with the same data, config and code resume
instead of training again.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dagster as dg

from comic_pipeline import corpus, home
from comic_pipeline.definitions import defs
from comic_pipeline.defs.keys import comics_partitions
from comic_pipeline.defs.resources import PipelineStorage, RefIOManager, Stage3StoreResource, build_resources
from comic_pipeline.demo import graph_definitions
from comic_pipeline.tracking import Tracking
from comic_pipeline_tests.named_stores import collection_names

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
TINY_COMICS = 48  # corpus.SIZES["tiny"]
DAGSTER_FOLDER = "dagster"  # the instance, inside the home (so a copy of the home copies it)
NAMED_STORE = "stage3_named.zarr"  # a home's own Stage 3 store, inside it (so a copy carries it)
NAMED_ROWS = "stage3_named.json"  # ... and its legacy row list
TINY_NAMES = collection_names(TINY_COMICS)  # what the prebuilt home's comics are called
# The tasks a fused-only (legacy) store cannot feed, and the reason each is skipped with.
FUSED_ONLY_SKIPS = {
    "text_closure": "needs text; the store has fused",
    "caption_relevance": "needs caption+fused; the store has fused",
    "character_coherence": "needs text; the store has fused",
    "text_cloze": "needs text; the store has fused",
}

# Small but honest: trains for real, long enough that every gate can pass on the tiny corpus.
TINY_TRAINING = {"preset": "tiny", "epochs": 15, "warmup_steps": 20, "log_every": 100}
TRAINING_GRAPH = dg.AssetSelection.assets("comic_splits", "sequence_model", "champion_model") | \
    dg.AssetSelection.groups("tasks", "evaluation")


def migrate_mlflow_db(folder: Path) -> Path:
    """An MLflow database with every migration applied (~4 s), to copy into new homes."""
    Tracking(home.mlflow_tracking_uri(str(folder)), "template", "template").ensure_reachable()
    return folder / "mlflow.db"


def make_home(folder: Path, migrated_mlflow_db: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_mlflow_db, folder / "mlflow.db")
    return folder


def copy_home(source: Path, target: Path) -> Path:
    """A complete, independent copy of a home: files, Dagster instance, refs and MLflow (whose
    database holds absolute artifact locations, rewritten to the copy)."""
    shutil.copytree(source, target)
    old, new = source.resolve().as_uri(), target.resolve().as_uri()
    with sqlite3.connect(target / "mlflow.db") as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for column in db.execute(f"PRAGMA table_info('{table}')").fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    db.execute(f'UPDATE "{table}" SET "{column[1]}" = replace("{column[1]}", ?, ?)',
                               (old, new))
    return target


@dataclass
class Pipeline:
    home: Path
    instance: dg.DagsterInstance
    resources: dict
    comic_ids: list[str]

    def materialize(self, selection, run_config=None, tags=None, raise_on_error=True, resources=None):
        return dg.materialize(
            assets=graph_definitions(defs()),
            resources=resources or self.resources,
            selection=selection,
            instance=self.instance,
            run_config=run_config,
            tags=tags,
            raise_on_error=raise_on_error,
        )

    def materialize_all_comics(self, selection, **kwargs):
        keys = list(self.instance.get_dynamic_partitions(comics_partitions.name))
        return self.materialize(selection, tags={RANGE_START: keys[0], RANGE_END: keys[-1]}, **kwargs)

    def tracking(self) -> Tracking:
        return self.resources["mlflow_tracking"].tracking()

    def stored(self, key):
        """The ref the IO manager holds for `key` (what its downstream assets receive)."""
        io_manager: RefIOManager = self.resources["io_manager"]
        return io_manager.stored(dg.AssetKey.from_coercible(key))


def write_named_tiny_store(url: str, metadata_url: str) -> list[str]:
    """The tiny corpus in the legacy layout (shuffled rows, junk in padded slots, fused only),
    its comics called TINY_NAMES; returns their keys. What the prebuilt home trains on: a home that
    writes it too has the same data fingerprint."""
    return corpus.write_demo_store(url, corpus.SIZES["tiny"], names=TINY_NAMES, layout="legacy",
                                   metadata_url=metadata_url)


def home_resources(root: Path | str, stage3_url: str | None = None,
                   metadata_url: str | None = None) -> dict:
    """The resources of the home at `root`. Its Stage 3 store: `stage3_url` (+ `metadata_url` for
    the legacy layout), else the home's own NAMED_STORE when it has one, else the demo store."""
    storage = PipelineStorage(home=str(root))
    resources = build_resources(storage)
    if stage3_url is None and (Path(root) / NAMED_STORE).exists():
        stage3_url, metadata_url = str(Path(root) / NAMED_STORE), str(Path(root) / NAMED_ROWS)
    if stage3_url is not None:
        resources["stage3"] = Stage3StoreResource(storage=storage, url=stage3_url, metadata_url=metadata_url)
    return resources


@contextmanager
def open_pipeline(root: Path, **stage3) -> Iterator[Pipeline]:
    """The pipeline of the home at `root`, with its own Dagster instance inside the home;
    `stage3`: home_resources' stage3_url and metadata_url."""
    (root / DAGSTER_FOLDER).mkdir(parents=True, exist_ok=True)
    with dg.instance_for_test(temp_dir=str(root / DAGSTER_FOLDER)) as instance:
        resources = home_resources(root, **stage3)
        comic_ids = resources["stage3"].open().comic_ids() if resources["stage3"].exists() else []
        yield Pipeline(root, instance, resources, comic_ids)


def start_pipeline(pipeline: Pipeline, n_comics: int = TINY_COMICS) -> Pipeline:
    """Materialize stage3_store (on a home without a Stage 3 store of its own: the tiny demo store
    of `n_comics`; else it describes that store) and register its comics as partitions."""
    pipeline.materialize(
        ["stage3_store"], run_config={"ops": {"stage3_store": {"config": {"size": "tiny", "n_comics": n_comics}}}}
    )
    pipeline.comic_ids = pipeline.resources["stage3"].open().comic_ids()
    pipeline.instance.add_dynamic_partitions(comics_partitions.name, pipeline.comic_ids)
    return pipeline


def training_run_config(**overrides) -> dict:
    return {"ops": {"sequence_model": {"config": {**TINY_TRAINING, **overrides}}}}


CHECKPOINT = ("checkpoints", "sequence_model", "checkpoint.pt")  # where sequence_model keeps it


def build_trained_home(root: Path, migrated_mlflow_db: Path) -> Path:
    """Store -> validation -> splits -> tasks -> training -> evaluation -> champion -> embeddings."""
    make_home(root, migrated_mlflow_db)
    write_named_tiny_store(str(root / NAMED_STORE), str(root / NAMED_ROWS))
    with open_pipeline(root) as pipeline:
        start_pipeline(pipeline)
        pipeline.materialize_all_comics(["stage3_panel_embeddings"])
        pipeline.materialize(TRAINING_GRAPH, run_config=training_run_config())
        pipeline.materialize_all_comics(["contextualized_embeddings"])
    return root


def _call_and_report(results, index: int, function, arguments) -> None:
    results.put((index, function(*arguments)))


def run_at_once(function, argument_tuples: list[tuple], timeout_s: float = 600) -> list:
    """function(*arguments) for each tuple, each in a spawned process of its own, all started
    before any is waited for (as concurrent Dagster run workers are); the results in order.

    Processes, not a multiprocessing.Pool: a pool may hand both calls to one worker, and its
    terminate() then hangs on an idle worker that ignores SIGTERM."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_call_and_report, args=(results, index, function, arguments))
                 for index, arguments in enumerate(argument_tuples)]
    for process in processes:
        process.start()
    collected = {}
    try:
        for _ in processes:
            index, value = results.get(timeout=timeout_s)
            collected[index] = value
    except queue.Empty:
        raise AssertionError(f"{function.__name__}: {len(processes) - len(collected)} call(s) gave no result "
                             f"within {timeout_s:.0f} s (exit codes {[p.exitcode for p in processes]})") from None
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return [collected[index] for index in range(len(processes))]
