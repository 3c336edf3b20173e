"""The values that travel along the asset edges: small, typed references to what an asset wrote.

Large arrays never travel: they stay in the files these refs name (Parquet, npz, the MLflow
registry). Paths are relative to the home, so a home can be copied or moved (a folder, an object
store) without rewriting its refs. `RefIOManager` (defs/io_manager.py) stores them as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class SplitsRef:
    """comic_splits: the Parquet table comic id -> split."""

    path: str  # relative to the home
    fingerprint: str  # content hash of the table
    counts: Mapping[str, int]  # comics per split


@dataclass(frozen=True)
class TaskDatasetRef:
    """tasks/<task>: one generated dataset (an .npz under a content-addressed name), or a skip."""

    task: str
    path: str | None  # relative to the home; None when skipped
    fingerprint: str | None  # schema.TaskDataset.fingerprint() of the file; None when skipped
    n_options: int  # K (0 for an ordering task)
    chance: float
    splits_fingerprint: str  # the SplitsRef it was generated from
    skipped: str | None = None  # why the task could not be generated from this store

    def __post_init__(self):
        if (self.skipped is None) == (self.path is None):
            raise ValueError(f"TaskDatasetRef {self.task!r}: give exactly one of path and skipped")


@dataclass(frozen=True)
class ModelRef:
    """sequence_model / champion_model: one registered model version and what it trained on."""

    name: str  # registered model name
    version: str
    run_id: str  # the MLflow run of its training (evaluation logs into it too)
    uri: str  # models:/<name>/<version>
    datasets: Mapping[str, TaskDatasetRef]  # every task, skipped ones included

    def trained_tasks(self) -> list[str]:
        return [name for name, ref in self.datasets.items() if ref.skipped is None]

    def fingerprints(self) -> dict[str, str | None]:
        return {name: ref.fingerprint for name, ref in self.datasets.items()}


@dataclass(frozen=True)
class TaskReport:
    """evaluation/<task>: test-split figures of one model version on one dataset, and its gates."""

    task: str
    model_version: str
    dataset_fingerprint: str | None
    metrics: Mapping[str, float] = field(default_factory=dict)
    gates: Mapping[str, bool] = field(default_factory=dict)  # blocking gate -> passed
    skipped: str | None = None


@dataclass(frozen=True)
class EvaluationReport:
    """evaluation/summary: every task's report for one model, and the strip-embedding metrics."""

    model: ModelRef
    tasks: Mapping[str, TaskReport]
    strip: Mapping[str, float] = field(default_factory=dict)

    def accuracy(self, task: str) -> float | None:
        report = self.tasks.get(task)
        if report is None or report.skipped is not None:
            return None
        value = report.metrics.get("accuracy")
        return None if value is None or math.isnan(value) else float(value)

    def problems_for(self, model: ModelRef, blocking_gates: tuple[str, ...]) -> list[str]:
        """Why this report does not clear `model` for promotion; empty when it does."""
        if self.model.version != model.version or self.model.name != model.name:
            return [f"the evaluation report describes {self.model.name} version {self.model.version}, "
                    f"not version {model.version}: materialize the evaluation assets first"]
        problems = []
        for task, trained_on in model.datasets.items():
            report = self.tasks.get(task)
            if report is None:
                problems.append(f"{task}: not evaluated")
            elif report.model_version != model.version:
                problems.append(f"{task}: evaluated version {report.model_version}, not {model.version}")
            elif report.dataset_fingerprint != trained_on.fingerprint:
                problems.append(f"{task}: evaluated on dataset {report.dataset_fingerprint}, but the "
                                f"model trained on {trained_on.fingerprint}")
            elif report.skipped is None:
                problems += [f"{task}: gate {gate} failed" if gate in report.gates else
                             f"{task}: gate {gate} has no outcome"
                             for gate in blocking_gates if not report.gates.get(gate, False)]
        return problems


REF_TYPES = {cls.__name__: cls for cls in (SplitsRef, TaskDatasetRef, ModelRef, TaskReport, EvaluationReport)}
_TAG = "__ref__"


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and type(value).__name__ in REF_TYPES:
        return {_TAG: type(value).__name__,
                **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a ref: {value!r}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        fields = {k: _decode(v) for k, v in value.items() if k != _TAG}
        if _TAG not in value:
            return fields
        name = value[_TAG]
        if name not in REF_TYPES:
            raise ValueError(f"unknown ref type {name!r} (known: {sorted(REF_TYPES)})")
        return REF_TYPES[name](**fields)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dumps(ref: Any) -> bytes:
    if type(ref).__name__ not in REF_TYPES:
        raise TypeError(f"{type(ref).__name__} is not a ref type ({sorted(REF_TYPES)}); assets that "
                        "write arrays return a ref to them, never the arrays")
    return json.dumps(_encode(ref), indent=1, sort_keys=True).encode()


def loads(data: bytes) -> Any:
    return _decode(json.loads(data))
