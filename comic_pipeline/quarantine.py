"""Comics held out of splits, tasks and embeddings because their last validation failed.

Dagster marks every partition of a multi-comic run alike, so a run that validates 50 comics
cannot show one of them as failed. The validation step therefore records each bad comic here (its
key, name, error, when), clears the record of each comic that validates, and never fails the good
ones; comic_splits leaves recorded comics out. A fixed comic comes back by validating it again.

One small JSON document per comic under ``<home>/stage3_quarantine/``, each written whole in one
atomic step (fileio.atomic_write_bytes), so concurrent validation runs never clash.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from fsspec.core import url_to_fs

from comic_pipeline import fileio
from comic_pipeline.comic_groups import read_json
from comic_pipeline.comic_names import is_comic_key

FOLDER = "stage3_quarantine"


@dataclass(frozen=True)
class QuarantineRecord:
    comic_id: str  # the key
    name: str
    error: str
    recorded_at: str


class Quarantine:
    """The quarantine records of one home (folder or fsspec URL)."""

    def __init__(self, home_url: str):
        self.url = fileio.join(home_url, FOLDER)

    def _document(self, comic_id: str) -> str:
        if not is_comic_key(comic_id):
            raise ValueError(f"{comic_id!r} is not a comic key (comic_names.comic_key)")
        return fileio.join(self.url, f"{comic_id}.json")

    def put(self, comic_id: str, name: str, error: str) -> QuarantineRecord:
        record = QuarantineRecord(comic_id, name, error,
                                  datetime.now(timezone.utc).isoformat(timespec="seconds"))
        fileio.atomic_write_bytes(self._document(comic_id), json.dumps(asdict(record)).encode())
        return record

    def clear(self, comic_id: str) -> bool:
        """Drop the record of a comic that validated; True when there was one."""
        fs, path = url_to_fs(self._document(comic_id))
        try:
            fs.rm(path)
            return True
        except FileNotFoundError:
            return False

    def records(self) -> dict[str, QuarantineRecord]:
        """{key: record} of every quarantined comic."""
        fs, path = url_to_fs(self.url)
        try:
            names = [entry.rstrip("/").rpartition("/")[2] for entry in fs.ls(path, detail=False, refresh=True)]
        except FileNotFoundError:
            return {}
        records = {}
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                document = read_json(fileio.join(self.url, name))
                if document is not None:
                    records[document["comic_id"]] = QuarantineRecord(**document)
        return records
