"""The report of one aggregation run: data, not log lines."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from .output import Conflict


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RejectedFile:
    key: str
    reason: str


@dataclass(frozen=True)
class RunReport:
    """What one run saw and did. `rejected` lists every source file currently refused, with its reason."""

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
    rejected: tuple[RejectedFile, ...] = ()
    conflicts: tuple[Conflict, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def duration_seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        """The inverse of `to_json` (for the persisted run history)."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(
            **fields
            | {
                "started_at": datetime.fromisoformat(data["started_at"]),
                "finished_at": datetime.fromisoformat(data["finished_at"]),
                "outcome": Outcome(data["outcome"]),
                "rejected": tuple(RejectedFile(**r) for r in data.get("rejected", ())),
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
