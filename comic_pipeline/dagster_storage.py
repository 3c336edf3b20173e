"""The production Dagster instance's storage: PostgreSQL, with the event log on a connection pool.

dagster-postgres opens a new PostgreSQL connection for every event it stores (a NullPool, so that
an idle DagsterInstance holds no connection). A backfill of contextualized_embeddings stores two
events per comic (planned, then materialized), and a new connection costs several times the write
itself: 40.8 vs 6.7 ms per stored materialization, NullPool vs a pool of one, in one run on one
PostgreSQL with fsync on; the liveness check below adds about 0.1 ms.
`benchmarks/dagster_backfill.py --instances postgres,postgres-pooled` has the figure for a whole
backfill. PooledPostgresEventLogStorage is dagster-postgres's own event log storage with its engine
on a small pool instead: at most `pool_size` idle connections per process (a run process, the
daemon, the webserver), `max_overflow` more while threads write at once, checked before use
(`pool_pre_ping`: a connection the server or a proxy dropped is replaced, not failed on) and
recycled after `pool_recycle` seconds. Runs and schedules keep dagster-postgres's storages.

`postgres_storage_config(postgres_db)` is the instance config of deploy/dagster.yaml in code, for
tests and benchmarks that build the same instance on a throwaway cluster.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.storage.config import pg_config
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.utils import create_pg_engine, get_token_provider_from_config, pg_url_from_config

POOL_DEFAULTS = {"pool_size": 1, "max_overflow": 4, "pool_recycle": 3600}


class PooledPostgresEventLogStorage(PostgresEventLogStorage):
    """PostgresEventLogStorage whose connections are pooled per process (see the module doc)."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data=None,
                 token_provider=None, *, pool_size: int = POOL_DEFAULTS["pool_size"],
                 max_overflow: int = POOL_DEFAULTS["max_overflow"],
                 pool_recycle: int = POOL_DEFAULTS["pool_recycle"]):
        if pool_size < 1 or max_overflow < 0 or pool_recycle < 1:
            raise ValueError(f"PooledPostgresEventLogStorage: pool_size must be >= 1 (got {pool_size}), "
                             f"max_overflow >= 0 (got {max_overflow}), pool_recycle >= 1 s (got {pool_recycle})")
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self.pool_settings = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_recycle": pool_recycle}
        self._engine.dispose()  # the parent's NullPool engine: it has made its one check (tables) by now
        self._engine = create_pg_engine(postgres_url, token_provider, isolation_level="AUTOCOMMIT",
                                        pool_pre_ping=True, **self.pool_settings)

    @classmethod
    def config_type(cls):
        return {**pg_config(), **{name: dg.Field(dg.IntSource, is_required=False, default_value=value)
                                  for name, value in POOL_DEFAULTS.items()}}

    @classmethod
    def from_config_value(cls, inst_data, config_value: Mapping[str, Any]) -> "PooledPostgresEventLogStorage":
        return cls(inst_data=inst_data, postgres_url=pg_url_from_config(config_value),
                   should_autocreate_tables=config_value.get("should_autocreate_tables", True),
                   token_provider=get_token_provider_from_config(config_value),
                   **{name: config_value.get(name, value) for name, value in POOL_DEFAULTS.items()})

    def dispose(self) -> None:
        super().dispose()
        self._engine.dispose()  # the pooled connections go with the instance


def postgres_storage_config(postgres_db: Mapping[str, Any], **pool: int) -> dict:
    """The instance config of deploy/dagster.yaml's storage for one `postgres_db` block: runs and
    schedules as dagster-postgres stores them, the event log pooled."""
    connection = {"postgres_db": dict(postgres_db)}
    return {
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage",
                        "config": connection},
        "event_log_storage": {"module": __name__, "class": PooledPostgresEventLogStorage.__name__,
                              "config": {**connection, **pool}},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage",
                             "config": connection},
    }
