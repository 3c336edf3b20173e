"""new_comics_sensor never reads a Stage 3 store while a run is writing it.

Rewriting the demo store (what "Materialize all" does to stage3_store) first replaces it with an
empty store and then adds the comics one by one: a tick listing it then would retire every comic
not yet rewritten (their partitions deleted under a running backfill), or register half of a new
store.
"""

from __future__ import annotations

import dataclasses
import uuid

import dagster as dg

from comic_pipeline import corpus, store
from comic_pipeline.defs.automation import new_comics_sensor
from comic_pipeline.defs.keys import STAGE3_STORE, comics_partitions


def _evaluate_sensor(pipeline):
    with dg.build_sensor_context(instance=pipeline.instance, resources=pipeline.resources) as context:
        return new_comics_sensor(context)


def _run(pipeline, status: dg.DagsterRunStatus, selection: set[dg.AssetKey]) -> dg.DagsterRun:
    run = dg.DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), status=status,
                        asset_selection=frozenset(selection))
    return pipeline.instance.add_run(run)


def test_the_sensor_waits_while_stage3_store_is_being_written(empty_pipeline):
    pipeline = empty_pipeline
    url = pipeline.resources["stage3"].store_url()
    config = dataclasses.replace(corpus.SIZES["tiny"], n_comics=4)
    comic_ids = corpus.write_demo_store(url, config)
    pipeline.instance.add_dynamic_partitions(comics_partitions.name, comic_ids)
    # a rewrite in progress: write_demo_store has replaced the store with an empty one
    store.create_native_store(url, dim=config.dim, max_panels=config.max_panels, overwrite=True)
    writer = _run(pipeline, dg.DagsterRunStatus.STARTED, {STAGE3_STORE})
    _run(pipeline, dg.DagsterRunStatus.STARTED, {dg.AssetKey("comic_splits")})  # not a writer

    waiting = _evaluate_sensor(pipeline)
    assert isinstance(waiting, dg.SkipReason)
    assert "stage3_store is being written" in waiting.skip_message and writer.run_id in waiting.skip_message
    assert list(pipeline.instance.get_dynamic_partitions(comics_partitions.name)) == comic_ids

    # once the writer has finished, what the store holds is what counts
    pipeline.instance.report_run_canceled(writer)
    result = _evaluate_sensor(pipeline)
    assert isinstance(result, dg.SensorResult)
    (retire,) = result.dynamic_partitions_requests
    assert sorted(retire.partition_keys) == sorted(comic_ids)
