"""Synthetic source data in the original task's format, uploaded concurrently."""

from __future__ import annotations

import asyncio
import random
import struct
import zlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

from .storage import ObjectStore

FIRST_NAMES = ("Susan", "Rosa", "Vernon", "Maria", "Sharon", "Rick", "Ann-Marie", "José", "Zoë", "Li")
LAST_NAMES = ("Lee", "Garcia", "Evans", "Crooks", "Lang", "Mayfield", "Smith, Jr.", "O'Brien", "Müller")
_MIN_BIRTH_MS = -946_771_200_000  # 1940-01-01
_MAX_BIRTH_MS = 1_262_304_000_000  # 2010-01-01

BAD_FILES: dict[str, bytes] = {
    "bad-empty.csv": b"",
    "bad-header-only.csv": b"first_name, last_name, birthts\n",
    "bad-two-rows.csv": b"first_name, last_name, birthts\nA, B, 1\nC, D, 2\n",
    "bad-missing-column.csv": b"first_name, last_name\nA, B\n",
    "bad-not-integer.csv": b"first_name, last_name, birthts\nA, B, yesterday\n",
    "bad-future.csv": b"first_name, last_name, birthts\nA, B, 99999999999999\n",
    "bad-not-utf8.csv": b"first_name, last_name, birthts\n\xff\xfe, B, 1\n",
    "README.txt": b"Producers drop <user_id>.csv and <user_id>.png files here.\n",
    "no-such-user.png": b"",
}


@dataclass(frozen=True)
class DemoSummary:
    users: int
    images: int
    bad_files: int


def tiny_png(seed: int) -> bytes:
    """A valid 1x1 PNG whose colour depends on `seed`."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    pixel = bytes([0, seed % 256, (seed // 256) % 256, 128])
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixel)) + chunk(b"IEND", b"")


def demo_objects(users: int, image_ratio: float, seed: int, first_id: int = 1000) -> Iterator[tuple[str, bytes]]:
    """Yield (name, content) for each user's CSV and, for about `image_ratio` of them, a PNG."""
    rng = random.Random(seed)
    for number in range(first_id, first_id + users):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        birthts = rng.randrange(_MIN_BIRTH_MS, _MAX_BIRTH_MS)
        quoted_last = f'"{last}"' if "," in last else last
        yield f"{number}.csv", f"first_name, last_name, birthts\n{first}, {quoted_last}, {birthts}\n".encode()
        if rng.random() < image_ratio:
            yield f"{number}.png", tiny_png(number)


async def has_objects(store: ObjectStore, prefix: str) -> bool:
    """Whether anything is stored under `prefix`, from the first page of the listing, not a walk of it all.

    The listing is closed at once, so that an adapter's open list request does not outlive the answer.
    """
    listing = store.list(prefix)
    try:
        return bool(await anext(listing, []))
    finally:
        if isinstance(listing, AsyncGenerator):
            await listing.aclose()


async def write_demo_data(
    store: ObjectStore,
    prefix: str,
    *,
    users: int,
    image_ratio: float = 0.7,
    seed: int = 0,
    with_bad_files: bool = False,
    concurrency: int = 64,
) -> DemoSummary:
    """Upload a synthetic dataset under `prefix`; returns what was written."""
    await store.ensure_bucket()
    objects = list(demo_objects(users, image_ratio, seed))
    if with_bad_files:
        objects += list(BAD_FILES.items())
    semaphore = asyncio.Semaphore(concurrency)

    async def upload(name: str, data: bytes) -> None:
        content_type = "image/png" if name.endswith(".png") else "text/csv"
        async with semaphore:
            await store.put(prefix + name, data, content_type)

    for start in range(0, len(objects), 10_000):  # bounded batches keep the task count small
        await asyncio.gather(*(upload(n, d) for n, d in objects[start : start + 10_000]))
    images = sum(1 for name, _ in objects if name.endswith(".png") and name[0].isdigit())
    return DemoSummary(users=users, images=images, bad_files=len(BAD_FILES) if with_bad_files else 0)
