"""What the request handlers share: settings, the runner and the current snapshot."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .config import Settings
from .errors import NotReady, Unauthorized
from .events import Broadcaster, SnapshotPublished
from .metrics import Metrics
from .runner import Runner
from .snapshot import Snapshot
from .storage import ObjectStore


@dataclass
class ServiceState:
    settings: Settings
    store: ObjectStore
    runner: Runner
    events: Broadcaster
    metrics: Metrics
    snapshot: Snapshot | None = None

    def publish(self, snapshot: Snapshot) -> None:
        """Swap in a new snapshot (one reference assignment: queries see the old or the new one)."""
        self.snapshot = snapshot
        self.metrics.observe_snapshot(len(snapshot), snapshot.version, snapshot.committed_at)
        self.events.publish(SnapshotPublished(snapshot.version, len(snapshot)))

    def current(self) -> Snapshot:
        """The snapshot queries read; `NotReady` until the first one is loaded."""
        if self.snapshot is None:
            raise NotReady("data not available yet: the object store has not been read since start-up")
        return self.snapshot

    def authorize(self, authorization: str | None) -> None:
        """Check `Authorization: Bearer <API_TOKEN>` when a token is configured (constant-time compare)."""
        token = self.settings.api_token
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("this operation needs the header 'Authorization: Bearer <API_TOKEN>'")
