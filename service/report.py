"""The report of one aggregation run: data, not log lines."""

from __future__ import annotations

import enum
import heapq
from dataclasses import asdict, dataclass, field
from datetime import datetime
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from .manifest import positions
from .output import Conflict

REJECTED_SAMPLE = 20
"""Rejected files a run report names: the first ones by key. A report is kept in the run history,
returned by `POST /data` and sent to subscribers, so its size must not grow with the number of bad
files; `rejected_count` counts them all and the `rejectedFiles` query lists them."""


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # another run committed meanwhile (or the lease was lost): nothing committed


class RunKind(enum.StrEnum):
    """What a run looked at: the whole source prefix (`full`), or only the keys bucket events named
    (`targeted`); both go through the same merge, rules and commit."""

    FULL = "full"
    TARGETED = "targeted"


@dataclass(frozen=True, slots=True)
class RejectedFile:
    key: str
    reason: str


@dataclass(frozen=True, eq=False)
class RejectedFiles:
    """Every source file currently refused, as two read-only arrays ordered by key.

    Arrays of the manifest's own strings, not one object per file: tens of thousands of bad files
    cost the snapshot a few pointers each.
    """

    keys: npt.NDArray[np.object_]
    reasons: npt.NDArray[np.object_]

    @classmethod
    def of(cls, keys: npt.ArrayLike, reasons: npt.ArrayLike) -> RejectedFiles:
        """From parallel key and reason columns in any order (keys are unique)."""
        key_array, reason_array = np.asarray(keys, dtype=object), np.asarray(reasons, dtype=object)
        order = np.argsort(key_array, kind="stable")  # linear on the usual, already ordered, input
        return cls._frozen(key_array[order], reason_array[order])

    @classmethod
    def empty(cls) -> RejectedFiles:
        return cls._frozen(np.empty(0, dtype=object), np.empty(0, dtype=object))

    @classmethod
    def _frozen(cls, keys: npt.NDArray[np.object_], reasons: npt.NDArray[np.object_]) -> RejectedFiles:
        for array in (keys, reasons):
            array.setflags(write=False)
        return cls(keys, reasons)

    def __len__(self) -> int:
        return len(self.keys)

    def page(self, window: slice) -> list[RejectedFile]:
        return [RejectedFile(str(k), str(r)) for k, r in zip(self.keys[window], self.reasons[window], strict=True)]

    def sample(self) -> tuple[RejectedFile, ...]:
        """The first `REJECTED_SAMPLE` files by key, for a run report."""
        return tuple(self.page(slice(0, REJECTED_SAMPLE)))

    def changes_since(self, previous: RejectedFiles) -> tuple[RejectedFiles, int]:
        """The files that are new here or have another reason than in `previous`, and how many of
        `previous` are no longer rejected: what a run has to log."""
        at = positions(previous.keys, self.keys)
        known = np.flatnonzero(at >= 0)
        same = np.zeros(len(self), dtype=bool)
        same[known] = previous.reasons[at[known]] == self.reasons[known]
        return self._frozen(self.keys[~same], self.reasons[~same]), len(previous) - len(known)


@dataclass(frozen=True)
class RunReport:
    """What one run saw and did. `rejected` names at most `REJECTED_SAMPLE` of the source files
    currently refused (the first by key, with their reasons); `rejected_count` counts them all."""

    run_id: int
    trigger: str
    started_at: datetime
    finished_at: datetime
    outcome: Outcome
    error: str | None = None
    listed: int = 0
    fetched: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    ignored: int = 0
    users: int = 0
    images: int = 0
    output_version: int = 0
    output_written: bool = False
    full_rebuild: bool = False
    rejected_count: int = 0
    rejected: tuple[RejectedFile, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    replica: str = ""  # the replica that ran it (the history is shared by all replicas)
    kind: RunKind = RunKind.FULL

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        """The inverse of `to_json` (for the persisted run history). Entries written before reports
        were bounded list every rejected file: they are cut down to the sample here."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        rejected = [RejectedFile(**r) for r in data.get("rejected", ())]
        return cls(
            **fields
            | {
                "started_at": datetime.fromisoformat(data["started_at"]),
                "finished_at": datetime.fromisoformat(data["finished_at"]),
                "outcome": Outcome(data["outcome"]),
                "kind": RunKind(data.get("kind", RunKind.FULL)),  # entries from before targeted runs were full
                "rejected_count": int(data.get("rejected_count", len(rejected))),
                "rejected": tuple(heapq.nsmallest(REJECTED_SAMPLE, rejected, key=attrgetter("key"))),
                "conflicts": tuple(
                    Conflict(c["user_id"], c["kind"], tuple(c["keys"]), c["winner"]) for c in data.get("conflicts", ())
                ),
                "warnings": tuple(data.get("warnings", ())),
            }
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat()
        data["duration_seconds"] = round(self.duration_seconds, 3)
        return data
