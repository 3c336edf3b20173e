"""The production instance's pooled event log on a real PostgreSQL: events stored and read back as
dagster-postgres stores them, a bounded number of connections held, a connection dropped by the
server replaced rather than failed on, and nothing held once the instance is closed."""

from __future__ import annotations

import uuid

import dagster as dg
import pytest

from comic_pipeline.dagster_storage import PooledPostgresEventLogStorage, postgres_storage_config

pytestmark = pytest.mark.prod

ASSET = dg.AssetKey("contextualized_embeddings")


def _connections(services, database: str) -> int:
    """Client connections the server holds to `database` (this check's own is to `postgres`)."""
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=services.postgres_port, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
                       (database,))
        count = cursor.fetchone()[0]
    connection.close()
    return count


def _drop_connections(services, database: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=services.postgres_port, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
    connection.close()


def _materialize(instance, partitions: list[str]) -> None:
    for partition in partitions:
        instance.report_runless_asset_event(dg.AssetMaterialization(ASSET, partition=partition,
                                                                    metadata={"comic_name": f"Comic {partition}"}))


def test_the_pooled_event_log_stores_reads_holds_one_connection_and_survives_a_dropped_one(prod_services):
    database = f"dagster_pool_{uuid.uuid4().hex[:8]}"
    prod_services.create_database(database)
    partitions = [f"comic-{i:03d}" for i in range(30)]
    with dg.instance_for_test(overrides=postgres_storage_config(prod_services.dagster_postgres_db(database))) as instance:
        assert isinstance(instance.event_log_storage, PooledPostgresEventLogStorage)
        instance.add_dynamic_partitions("comics", partitions)
        _materialize(instance, partitions[:20])
        assert instance.get_materialized_partitions(ASSET) == set(partitions[:20])
        # one idle connection kept by the event log (pool_size 1), not one per event; the run and
        # schedule storages (dagster-postgres's NullPool) hold none between calls
        assert _connections(prod_services, database) == 1

        _drop_connections(prod_services, database)  # a server restart, an idle timeout, a proxy
        _materialize(instance, partitions[20:])  # pre-ping replaces the dead connection
        assert instance.get_materialized_partitions(ASSET) == set(partitions)
        latest = instance.get_latest_materialization_event(ASSET)
        assert latest.asset_materialization.metadata["comic_name"].value == "Comic comic-029"
    assert _connections(prod_services, database) == 0  # closing the instance closes the pool


def test_a_pool_setting_that_cannot_work_is_refused_by_name(prod_services):
    url = prod_services.postgres_url("dagster")
    with pytest.raises(ValueError, match="pool_size must be >= 1 .got 0."):
        PooledPostgresEventLogStorage(url, pool_size=0)
    with pytest.raises(ValueError, match="max_overflow >= 0 .got -1."):
        PooledPostgresEventLogStorage(url, max_overflow=-1)
