"""`make demo`: generate the demo corpus and materialize the whole asset graph from the command line.

Everything lands in the persistent Dagster instance of the home folder, so `make dev` shows the
same runs, materializations and checks afterwards. Runs execute in-process (one Python process,
no per-run start-up); the UI uses the multiprocess executor.
"""

from __future__ import annotations

import os
import sys
import time

import dagster as dg

from comic_pipeline import home
from comic_pipeline.definitions import defs as load_defs
from comic_pipeline.defs.keys import comics_partitions
from comic_pipeline.defs.report import summary_table

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def graph_definitions(defs: dg.Definitions) -> list:
    """Every asset and check of `defs` (each defined once: asset files never import each other)."""
    return [*(defs.assets or []), *(defs.asset_checks or [])]


def materialize(defs: dg.Definitions, selection, instance, label: str, tags=None, *,
                resources=None, run_config=None, log=print, prefix: str = "demo") -> dg.ExecuteInProcessResult:
    """One in-process run of `selection` over the real definitions (`resources`: default the
    definitions' own), timed and reported in one line; never raises on a failed step."""
    started = time.perf_counter()
    result = dg.materialize(
        assets=graph_definitions(defs),
        resources=resources or defs.resources,
        selection=selection,
        instance=instance,
        tags=tags,
        run_config=run_config,
        raise_on_error=False,
    )
    status = "ok" if result.success else "FAILED"
    log(f"[{prefix}] {label}: {status} in {time.perf_counter() - started:.1f} s")
    return result


def validate_store_comics(defs: dg.Definitions, instance, stage3, *, resources=None, log=print,
                          prefix: str = "demo", prune: bool = False) -> bool:
    """stage3_store, then one `comics` partition per comic of the store (`prune`: and none of a
    comic no longer there), then one stage3_panel_embeddings run over them all."""
    def run(selection, label, tags=None):
        return materialize(defs, selection, instance, label, tags, resources=resources, log=log,
                           prefix=prefix).success

    if not run(["stage3_store"], "stage3_store"):
        return False
    comic_ids = stage3.open().comic_ids()
    known = list(instance.get_dynamic_partitions(comics_partitions.name))
    if prune:
        for key in set(known) - set(comic_ids):
            instance.delete_dynamic_partition(comics_partitions.name, key)
    instance.add_dynamic_partitions(comics_partitions.name, [c for c in comic_ids if c not in set(known)])
    partition_keys = list(instance.get_dynamic_partitions(comics_partitions.name))
    store_keys = [c for c in partition_keys if c in set(comic_ids)]
    # One run over the contiguous range of registered comics (the sensor does the same per comic).
    return run(["stage3_panel_embeddings"], f"stage3_panel_embeddings ({len(store_keys)} comics)",
               _partition_range(partition_keys))


def _partition_range(comic_ids: list[str]) -> dict[str, str]:
    return {RANGE_START: comic_ids[0], RANGE_END: comic_ids[-1]}


def run_demo(instance: dg.DagsterInstance) -> int:
    defs = load_defs()
    if not validate_store_comics(defs, instance, defs.resources["stage3"]):
        return 1
    partition_keys = list(instance.get_dynamic_partitions(comics_partitions.name))
    graph = dg.AssetSelection.assets("comic_splits", "sequence_model", "champion_model") | dg.AssetSelection.groups(
        "tasks", "evaluation"
    )
    trained = materialize(defs, graph, instance, "splits -> tasks -> training -> evaluation -> champion").success
    embedded = trained and materialize(
        defs, ["contextualized_embeddings"], instance,
        f"contextualized_embeddings ({len(partition_keys)} comics)",
        tags=_partition_range(partition_keys),
    ).success
    print(summary_table(instance, defs.resources["io_manager"]))
    return 0 if trained and embedded else 1


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = os.path.join(home.default_home(), "dagster")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    with dg.DagsterInstance.get() as instance:
        return run_demo(instance)


if __name__ == "__main__":
    sys.exit(main())
