"""The run history, persisted next to the output so a restart still shows recent runs."""

from __future__ import annotations

import json
import logging

from .errors import ObjectNotFound, StorageError
from .report import RunReport
from .storage import ObjectStore

logger = logging.getLogger(__name__)


class HistoryStore:
    """Keeps the newest `limit` reports as one JSON object in the bucket."""

    def __init__(self, store: ObjectStore, key: str, limit: int) -> None:
        self._store = store
        self.key = key
        self.limit = limit

    async def load(self) -> list[RunReport]:
        """Persisted reports, oldest first; an unreadable history is logged and skipped."""
        try:
            data = json.loads(await self._store.get(self.key))
            return [RunReport.from_json(item) for item in data["runs"]][-self.limit :]
        except ObjectNotFound:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable run history %s: %s", self.key, exc)
            return []

    async def save(self, reports: list[RunReport]) -> None:
        """Best effort: a store failure loses only the history update, never a run."""
        body = json.dumps({"runs": [r.to_json() for r in reports[-self.limit :]]}).encode()
        try:
            await self._store.put(self.key, body, "application/json")
        except StorageError as exc:
            logger.warning("could not persist the run history: %s", exc.for_log())
