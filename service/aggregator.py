"""The incremental aggregator: list, diff against the manifest, fetch what changed, derive, commit.

A targeted run does the same for the keys that bucket events named: instead of listing the prefix, it
starts from the previous manifest's listing rows and replaces the rows of those keys with what a stat
of each says now (a key that is gone loses its row). Merge, rules, derivation and commit are shared,
so a targeted run's output is the one a full run would write.
"""

from __future__ import annotations

import array
import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Collection, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from . import manifest as mf
from . import output as out
from .config import Settings
from .errors import InvalidKey, ObjectNotFound, ObjectUnreadable, PreconditionFailed, ServiceError
from .keys import Kind, classify, ignored_reason
from .memory import release_free_heap
from .parsing import FUTURE_SUFFIX, MAX_CSV_BYTES, Rejected, parse_user_csv
from .report import Outcome, RejectedFiles, RunKind, RunReport
from .storage import ObjectInfo, ObjectStore, check_key

logger = logging.getLogger(__name__)

UNREADABLE_PREFIX = "unreadable, read again every run: "


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a run is: objects listed so far, CSVs queued for fetching, CSVs fetched."""

    listed: int
    to_fetch: int
    fetched: int


ProgressCallback = Callable[[Progress], None]
Fence = Callable[[], None]
"""Called before each commit write; raises to stop the commit (e.g. `LeaseLost`)."""


@dataclass(frozen=True)
class Targets:
    """What a targeted run looks at: object keys, and folders (`prefixes`, ending in `/`) whose every
    object is listed again (a file system's event for a folder says nothing about its files)."""

    keys: frozenset[str] = frozenset()
    prefixes: frozenset[str] = frozenset()

    def __or__(self, other: Targets) -> Targets:
        return Targets(self.keys | other.keys, self.prefixes | other.prefixes)

    def __len__(self) -> int:
        return len(self.keys) + len(self.prefixes)


class _NeedsListing(ServiceError):
    """A named key that only a listing can describe (the store refuses to stat it): list the prefix."""


class Superseded(ServiceError):
    """Another run committed after this one started: this one wrote nothing more (its output write, if
    any, is replaced or detected by the next run)."""


@dataclass(frozen=True)
class RunResult:
    report: RunReport
    table: pd.DataFrame  # the committed output, for the snapshot
    rejected: RejectedFiles  # all of them, for the snapshot (the report names only a sample)


@dataclass(frozen=True)
class Committed:
    """What the last commit left in the bucket, as served before the first run of a process."""

    table: pd.DataFrame
    version: int  # 0 when no manifest vouches for the table
    rejected: RejectedFiles


@dataclass
class _Committed:
    """The last commit this process made or read: reused while the stored manifest is unchanged."""

    manifest_etag: str
    manifest: pd.DataFrame
    header: mf.ManifestHeader
    output: pd.DataFrame
    conflicts: tuple[out.Conflict, ...] | None = None  # None until a run needs them


@dataclass
class _State:
    """What a run starts from: the last commit's manifest, or (without one) the stored output as a seed."""

    manifest: pd.DataFrame
    header: mf.ManifestHeader | None
    previous_output: pd.DataFrame
    seed: mf.Seed | None
    full_rebuild: bool
    output_in_step: bool  # the stored output is the one the manifest vouches for
    started_from: _Stored  # the commit is conditional on these ETags: nobody else committed meanwhile
    warnings: list[str] = field(default_factory=list)
    previous_conflicts: tuple[out.Conflict, ...] | None = None  # the manifest's, when known


@dataclass(frozen=True)
class _Stored:
    """ETags of the output and the manifest as a run found them (None: there was none)."""

    output: str | None
    manifest: str | None


@dataclass
class _Results:
    """Parse results of fetched CSVs, as columns (birthts in a typed array: no int object per row)."""

    keys: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    first_names: list[str] = field(default_factory=list)
    last_names: list[str] = field(default_factory=list)
    birthts: array.array[int] = field(default_factory=lambda: array.array("q"))
    vanished: set[str] = field(default_factory=set)
    misnamed: dict[str, str] = field(default_factory=dict)  # key -> why it is no user's file

    def __len__(self) -> int:
        return len(self.keys)

    def ok(self, key: str, first: str, last: str, birthts: int) -> None:
        self._add(key, "", first, last, birthts)

    def rejected(self, key: str, reason: str) -> None:
        self._add(key, reason or "rejected", "", "", 0)

    def _add(self, key: str, reason: str, first: str, last: str, birthts: int) -> None:
        self.keys.append(key)
        self.reasons.append(reason)
        self.first_names.append(first)
        self.last_names.append(last)
        self.birthts.append(birthts)

    def to_frame(self) -> pd.DataFrame:
        """The results as a frame (the caller drops the lists: at a million rows they are tens of MiB)."""
        valid = np.array([not reason for reason in self.reasons], dtype=bool)
        columns = {
            "key": pd.Series(self.keys, dtype=mf.DTYPES["key"]),
            "status": pd.Series(np.where(valid, mf.OK, mf.REJECTED), dtype=mf.DTYPES["status"]),
            "reason": pd.Series(self.reasons, dtype=mf.DTYPES["reason"]),
            "has_row": valid,
            "first_name": pd.Series(self.first_names, dtype=mf.DTYPES["first_name"]),
            "last_name": pd.Series(self.last_names, dtype=mf.DTYPES["last_name"]),
            "birthts": np.frombuffer(self.birthts, dtype=np.int64).copy() if self.birthts else np.zeros(0, np.int64),
        }
        return pd.DataFrame(columns, copy=False)


class Aggregator:
    """Keeps `output_key` equal to the view of the CSVs and images under `src_prefix`."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        src_prefix: str,
        output_key: str,
        concurrency: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        keep_blocks: bool = False,
    ) -> None:
        self._store = store
        self._prefix = src_prefix
        self.output_key = output_key
        self.manifest_key = output_key + ".manifest"
        self._concurrency = concurrency
        self._clock = clock
        self._committed: _Committed | None = None
        # With `keep_blocks`, what the last commit wrote is kept, block by block, for the next commit
        # (about the size of the stored output plus the compressed manifest): for targeted runs.
        self._manifest_encoder = mf.Encoder(keep=keep_blocks)
        self._output_writer = out.Writer(keep=keep_blocks)
        self._decoder = mf.Decoder()  # keeps the last manifest read, block by block, for the next read
        self._decoding = threading.Lock()
        self._version = 0  # the newest commit this process made or read: versions never go back
        #: The manifest ETag of the commit this process's last successful run ended on (written by it, or
        #: found unchanged): what that run served. None before such a run.
        self.committed_etag: str | None = None
        # Misnamed source keys (reported as rejected, not in the manifest) as of this process's last
        # run; None until a full run found them all, so a process's first run lists.
        self._misnamed: dict[str, str] | None = None

    @classmethod
    def from_settings(cls, store: ObjectStore, settings: Settings) -> Aggregator:
        """The aggregator the settings describe: `process` and `serve` must read and write the same keys."""
        return cls(
            store, src_prefix=settings.src_prefix, output_key=settings.output_key,
            concurrency=settings.fetch_concurrency, keep_blocks=settings.events_token is not None,
        )  # fmt: skip

    async def run(
        self,
        progress: ProgressCallback | None = None,
        fence: Fence | None = None,
        targets: Targets | None = None,
    ) -> RunResult:
        """One run; raises `StorageError` when the store fails (the previous commit stays intact),
        `Superseded` when another run committed meanwhile, or what `fence` raises before a write.

        With `targets`, only those keys are looked at (a targeted run), unless there is no manifest to
        start from, or a key needs a listing: then the run lists the prefix like any other. The report's
        identity (run id, trigger, replica) is the runner's to give: it is left unset here.
        """
        started = self._clock()
        now_ms = _ms(started)
        state = await self._load_state(now_ms)
        scan = await self._scan_targets(state, targets, now_ms, progress) if targets is not None else None
        if scan is None:
            scan = await self._scan_all(state.manifest, now_ms, progress)
        listed, fetched, ignored, kind = scan.listed, len(scan.results), scan.ignored, scan.kind  # before _compute
        misnamed, replaced = scan.misnamed, scan.replaced
        fresh = await asyncio.to_thread(scan.results.to_frame)
        listing = scan.listing
        del scan  # the lists behind the frame: tens of MiB at a million users
        if replaced is None:
            computed = await asyncio.to_thread(_compute, listing, state, fresh, misnamed)
        else:
            computed = await asyncio.to_thread(_compute_targeted, listing, replaced, state, fresh, misnamed)
        del listing, fresh  # at a million users these are hundreds of MiB: not needed for the commit
        version, written = await self._commit(state, computed, fence)
        self._misnamed = misnamed
        changes, output = computed.changes, computed.output
        report = RunReport(
            run_id=0,
            trigger="",
            started_at=started,
            finished_at=self._clock(),
            outcome=Outcome.SUCCEEDED,
            listed=listed,
            fetched=fetched,
            added=changes.added,
            updated=changes.updated,
            removed=changes.removed,
            unchanged=changes.unchanged,
            ignored=ignored + computed.orphan_images,
            users=len(output),
            images=int((output["img_path"] != "").sum()),
            output_version=version,
            output_written=written,
            full_rebuild=state.full_rebuild,
            rejected_count=len(computed.rejected),
            rejected=computed.rejected.sample(),
            conflicts=computed.conflicts,
            warnings=tuple(state.warnings),
            kind=kind,
        )
        return RunResult(report=report, table=output, rejected=computed.rejected)

    async def load_committed(self) -> Committed | None:
        """The committed table, its version and its rejected files; None when there is none.

        The manifest is the record of the commit: when it is readable, the table is derived from it,
        whatever happened to the stored output since.
        """
        now_ms = _ms(self._clock())
        manifest, header, _ = await self._read_manifest([], now_ms)
        if manifest is not None and header is not None:
            cached = self._committed
            table = cached.output if cached else out.derive(manifest)
            return Committed(table, header.version, _rejected_files(manifest))
        try:
            data = await self._store.get(self.output_key)
            table, dropped = await asyncio.to_thread(out.from_csv_bytes, data, now_ms)
        except ObjectNotFound:
            return None
        except out.OutputError as exc:
            logger.warning("not serving %s until the next run replaces it: %s", self.output_key, exc)
            return None
        if dropped:
            logger.warning("not serving %d rows of %s that break the input rules", dropped, self.output_key)
        return Committed(table, 0, RejectedFiles.empty())

    async def _load_state(self, now_ms: int) -> _State:
        warnings: list[str] = []
        manifest, header, manifest_etag = await self._read_manifest(warnings, now_ms)
        try:
            output: ObjectInfo | None = await self._store.stat(self.output_key)
        except ObjectNotFound:
            output = None
        stored = _Stored(output.etag if output is not None else None, manifest_etag)
        if manifest is not None and header is not None:
            in_step = output is not None and output.etag == header.output_etag
            if not in_step:
                warnings.append(
                    f"{self.output_key} does not match the manifest (edited, deleted, or a run stopped "
                    "between its writes): it is derived again from the manifest"
                )
            _log_all(warnings)
            cached = self._committed if self._committed and self._committed.header == header else None
            previous = cached.output if cached else out.derive(manifest)
            return _State(manifest, header, previous, None, full_rebuild=False, output_in_step=in_step,
                          started_from=stored, warnings=warnings,
                          previous_conflicts=cached.conflicts if cached else None)  # fmt: skip
        if output is not None and not warnings:
            warnings.append(f"no manifest beside {self.output_key}: rebuilding from scratch")
        seed = await self._read_seed(output, warnings, now_ms) if output is not None else None
        _log_all(warnings)
        previous = seed.rows.reset_index() if seed is not None else out.empty_output()
        return _State(mf.empty(), header, previous, seed, full_rebuild=True, output_in_step=False,
                      started_from=stored, warnings=warnings)  # fmt: skip

    async def _read_manifest(
        self, warnings: list[str], now_ms: int
    ) -> tuple[pd.DataFrame | None, mf.ManifestHeader | None, str | None]:
        """The stored manifest, its header and its ETag (also when it is unusable: a commit replaces it
        on that condition)."""
        try:
            etag = (await self._store.stat(self.manifest_key)).etag
        except ObjectNotFound:
            return None, None, None
        cached = self._committed
        if cached is not None and cached.manifest_etag == etag:
            return cached.manifest, cached.header, etag
        info, data = await self._store.get_with_info(self.manifest_key)  # the ETag of what is read
        etag = info.etag
        try:
            decoded = await asyncio.to_thread(self._decode, data, now_ms)
        except mf.ManifestError as exc:
            warnings.append(f"manifest {self.manifest_key} is unusable ({exc}): rebuilding from scratch")
            return None, None, etag
        del data
        output = await asyncio.to_thread(_derive_read, decoded, self._committed)
        manifest, header = decoded.frame, decoded.header
        self._committed = _Committed(etag, manifest, header, output)
        self._version = max(self._version, header.version)
        return manifest, header, etag

    def _encode(
        self, manifest: pd.DataFrame, header: mf.ManifestHeader, previous: pd.DataFrame | None, changed: Collection[str]
    ) -> bytes:
        """Encode a manifest to commit; the decoder then knows its blocks (and holds no older manifest)."""
        data = self._manifest_encoder.encode(manifest, header, previous, changed)
        with self._decoding:
            self._decoder.remember(manifest, data)
        return data

    def _decode(self, data: bytes, now_ms: int) -> mf.Decoded:
        """Decode a stored manifest (in a worker thread: the runner and the follower may both read)."""
        with self._decoding:
            decoded = self._decoder.decode(data, now_ms)
        if decoded.previous is None:
            release_free_heap()  # the temporaries of a whole read
        return decoded

    async def _read_seed(self, output: ObjectInfo, warnings: list[str], now_ms: int) -> mf.Seed | None:
        """The stored output's rows: the only record of last valid rows when the manifest is lost."""
        try:
            data = await self._store.get(self.output_key)
            table, dropped = await asyncio.to_thread(out.from_csv_bytes, data, now_ms)
        except ObjectNotFound:
            return None
        except out.OutputError as exc:
            warnings.append(f"{self.output_key} is unreadable ({exc}): it will be replaced")
            return None
        if dropped:
            warnings.append(f"{dropped} rows of {self.output_key} break the input rules: not kept")
        return mf.Seed(rows=table.set_index("user_id"), written=mf.mtime_ns(output.last_modified))

    async def _scan_all(self, previous: pd.DataFrame, now_ms: int, progress: ProgressCallback | None) -> _Scan:
        """A full run's scan: list the prefix."""
        listing, ignored, results = await self._scan(previous, self._store.list(self._prefix), now_ms, progress)
        misnamed = results.misnamed
        return _Scan(listing, results, len(listing) + ignored, ignored - len(misnamed), RunKind.FULL, misnamed)

    async def _scan_targets(
        self, state: _State, targets: Targets, now_ms: int, progress: ProgressCallback | None
    ) -> _Scan | None:
        """A targeted run's scan: the previous manifest's listing rows, with those of the named keys and
        folders replaced by what the store says now. None when only a listing will do: no manifest to
        start from, no full run yet in this process (misnamed keys are known from one), a folder that
        holds the whole prefix, or a key the store will neither read nor stat."""
        if state.full_rebuild or self._misnamed is None:
            return None
        named = self._relevant(targets)
        if named is None:
            return None
        keys, prefixes = named
        replaced = state.manifest["key"].isin(keys).to_numpy()
        if prefixes:
            replaced = replaced | state.manifest["key"].str.startswith(prefixes).to_numpy()
        try:
            # Only the rows of the named keys are compared with: the rest of the manifest stays as it is.
            before = state.manifest[replaced].reset_index(drop=True)
            read = _ReadAhead(_READ_AHEAD_BYTES)
            pages = self._named(keys, prefixes, read)
            fresh, ignored, results = await self._scan(before, pages, now_ms, progress, read)
        except _NeedsListing as exc:
            logger.info("a targeted run lists %s instead: %s", self._prefix, exc)
            return None
        found, named_keys = results.misnamed, set(keys)
        kept = {k: v for k, v in self._misnamed.items() if k not in named_keys and not k.startswith(prefixes)}
        listed = len(fresh) + ignored
        return _Scan(
            fresh, results, listed, ignored - len(found), RunKind.TARGETED, kept | found, _Replaced(replaced, before)
        )

    def _relevant(self, targets: Targets) -> tuple[list[str], tuple[str, ...]] | None:
        """The named keys and folders under the prefix that can change the view; None when a folder
        holds the whole prefix. Other keys (the service's own output, manifest, lease and history
        among them: they are never under the prefix) are ignored."""
        if any(self._prefix.startswith(prefix) for prefix in targets.prefixes):
            return None
        prefixes = tuple(sorted(p for p in targets.prefixes if p.startswith(self._prefix)))
        keys = sorted(
            key
            for key in targets.keys
            if key.startswith(self._prefix)
            and not key.startswith(prefixes)  # listed with its folder
            and (classify(key).kind is not Kind.IGNORED or ignored_reason(key) is not None)
        )
        return keys, prefixes

    async def _named(
        self, keys: list[str], prefixes: tuple[str, ...], read: _ReadAhead
    ) -> AsyncIterator[list[ObjectInfo]]:
        """The named keys as a listing shows them (a key that is gone is left out), a page at a time,
        then each folder's listing. A CSV is read rather than stat'ed (one request, not two if it
        changed): its content goes into `read`, for the fetch."""
        for start in range(0, len(keys), self._concurrency):
            page = await asyncio.gather(*(self._look_at(key, read) for key in keys[start : start + self._concurrency]))
            yield [info for info in page if info is not None]
        for prefix in prefixes:
            async for listed in self._store.list(prefix):
                yield listed

    async def _look_at(self, key: str, read: _ReadAhead) -> ObjectInfo | None:
        """What the store says about `key` now: events can come late, twice, or out of order."""
        if classify(key).kind is not Kind.CSV:
            return await self._stat_named(key)
        try:
            info, data = await self._store.get_with_info(check_key(key), max_bytes=MAX_CSV_BYTES)
        except ObjectNotFound:
            return None
        except (InvalidKey, ObjectUnreadable):  # the store may still stat it: the fetch then says why
            return await self._stat_named(key)
        if len(data) <= MAX_CSV_BYTES:  # a larger one is rejected unread
            read.keep(key, data)
        return info

    async def _stat_named(self, key: str) -> ObjectInfo | None:
        try:
            return await self._store.stat(check_key(key))
        except ObjectNotFound:
            return None
        except (InvalidKey, ObjectUnreadable) as exc:  # a listing shows it, and the run rejects it
            raise _NeedsListing(f"{key[:200]!r} cannot be looked at alone ({exc})") from exc

    async def _scan(
        self,
        previous: pd.DataFrame,
        pages: AsyncIterator[list[ObjectInfo]],
        now_ms: int,
        progress: ProgressCallback | None,
        read: _ReadAhead | None = None,
    ) -> tuple[pd.DataFrame, int, _Results]:
        """Go through `pages`; fetch new or changed CSVs as pages arrive (a bounded queue: back-pressure).
        A CSV whose content is in `read` (as of the ETag its page shows) is not read again."""
        # A file rejected only for a future birthts may become valid with time: fetch it again.
        # So may a file the store refused to hand over (its permissions or encryption may be fixed).
        reasons = previous["reason"]
        refetch = reasons.str.endswith(FUTURE_SUFFIX) | reasons.str.startswith(UNREADABLE_PREFIX)
        diff = mf.Diff(previous, refetch=refetch.to_numpy())
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self._concurrency * 2)
        results = _Results()
        frames: list[pd.DataFrame] = []
        counts = {"listed": 0, "ignored": 0, "to_fetch": 0}

        def report_progress() -> None:
            if progress is not None:
                progress(Progress(counts["listed"], counts["to_fetch"], len(results)))

        async def produce() -> None:
            async for page in pages:
                frame, ignored = mf.listing_frame(page)
                frame, changed = diff.compare(frame)
                frames.append(frame)
                counts["listed"] += len(page)
                for key in ignored:  # a source file's name that breaks a key rule is refused with its reason
                    if (reason := ignored_reason(key)) is not None:
                        results.misnamed[key] = reason
                counts["ignored"] += len(ignored)
                changed &= (frame["kind"] == Kind.CSV.value).to_numpy()
                too_big = changed & (frame["size"].to_numpy() > MAX_CSV_BYTES)
                for key in frame["key"].to_numpy()[too_big]:
                    results.rejected(str(key), f"file is larger than {MAX_CSV_BYTES} bytes (not downloaded)")
                fetch = frame["key"].to_numpy()[changed & ~too_big]
                counts["to_fetch"] += int(too_big.sum()) + len(fetch)
                report_progress()
                for key in fetch:
                    await queue.put(str(key))
            for _ in range(self._concurrency):
                await queue.put(None)

        async def fetch() -> None:
            while (key := await queue.get()) is not None:
                await self._fetch_one(key, now_ms, results, read.take(key) if read is not None else None)
                report_progress()

        await _run_all([produce(), *(fetch() for _ in range(self._concurrency))])
        listing = pd.concat(frames, ignore_index=True) if frames else mf.empty(mf.LISTING_COLUMNS)
        if results.vanished:
            listing = listing[~listing["key"].isin(results.vanished)]
        return listing, counts["ignored"], results

    async def _fetch_one(self, key: str, now_ms: int, results: _Results, data: bytes | None = None) -> None:
        try:
            if data is None:
                data = await self._store.get(key, max_bytes=MAX_CSV_BYTES)
        except ObjectNotFound:
            results.vanished.add(key)  # deleted since it was listed
            return
        except InvalidKey as exc:  # this file only: the run goes on
            results.rejected(key, str(exc))
            return
        except ObjectUnreadable as exc:  # the same, but a fix (permissions, a key) does not change its ETag
            results.rejected(key, f"{UNREADABLE_PREFIX}{exc}")
            return
        try:
            record = parse_user_csv(data, now_ms)
        except Rejected as exc:
            results.rejected(key, str(exc))
            return
        results.ok(key, record.first_name, record.last_name, record.birthts)

    async def _commit(self, state: _State, computed: _Computed, fence: Fence | None) -> tuple[int, bool]:
        """Write the output, then the manifest: a crash in between is detected as a stale manifest.

        Both writes are conditional on the ETags the run started from (or on there being none), so a
        commit never overwrites one that another replica made meanwhile: the run is then `Superseded`
        and writes nothing more. `fence` is called before each write (the lease's check).
        Returns the output version and whether the output was written.
        """
        header = state.header
        if header is not None and state.output_in_step and not computed.output_changed:
            version, output_etag, written = header.version, header.output_etag, False
        else:
            # After the manifest was lost, the version continues from the last one this process saw.
            version = max(header.version if header else 0, self._version) + 1
            users, known = computed.changed_users, computed.changed_users is not None
            data = await asyncio.to_thread(
                self._output_writer.write, computed.output, state.previous_output if known else None, users or ()
            )
            output_etag = await self._put(self.output_key, data, "text/csv", state.started_from.output, fence)
            del data  # not held while the manifest is serialized
            written = True
        new_header = mf.ManifestHeader(version=version, output_etag=output_etag)
        if written or computed.manifest_changed or self._committed is None:
            keys, known = computed.changed_keys, computed.changed_keys is not None
            data = await asyncio.to_thread(
                self._encode, computed.manifest, new_header, state.manifest if known else None, keys or ()
            )
            manifest_etag = await self._put(
                self.manifest_key, data, "application/gzip", state.started_from.manifest, fence
            )
        else:
            # Unchanged: the manifest this run started from (the cache may hold a later one meanwhile,
            # read by the follower).
            manifest_etag = state.started_from.manifest or self._committed.manifest_etag
        self._committed = _Committed(manifest_etag, computed.manifest, new_header, computed.output, computed.conflicts)
        self._version = version
        self.committed_etag = manifest_etag
        return version, written

    async def _put(self, key: str, data: bytes, content_type: str, found: str | None, fence: Fence | None) -> str:
        """Write `key` only if it is still as the run found it."""
        if fence is not None:
            fence()
        try:
            if found is None:
                return await self._store.put(key, data, content_type, if_none_match=True)
            return await self._store.put(key, data, content_type, if_match=found)
        except PreconditionFailed as exc:
            raise Superseded(f"{key} was committed by another run meanwhile: this run commits nothing more") from exc


_READ_AHEAD_BYTES = 16 * 1024 * 1024
"""At most this much CSV content read by a targeted run waits for its fetch (the rest is read again)."""


class _ReadAhead:
    """CSV contents read while looking at named keys, kept for the fetch, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self._contents: dict[str, bytes] = {}
        self._room = budget

    def keep(self, key: str, data: bytes) -> None:
        if len(data) <= self._room:
            self._contents[key] = data
            self._room -= len(data)

    def take(self, key: str) -> bytes | None:
        data = self._contents.pop(key, None)
        if data is not None:
            self._room += len(data)
        return data


@dataclass
class _Scan:
    """What a run looked at: the listing rows it merges and the CSVs it fetched."""

    listing: pd.DataFrame
    results: _Results
    listed: int  # objects stat'ed or listed
    ignored: int  # of those, objects that are no user file or image (misnamed ones are rejected instead)
    kind: RunKind
    misnamed: dict[str, str]  # every misnamed source key known after this run: key -> why
    #: A targeted run's rows of the previous manifest that `listing` replaces (it holds only those keys
    #: as they are now); None for a full run, whose `listing` is the whole prefix.
    replaced: _Replaced | None = None


@dataclass(frozen=True)
class _Replaced:
    """The rows of the previous manifest that a targeted run looked at again: where, and what they were."""

    mask: np.ndarray
    rows: pd.DataFrame


def _splice(kept: pd.DataFrame, fresh: pd.DataFrame, by: str = "key") -> pd.DataFrame:
    """`kept` (ordered by `by`, as listed) with the rows of `fresh` put in that order: the listing a full
    run would have made, so that an unchanged manifest still compares equal to the stored one. (A store
    that lists in another order, as SeaweedFS does across folders, gets the same rows; the next full
    run may then write the manifest again.)"""
    fresh = fresh.sort_values(by, kind="stable")
    at = np.searchsorted(kept[by].to_numpy(), fresh[by].to_numpy())
    order = np.insert(np.arange(len(kept)), at, np.arange(len(kept), len(kept) + len(fresh)))
    both = pd.concat([kept, fresh], ignore_index=True)
    return both.take(order).reset_index(drop=True)


@dataclass(frozen=True)
class _Computed:
    manifest: pd.DataFrame
    output: pd.DataFrame
    changes: out.Changes
    manifest_changed: bool
    output_changed: bool
    orphan_images: int
    rejected: RejectedFiles
    conflicts: tuple[out.Conflict, ...]
    #: The keys whose manifest rows, and the users whose output rows, may differ from the previous
    #: commit's (None: any of them).
    changed_keys: frozenset[str] | None
    changed_users: frozenset[str] | None


def _compute(listing: pd.DataFrame, state: _State, fresh: pd.DataFrame, misnamed: dict[str, str]) -> _Computed:
    """The pure, CPU-bound part of a run (called in a worker thread)."""
    release_free_heap()  # what the listing and the fetches left behind
    manifest = mf.merge(listing, state.manifest, fresh, state.seed)
    manifest_changed = not manifest.equals(state.manifest)
    if not manifest_changed:
        manifest = state.manifest  # the same rows: the commit reuses what it knows of them
    # The output is a function of the manifest: an unchanged one needs no new derivation.
    output = out.derive(manifest) if manifest_changed or state.full_rebuild else state.previous_output
    is_image = (manifest["kind"] == Kind.IMAGE.value).to_numpy()
    rejected = _rejected_files(manifest, misnamed)
    computed = _Computed(
        manifest=manifest,
        output=output,
        changes=out.compare(state.previous_output, output),
        manifest_changed=manifest_changed,
        output_changed=(output is not state.previous_output and not output.equals(state.previous_output))
        or _newly_carried(manifest, fresh),
        orphan_images=int((~manifest["user_id"][is_image].isin(output["user_id"])).sum()),
        rejected=rejected,
        conflicts=tuple(out.conflicts(manifest)),
        changed_keys=None if manifest_changed else frozenset(),
        changed_users=frozenset() if output is state.previous_output else None,
    )
    release_free_heap()  # the temporaries of the merge and the derivation, before the commit's own
    return computed


def _compute_targeted(
    listing: pd.DataFrame, replaced: _Replaced, state: _State, fresh: pd.DataFrame, misnamed: dict[str, str]
) -> _Computed:
    """`_compute` for a targeted run, at a cost that grows with the keys it named, not the bucket.

    Merging is row by row, and a user's output row depends only on that user's manifest rows: so the
    named rows are merged alone, and only the output rows of the users they belong to (before or now)
    are derived again. The result equals `_compute` over the whole listing (a property test checks it).
    """
    before = replaced.rows
    rows = mf.merge(listing, before, fresh)
    manifest_changed = not _same_rows(before, rows)
    manifest = _splice(state.manifest[~replaced.mask], rows) if manifest_changed else state.manifest
    previous = state.previous_output
    users: np.ndarray = np.empty(0, dtype=object)
    conflicts = state.previous_conflicts
    if conflicts is None:  # a manifest another process committed
        conflicts = tuple(out.conflicts(state.manifest))
    if manifest_changed:
        users = pd.unique(np.concatenate([before["user_id"].to_numpy(), rows["user_id"].to_numpy()]))
        output, changes, theirs = _rederive(manifest, previous, users)
        touched_users = set(users.tolist())
        conflicts = tuple(
            sorted(
                [c for c in conflicts if c.user_id not in touched_users] + out.conflicts(theirs),
                key=lambda conflict: (conflict.user_id, conflict.kind),
            )
        )
    else:
        output, changes = previous, out.compare(previous, previous)
    is_image = (manifest["kind"] == Kind.IMAGE.value).to_numpy()
    return _Computed(
        manifest=manifest,
        output=output,
        changes=changes,
        manifest_changed=manifest_changed,
        output_changed=changes.added + changes.updated + changes.removed > 0 or _newly_carried(rows, fresh),
        orphan_images=int((~manifest["user_id"][is_image].isin(output["user_id"])).sum()),
        rejected=_rejected_files(manifest, misnamed),
        conflicts=conflicts,
        changed_keys=frozenset(before["key"]) | frozenset(rows["key"]),
        changed_users=frozenset(users) if manifest_changed else frozenset(),
    )


def _same_rows(before: pd.DataFrame, after: pd.DataFrame) -> bool:
    """Whether two sets of manifest rows are the same, whatever their order."""
    if len(before) != len(after):
        return False
    ordered = [frame.sort_values("key", kind="stable", ignore_index=True) for frame in (before, after)]
    return ordered[0].equals(ordered[1])


def _rejected_files(manifest: pd.DataFrame, misnamed: dict[str, str] | None = None) -> RejectedFiles:
    """The manifest's rejected files, and the misnamed ones (which the manifest does not record)."""
    rows = manifest[(manifest["status"] == mf.REJECTED).to_numpy()]
    extra = misnamed or {}
    return RejectedFiles.of([*rows["key"], *extra], [*rows["reason"], *extra.values()])


def _newly_carried(manifest: pd.DataFrame, fresh: pd.DataFrame) -> bool:
    """Whether a CSV fetched in this run is rejected but keeps its last valid values.

    The output is then written even if its bytes do not change, so that it is newer than every file
    whose last valid values it holds: without a manifest, that is how a rebuild tells which files
    can have given the output's rows (see `manifest.Seed`).
    """
    rejected = fresh["key"][(fresh["status"] == mf.REJECTED).to_numpy()]
    if not len(rejected):
        return False
    at = mf.positions(manifest["key"], rejected.to_numpy())
    at = at[at >= 0]
    return bool(manifest["has_row"].to_numpy()[at].any())


def _derive_read(decoded: mf.Decoded, known: _Committed | None) -> pd.DataFrame:
    """The output of a manifest just read: only the changed users' rows are derived again when the
    manifest was read from the blocks of the one whose output is known."""
    users = decoded.changed_users
    if users is not None and known is not None and decoded.previous is known.manifest:
        return _rederive(decoded.frame, known.output, users)[0]
    return out.derive(decoded.frame)


def _rederive(
    manifest: pd.DataFrame, previous: pd.DataFrame, users: np.ndarray
) -> tuple[pd.DataFrame, out.Changes, pd.DataFrame]:
    """`previous` (the output of a manifest that differs from `manifest` only in the rows of `users`)
    with those users' rows derived again from `manifest`; the changes; and those users' manifest rows.
    A user's output row depends on that user's manifest rows alone."""
    theirs = manifest[manifest["user_id"].isin(users).to_numpy()]
    derived = out.derive(theirs)
    stale = previous["user_id"].isin(users).to_numpy()
    output = _splice(previous[~stale], derived, by="user_id")
    touched = out.compare(previous[stale], derived)
    return output, replace(touched, unchanged=touched.unchanged + len(previous) - int(stale.sum())), theirs


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _log_all(warnings: list[str]) -> None:
    for warning in warnings:
        logger.warning("%s", warning)


async def _run_all(coroutines: list[Coroutine[object, object, None]]) -> None:
    """Run tasks together; the first failure cancels the rest and propagates."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
