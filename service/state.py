"""What the request handlers share: settings, the runner and the served snapshot."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from .config import Settings
from .errors import NotReady, Unauthorized
from .events import Broadcaster, SnapshotPublished
from .metrics import Metrics
from .runner import Runner
from .snapshot import Snapshot
from .storage import ObjectStore

logger = logging.getLogger(__name__)


class SnapshotBoard:
    """The snapshot queries read: replaced in one reference assignment, and never by an older commit."""

    def __init__(self, events: Broadcaster, metrics: Metrics) -> None:
        self._events = events
        self._metrics = metrics
        self.snapshot: Snapshot | None = None

    def publish(self, snapshot: Snapshot) -> bool:
        """Serve `snapshot` unless a newer commit is served already (a run publishes the same version
        again when nothing changed: its report and rejected files are still news)."""
        served = self.snapshot
        if served is not None and snapshot.version < served.version:
            logger.info("not serving version %d: version %d is served", snapshot.version, served.version)
            return False
        self._swap(snapshot)
        return True

    def publish_first(self, snapshot: Snapshot) -> bool:
        """Serve `snapshot` (the stored output, loaded at start-up) only while nothing is served: a run
        that finished meanwhile has served the same commit or a newer one."""
        if self.snapshot is not None:
            return False
        self._swap(snapshot)
        return True

    def _swap(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._metrics.observe_snapshot(len(snapshot), snapshot.version, snapshot.committed_at)
        self._events.publish(SnapshotPublished(snapshot.version, len(snapshot)))


@dataclass
class ServiceState:
    settings: Settings
    store: ObjectStore
    runner: Runner
    snapshots: SnapshotBoard
    events: Broadcaster
    metrics: Metrics

    @property
    def snapshot(self) -> Snapshot | None:
        return self.snapshots.snapshot

    def current(self) -> Snapshot:
        """The snapshot queries read; `NotReady` until the first one is loaded."""
        snapshot = self.snapshots.snapshot
        if snapshot is None:
            raise NotReady("data not available yet: the object store has not been read since start-up")
        return snapshot

    def authorize(self, authorization: str | None) -> None:
        """Check `Authorization: Bearer <API_TOKEN>` when a token is configured (constant-time compare)."""
        token = self.settings.api_token
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("this operation needs the header 'Authorization: Bearer <API_TOKEN>'")
