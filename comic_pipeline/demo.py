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


def _materialize(defs: dg.Definitions, selection, instance, label: str, tags=None) -> bool:
    started = time.perf_counter()
    result = dg.materialize(
        assets=graph_definitions(defs),
        resources=defs.resources,
        selection=selection,
        instance=instance,
        tags=tags,
        raise_on_error=False,
    )
    status = "ok" if result.success else "FAILED"
    print(f"[demo] {label}: {status} in {time.perf_counter() - started:.1f} s", flush=True)
    return result.success


def _partition_range(comic_ids: list[str]) -> dict[str, str]:
    return {RANGE_START: comic_ids[0], RANGE_END: comic_ids[-1]}


def run_demo(instance: dg.DagsterInstance) -> int:
    defs = load_defs()
    if not _materialize(defs, ["stage3_store"], instance, "stage3_store (demo corpus)"):
        return 1
    stage3 = defs.resources["stage3"]
    comic_ids = stage3.open().comic_ids()
    known = set(instance.get_dynamic_partitions(comics_partitions.name))
    instance.add_dynamic_partitions(comics_partitions.name, [c for c in comic_ids if c not in known])
    partition_keys = list(instance.get_dynamic_partitions(comics_partitions.name))
    store_keys = [c for c in partition_keys if c in set(comic_ids)]
    # One run over the contiguous range of registered comics (the sensor does the same per comic).
    if not _materialize(defs, ["stage3_panel_embeddings"], instance,
                        f"stage3_panel_embeddings ({len(store_keys)} comics)",
                        tags=_partition_range(partition_keys)):
        return 1
    graph = dg.AssetSelection.assets("comic_splits", "sequence_model", "champion_model") | dg.AssetSelection.groups(
        "tasks", "evaluation"
    )
    trained = _materialize(defs, graph, instance, "splits -> tasks -> training -> evaluation -> champion")
    embedded = trained and _materialize(
        defs, ["contextualized_embeddings"], instance,
        f"contextualized_embeddings ({len(partition_keys)} comics)",
        tags=_partition_range(partition_keys),
    )
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
