"""In-process publish/subscribe for run progress and snapshot changes (GraphQL subscriptions)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .aggregator import Progress
from .report import RunReport


@dataclass(frozen=True, slots=True)
class RunProgress:
    run_id: int
    progress: Progress


@dataclass(frozen=True, slots=True)
class RunFinished:
    report: RunReport


@dataclass(frozen=True, slots=True)
class SnapshotPublished:
    version: int
    users: int


Event = RunProgress | RunFinished | SnapshotPublished


class Broadcaster:
    """Fan-out to subscribers, each with a bounded queue; a slow subscriber loses old progress events."""

    def __init__(self, queue_size: int = 64) -> None:
        self._queues: set[asyncio.Queue[Event]] = set()
        self._size = queue_size

    def publish(self, event: Event) -> None:
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()  # drop the oldest rather than block the run
            queue.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(self._size)
        self._queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)
