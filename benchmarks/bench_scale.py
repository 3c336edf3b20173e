"""Scale on paper and by simulation (DESIGN §8): 100k comic partitions on a PostgreSQL instance.

Starts a throwaway PostgreSQL cluster (as the prod tests do), registers N comic partitions in
Dagster's instance on it, and prints:
  register               add_dynamic_partitions in batches of 10,000
  list                   get_dynamic_partitions (what new_comics_sensor reads every tick)
  sensor tick            new_comics_sensor with N known comics and 25 new ones / none new
                         (the Stage 3 store's listing is simulated: only Dagster's side is timed)
  stale check per comic  ContextualizedStore.stale_comics on a local store of --stale-comics
                         comics (reads each comic's zarr.json), per comic and extrapolated to N

    .venv/bin/python benchmarks/bench_scale.py [--partitions 100000] [--stale-comics 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.figures import print_figures  # noqa: E402
from comic_pipeline import embedding_store  # noqa: E402
from comic_pipeline.defs.automation import new_comics_sensor  # noqa: E402
from comic_pipeline.defs.resources import MLflowTracking, PipelineStorage, Stage3StoreResource  # noqa: E402
from comic_pipeline.defs.stage3 import comics_partitions  # noqa: E402
from comic_pipeline_tests.prod.servers import start_postgres  # noqa: E402


class SimulatedStore:
    def __init__(self, comic_ids: list[str]):
        self._ids = comic_ids

    def comic_ids(self) -> list[str]:
        return self._ids


class SimulatedStage3(Stage3StoreResource):
    """A Stage 3 store resource whose listing is a given list (no Zarr read is timed)."""

    comic_ids_file: str

    def exists(self) -> bool:
        return True

    def open(self):
        return SimulatedStore(Path(self.comic_ids_file).read_text().splitlines())


class NoChampion(MLflowTracking):
    def tracking(self):
        class _Tracking:
            def champion_version(self):
                return None
        return _Tracking()


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def sensor_tick(instance, store_ids: list[str], folder: str) -> float:
    ids_file = os.path.join(folder, f"ids-{len(store_ids)}.txt")
    Path(ids_file).write_text("\n".join(store_ids))
    storage = PipelineStorage(home=folder)
    resources = {"stage3": SimulatedStage3(storage=storage, comic_ids_file=ids_file),
                 "mlflow_tracking": NoChampion(storage=storage)}

    def tick():
        with dg.build_sensor_context(instance=instance, resources=resources) as context:
            return new_comics_sensor(context)

    seconds, result = timed(tick)
    return seconds, result


def stale_check_per_comic(n_comics: int, folder: str) -> float:
    url = os.path.join(folder, "contextualized.zarr")
    rng = np.random.default_rng(0)
    for i in range(n_comics):
        pages = 4
        embedding_store.write_comic(
            url, f"comic-{i:05d}", panel_embeddings=rng.normal(size=(pages, 8, 16)).astype(np.float32),
            strip_embeddings=rng.normal(size=(pages, 16)).astype(np.float32),
            panel_mask=np.ones((pages, 8), dtype=bool), page_ids=[f"p{j}" for j in range(pages)],
            model_name="m", model_version="1" if i % 2 else "2", mlflow_run_id=None, stage3_content_hash="h",
        )
    store = embedding_store.ContextualizedStore.open(url)
    seconds, stale = timed(lambda: store.stale_comics("2"))
    assert len(stale) == n_comics // 2
    return seconds / n_comics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=100_000)
    parser.add_argument("--stale-comics", type=int, default=200)
    args = parser.parse_args()
    n = args.partitions
    with tempfile.TemporaryDirectory() as folder:
        pg_folder = tempfile.mkdtemp(prefix="bench-scale-pg-")
        os.chmod(pg_folder, 0o755)
        postgres, port = start_postgres(Path(pg_folder))
        try:
            postgres_db = {"hostname": "127.0.0.1", "port": port, "username": "postgres", "password": "",
                           "db_name": "postgres", "scheme": "postgresql+psycopg2"}
            with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_db": postgres_db}}}) as instance:
                keys = [f"comic-{i:06d}" for i in range(n)]
                start = time.perf_counter()
                for batch in range(0, n, 10_000):
                    instance.add_dynamic_partitions(comics_partitions.name, keys[batch:batch + 10_000])
                register_s = time.perf_counter() - start
                list_s, listed = timed(lambda: instance.get_dynamic_partitions(comics_partitions.name))
                assert len(listed) == n
                has_s, _ = timed(lambda: instance.has_dynamic_partition(comics_partitions.name, keys[-1]))
                new_ids = [f"new-{i:03d}" for i in range(25)]
                tick_new_s, result = sensor_tick(instance, keys + new_ids, folder)
                assert len(result.run_requests) == 25
                tick_none_s, _ = sensor_tick(instance, keys, folder)
        finally:
            postgres.stop()
            import shutil

            shutil.rmtree(pg_folder, ignore_errors=True)
        per_comic_s = stale_check_per_comic(args.stale_comics, folder)
    print_figures([
        ("partitions (PostgreSQL instance)", f"{n:,}"),
        ("register, batches of 10k", f"{register_s:.1f} s ({n / register_s:,.0f} partitions/s)"),
        ("list all partitions", f"{list_s * 1000:.0f} ms"),
        ("has_dynamic_partition (one key)", f"{has_s * 1000:.1f} ms"),
        (f"sensor tick, {n:,} known + 25 new", f"{tick_new_s:.2f} s"),
        (f"sensor tick, {n:,} known, none new", f"{tick_none_s:.2f} s"),
        (f"stale check per comic ({args.stale_comics} comics, local)", f"{per_comic_s * 1000:.2f} ms"),
        (f"stale check extrapolated to {n:,}", f"{per_comic_s * n:.0f} s"),
        (f"backfill of {n:,} one-comic runs at ~1 run/s", f"{n / 3600:.1f} h of submission alone"),
    ])


if __name__ == "__main__":
    main()
