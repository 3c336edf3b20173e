"""Reading an upstream asset through its materialization record (never "the newest file")."""


from typing import Any, Mapping

import dagster as dg


def latest_metadata(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None
) -> Mapping[str, Any]:
    """Metadata values of `key`'s latest materialization; a clear failure when there is none."""
    if partition is None:
        event = instance.get_latest_materialization_event(key)
    else:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
        )
        event = result.records[0].event_log_entry if result.records else None
    if event is None or event.asset_materialization is None:
        where = f" (partition {partition!r})" if partition else ""
        raise dg.Failure(
            f"{key.to_user_string()}{where} has not been materialized yet: materialize it first."
        )
    return {name: value.value for name, value in event.asset_materialization.metadata.items()}
