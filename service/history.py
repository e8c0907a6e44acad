"""The run history, kept in the bucket beside the output: shared by every replica, kept across restarts."""

from __future__ import annotations

import asyncio
import json
import logging

from .errors import ObjectNotFound, PreconditionFailed, StorageError
from .report import RunReport
from .storage import ObjectStore

logger = logging.getLogger(__name__)

_MERGE_ATTEMPTS = 10


class HistoryStore:
    """Keeps the newest `limit` reports of all replicas as one JSON object in the bucket.

    Replicas add their reports by read-merge-write with a conditional write on the ETag read: when
    another replica wrote in between, the write fails and the merge is done again, so no replica's
    entry is lost. Reports are bounded (a sample of rejected files, not all of them), so the object
    stays small; it is still encoded and decoded in a worker thread, never on the event loop.
    """

    def __init__(self, store: ObjectStore, key: str, limit: int) -> None:
        self._store = store
        self.key = key
        self.limit = limit

    async def load(self) -> list[RunReport]:
        """Persisted reports, oldest first; an unreadable history is logged and skipped."""
        reports, _ = await self._read()
        return reports

    async def record(self, report: RunReport) -> list[RunReport] | None:
        """Add `report` to the shared history; the merged history, or None when the store failed (best
        effort: a store failure loses only the history entry, never a run)."""
        try:
            for _ in range(_MERGE_ATTEMPTS):
                reports, etag = await self._read()
                merged = _merged(reports, report)[-self.limit :]
                body = await asyncio.to_thread(_encode, merged)
                try:
                    if etag is None:
                        await self._store.put(self.key, body, "application/json", if_none_match=True)
                    else:
                        await self._store.put(self.key, body, "application/json", if_match=etag)
                except PreconditionFailed:
                    continue  # another replica wrote meanwhile: merge with its entry
                return merged
            logger.warning("could not add run %d to the history: it kept changing", report.run_id)
        except StorageError as exc:
            logger.warning("could not persist the run history: %s", exc.for_log())
        return None

    async def _read(self) -> tuple[list[RunReport], str | None]:
        try:
            info, data = await self._store.get_with_info(self.key)  # one request; the ETag is of this content
        except ObjectNotFound:
            return [], None
        etag = info.etag
        try:
            return await asyncio.to_thread(_decode, data, self.limit), etag
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable run history %s: %s", self.key, exc)
            return [], etag


def _merged(reports: list[RunReport], report: RunReport) -> list[RunReport]:
    """`reports` with `report` in it (once), ordered by start."""
    same = (report.replica, report.run_id)
    kept = [r for r in reports if (r.replica, r.run_id) != same]
    return sorted([*kept, report], key=lambda r: r.started_at)


def _decode(data: bytes, limit: int) -> list[RunReport]:
    return [RunReport.from_json(item) for item in json.loads(data)["runs"][-limit:]]


def _encode(reports: list[RunReport]) -> bytes:
    return json.dumps({"runs": [report.to_json() for report in reports]}).encode()
