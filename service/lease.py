"""The lease: at most one replica aggregates at a time, coordinated through one object in the bucket.

The lease object (`<OUTPUT_KEY>.lease`) names its holder and when it expires. It is taken by a
create-if-absent write, or by replacing an expired (or released) lease with `If-Match` on the ETag
read: of several replicas racing for it, the store lets exactly one write succeed. The holder renews
it every third of its time to live, again with `If-Match`; a holder that cannot renew before it
expires has lost it, and its run gives up before committing.

The lease saves work; it is not what keeps the output right. Commits are conditional writes of their
own (see `Aggregator`), so even two replicas that both believe they hold the lease (a paused process,
a clock jump) cannot overwrite each other's commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .errors import ObjectNotFound, PreconditionFailed, ServiceError, StorageError
from .storage import ObjectStore

logger = logging.getLogger(__name__)


class LeaseBusy(ServiceError):
    """Another replica holds the lease."""

    def __init__(self, holder: LeaseRecord) -> None:
        super().__init__(f"replica {holder.replica!r} holds the lease (run {holder.run}) until {holder.expires}")
        self.holder = holder


class LeaseLost(ServiceError):
    """This replica could not renew the lease in time: its run must not commit."""


@dataclass(frozen=True)
class LeaseRecord:
    replica: str
    run: int
    acquired: datetime
    expires: datetime
    token: str = ""  # the writing process's own: two processes that share a replica name differ

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "replica": self.replica,
                "run": self.run,
                "acquired": self.acquired.isoformat(),
                "expires": self.expires.isoformat(),
                "token": self.token,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None when the object is not a lease this service wrote (then it is free)."""
        try:
            fields = json.loads(data)
            return cls(
                replica=str(fields["replica"]),
                run=int(fields["run"]),
                acquired=datetime.fromisoformat(fields["acquired"]),
                expires=datetime.fromisoformat(fields["expires"]),
                token=str(fields.get("token", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


class Lease:
    """The lease object at `key`, as seen by replica `replica`."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        replica: str,
        ttl: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self.key = key
        self.replica = replica
        self.ttl = timedelta(seconds=ttl)
        self._clock = clock
        self.token = secrets.token_hex(8)
        self._warned: set[str] = set()  # other processes' tokens already warned about
        self.on_change: Callable[[str], None] | None = None  # "acquired", then "released" or "lost"

    @contextlib.asynccontextmanager
    async def hold(self, run_id: int) -> AsyncIterator[Holding]:
        """Take the lease for run `run_id`, renew it while the block runs, release it afterwards.

        `LeaseBusy` when another replica holds it; `StorageError` when the store cannot be asked.
        """
        record, etag = await self._take(run_id)
        holding = Holding(self, record, etag)
        self._changed("acquired")
        renewer = asyncio.create_task(holding.renew_until_done(), name="lease-renewal")
        try:
            yield holding
        finally:
            # Not cancelled: a renewal in flight may have been applied already, and only its answer
            # carries the ETag the release is conditional on.
            holding.stop_renewing()
            await asyncio.gather(renewer, return_exceptions=True)
            await holding.release()
            self._changed("lost" if holding.lost else "released")

    async def holder(self) -> LeaseRecord | None:
        """Who holds the lease now (None when nobody does)."""
        current, _ = await self._read()
        return current if current is not None and current.expires > self._clock() else None

    async def _take(self, run_id: int) -> tuple[LeaseRecord, str]:
        current, etag = await self._read()
        now = self._clock()
        if current is not None and current.expires > now:
            if current.replica != self.replica:
                raise LeaseBusy(current)
            self._warn_if_shared(current)
        record = LeaseRecord(self.replica, run_id, now, now + self.ttl, self.token)
        try:
            new_etag = await self.write(record, etag)
        except PreconditionFailed:
            # Another replica wrote the lease between our read and our write: it has it.
            latest, _ = await self._read()
            raise LeaseBusy(latest or record) from None
        return record, new_etag

    def _warn_if_shared(self, current: LeaseRecord) -> None:
        """The unexpired lease names this replica but another process wrote it: say so, once per process.
        The run goes on (commits are conditional writes, so neither process overwrites the other's)."""
        if current.token and current.token != self.token and current.token not in self._warned:
            self._warned.add(current.token)
            logger.warning(
                "the lease names replica %r but another process wrote it (run %d, until %s): two processes "
                "share REPLICA_ID, or this one restarted within LEASE_TTL. Commits stay safe, but replicas "
                "that share a name do not wait for each other: give each its own REPLICA_ID",
                self.replica, current.run, current.expires.isoformat(),
            )  # fmt: skip

    def now(self) -> datetime:
        return self._clock()

    async def write(self, record: LeaseRecord, etag: str | None) -> str:
        """Write `record` only over the lease with ETag `etag` (or where there is none); its new ETag."""
        if etag is None:
            return await self._store.put(self.key, record.to_bytes(), "application/json", if_none_match=True)
        return await self._store.put(self.key, record.to_bytes(), "application/json", if_match=etag)

    async def _read(self) -> tuple[LeaseRecord | None, str | None]:
        try:
            info, data = await self._store.get_with_info(self.key)  # one request: the ETag of this body
        except ObjectNotFound:
            return None, None
        return LeaseRecord.from_bytes(data), info.etag

    def _changed(self, event: str) -> None:
        if self.on_change is not None:
            self.on_change(event)


class Holding:
    """This replica's hold on the lease during one run."""

    def __init__(self, lease: Lease, record: LeaseRecord, etag: str) -> None:
        self._lease = lease
        self.record = record
        self._etag = etag
        self._lost: str | None = None
        self._done = asyncio.Event()

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """`LeaseLost` unless the lease is still ours and unexpired: called before every commit write."""
        if self._lost is None and self.record.expires <= self._lease.now():
            self._lost = "the lease expired before it could be renewed"
        if self._lost is not None:
            raise LeaseLost(f"replica {self._lease.replica!r} lost the lease: {self._lost}")

    async def renew_until_done(self) -> None:
        interval = self._lease.ttl.total_seconds() / 3
        while self._lost is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), interval)
            if self._done.is_set():
                return
            await self._renew()

    def stop_renewing(self) -> None:
        """End `renew_until_done` after the renewal in flight, if any."""
        self._done.set()

    async def _renew(self) -> None:
        lease = self._lease
        now = lease.now()
        if self.record.expires <= now:
            self._lost = "the lease expired before it could be renewed"
            return
        record = LeaseRecord(lease.replica, self.record.run, self.record.acquired, now + lease.ttl, lease.token)
        try:
            self._etag = await lease.write(record, self._etag)
        except PreconditionFailed:
            self._lost = "another replica took it over"
            logger.warning("replica %s lost the lease of run %d: taken over", lease.replica, record.run)
            return
        except StorageError as exc:  # try again at the next interval, while the lease lasts
            logger.warning("could not renew the lease (%s); it expires at %s", exc.for_log(), self.record.expires)
            return
        self.record = record

    async def release(self) -> None:
        """Hand the lease back at once (an expired record), so that others need not wait for its time."""
        if self._lost is not None:
            return
        lease = self._lease
        now = lease.now()
        record = LeaseRecord(lease.replica, self.record.run, self.record.acquired, now, lease.token)
        with contextlib.suppress(StorageError):  # it expires by itself anyway
            await lease.write(record, self._etag)
