"""The run history, persisted next to the output so a restart still shows recent runs."""

from __future__ import annotations

import asyncio
import json
import logging

from .errors import ObjectNotFound, StorageError
from .report import RunReport
from .storage import ObjectStore

logger = logging.getLogger(__name__)


class HistoryStore:
    """Keeps the newest `limit` reports as one JSON object in the bucket.

    Reports are bounded (a sample of rejected files, not all of them), so the object stays small; it
    is still encoded and decoded in a worker thread, never on the event loop that serves queries.
    """

    def __init__(self, store: ObjectStore, key: str, limit: int) -> None:
        self._store = store
        self.key = key
        self.limit = limit

    async def load(self) -> list[RunReport]:
        """Persisted reports, oldest first; an unreadable history is logged and skipped."""
        try:
            data = await self._store.get(self.key)
        except ObjectNotFound:
            return []
        try:
            return await asyncio.to_thread(_decode, data, self.limit)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable run history %s: %s", self.key, exc)
            return []

    async def save(self, reports: list[RunReport]) -> None:
        """Best effort: a store failure loses only the history update, never a run."""
        body = await asyncio.to_thread(_encode, reports[-self.limit :])
        try:
            await self._store.put(self.key, body, "application/json")
        except StorageError as exc:
            logger.warning("could not persist the run history: %s", exc.for_log())


def _decode(data: bytes, limit: int) -> list[RunReport]:
    return [RunReport.from_json(item) for item in json.loads(data)["runs"][-limit:]]


def _encode(reports: list[RunReport]) -> bytes:
    return json.dumps({"runs": [report.to_json() for report in reports]}).encode()
