"""The status page at `/`: its HTML (escaping, contents, bounds), its headers, and a real headless-Chromium load.

The browser test reuses test_graphiql's DevTools client and is skipped only when no Chromium binary exists.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
from aiohttp.test_utils import TestClient, make_mocked_request
from browser import ARTIFACTS, chromium_page, find_chromium
from support import NEVER, PEOPLE, ClientFactory, SlowStore, age_on, seed, wait_ready

from service import __version__, dashboard
from service.app import create_app
from service.config import Settings
from service.dashboard import REJECTED_SHOWN, RUNS_SHOWN, Status, age_chart, prefers_json, render
from service.errors import StorageError
from service.local_store import LocalStore
from service.report import Outcome, RejectedFiles, RunReport
from service.snapshot import Snapshot

NOW = datetime(2024, 6, 15, 12, 0, 0, tzinfo=UTC)
HOSTILE_KEY = "src-data/<script>alert('key')</script>.csv"
HOSTILE_REASON = 'header lacks birthts (found: <img src=x onerror="alert(1)">) & more'
HOSTILE_HEADER = b"first_name,<img src=x onerror=alert(1)>\nA,B\n"
# Every tag the page is made of: anything else in it came from the data, unescaped.
PAGE_TAGS = {
    "html", "head", "meta", "title", "link", "style", "body", "h1", "h2", "p", "code", "time", "strong", "dl",
    "div", "dt", "dd", "span", "a", "table", "tr", "th", "td", "ul", "li", "svg", "line", "text", "g", "rect",
}  # fmt: skip


class _Page(HTMLParser):
    """The tags of a page, its text, its links, and the contents of its <style>."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []
        self.links: list[str] = []
        self.attributes: set[str] = set()
        self.style = ""
        self._in_style = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes |= {name for name, _ in attrs}
        self.links += [value or "" for name, value in attrs if name in {"href", "src", "action"}]
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data
        self.text.append(data)


def table(user_ids: list[str], births: list[datetime], images: list[bool]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": user_ids,
            "first_name": [f"First{u}" for u in user_ids],
            "last_name": [f"Last{u}" for u in user_ids],
            "birthts": [int(b.timestamp() * 1000) for b in births],
            "img_path": [f"src-data/{u}.png" if image else "" for u, image in zip(user_ids, images, strict=True)],
        }
    )


def report(run_id: int, outcome: Outcome = Outcome.SUCCEEDED, **counts: Any) -> RunReport:
    started = NOW - timedelta(minutes=60 - run_id)
    return RunReport(run_id, "schedule", started, started + timedelta(seconds=2), outcome, **counts)


def snapshot(rejected: RejectedFiles | None = None, run: RunReport | None = None) -> Snapshot:
    born = [datetime(1990, 1, 1, tzinfo=UTC), datetime(1990, 3, 1, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=UTC)]
    return Snapshot(
        table(["a", "b", "c"], born, [True, False, True]),
        version=42,
        committed_at=NOW - timedelta(minutes=5),
        report=run,
        rejected=rejected if rejected is not None else RejectedFiles.empty(),
    )


# --- the HTML --------------------------------------------------------------------------------------


def test_every_value_from_the_data_is_escaped() -> None:
    hostile_run = RunReport(
        7, "<b>trigger</b>", NOW, NOW, Outcome.FAILED, error="object store error: <script>x</script>",
        replica='"><svg onload=alert(1)>',
    )  # fmt: skip
    status = Status(
        NOW, snapshot(RejectedFiles.of([HOSTILE_KEY], [HOSTILE_REASON])), [hostile_run], replica="<i>me</i>"
    )
    page = render(status)
    parsed = _Page(page)
    assert set(parsed.tags) <= PAGE_TAGS, set(parsed.tags) - PAGE_TAGS
    assert not {name for name in parsed.attributes if name.startswith("on")}
    assert "<script" not in page.lower()
    text = "".join(parsed.text)
    for value in (HOSTILE_KEY, HOSTILE_REASON, hostile_run.error, hostile_run.replica, "<b>trigger</b>", "<i>me</i>"):
        assert value and value in text  # shown as text, exactly: escaped, not dropped or mangled
    assert html_escaped(HOSTILE_KEY) in page


def html_escaped(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")


def test_the_page_shows_version_commit_counts_runs_and_rejected_files() -> None:
    keys = [f"src-data/bad/{i:03d}.csv" for i in range(REJECTED_SHOWN + 5)]
    rejected = RejectedFiles.of(keys[::-1], [f"reason {k}" for k in keys[::-1]])
    runs = [report(i, listed=100 + i, fetched=i, rejected_count=25, users=3) for i in range(1, 16)]
    runs[-1] = report(15, Outcome.FAILED, error="object store error: timeout")
    history = SimpleNamespace(history=deque(runs), held=False, last_report=runs[-1], replica="replica-1")
    status = Status.of(snapshot(rejected, runs[-2]), history, NOW)  # type: ignore[arg-type]

    page = render(status)
    text = " ".join("".join(_Page(page).text).split())
    assert f"Service version {__version__}, replica replica-1," in text
    assert "Output version 42, committed 2024-06-15 11:55:00 UTC (5 min ago), by run 14: 3 users." in text
    assert dict(re.findall(r"<dt>([^<]*)</dt><dd>([^<]*)</dd>", page)) == {
        "count": "3", "average age": "30.7", "youngest age": "24", "oldest age": "34", "with image": "2",
        "without image": "1",
    }  # fmt: skip

    shown_runs = re.findall(r"<tr><td>(\d+)", page.split('id="runs"')[1].split("</table>")[0])
    assert shown_runs == [str(i) for i in range(15, 15 - RUNS_SHOWN, -1)]  # newest first, bounded
    assert "object store error: timeout" in text and 'class="outcome-failed"' in page
    assert '<td class="n">114</td><td class="n">14</td>' in page  # run 14: listed, fetched

    assert "25 files are rejected; the first 20 by key." in text
    rows = re.findall(r'<td class="key">([^<]*)</td>', page)
    assert rows == keys[:REJECTED_SHOWN]  # ordered by key, the first page only
    assert graphiql_queries(page)["rejectedFiles"] == dashboard.REJECTED_QUERY
    assert graphiql_queries(page)["runs"] == dashboard.RUNS_QUERY


def graphiql_queries(page: str) -> dict[str, str]:
    """The GraphiQL links of the page by root field: the query each one opens the editor with."""
    found = {}
    for link in _Page(page).links:
        parts = urlsplit(link)
        if parts.path == "/graphql" and parts.query:
            query = parse_qs(parts.query)["q"][0]
            found[re.findall(r"\w+", query)[0]] = query
    return found


def test_the_starting_page_gives_the_reason_and_the_runs_so_far() -> None:
    failed = report(1, Outcome.FAILED, error="object store error: cannot list 'src-data/'")
    runner = SimpleNamespace(history=deque([failed]), held=False, last_report=failed, replica="r")
    status = Status.of(None, runner, NOW)  # type: ignore[arg-type]
    assert status.reason == "the last run failed: object store error: cannot list 'src-data/'"
    page = render(status)
    text = "".join(_Page(page).text)
    assert "No data is served yet: the last run failed: object store error: cannot list 'src-data/'." in text
    assert '<meta http-equiv="refresh" content="5">' in page
    assert 'id="runs"' in page and 'id="ages"' not in page and 'id="rejected' not in page

    held = SimpleNamespace(history=deque(), held=True, last_report=None, replica="r")
    assert "has not been read since start-up" in Status.of(None, held, NOW).reason  # type: ignore[arg-type]
    running = SimpleNamespace(history=deque(), held=False, last_report=None, replica="r")
    assert Status.of(None, running, NOW).reason == "the first run is in progress"  # type: ignore[arg-type]


def test_the_chart_has_one_bar_per_age_and_scales_to_the_tallest() -> None:
    counts = np.zeros((2, 100), dtype=np.int64)
    counts[1, 20], counts[0, 20] = 3, 1  # age 30 (lowest is 10): 4 users, 3 with an image
    counts[0, 25] = 2
    counts[1, 60] = 1
    svg = age_chart(10, counts)
    bars = re.findall(r'<g class="bar" data-age="(\d+)" data-users="(\d+)">(.*?)</g>', svg)
    assert [(int(age), int(users)) for age, users, _ in bars] == [(30, 4), (35, 2), (70, 1)]
    heights = {age: [float(h) for h in re.findall(r'height="([\d.]+)"', body)] for age, _, body in bars}
    assert sum(heights["30"]) == pytest.approx(260 - 14 - 40)  # the tallest fills the plot
    assert heights["35"] == [pytest.approx(sum(heights["30"]) / 2)]
    assert "<title>30 years: 4 users, 3 with an image</title>" in svg
    assert [int(t) for t in re.findall(r'text-anchor="middle">(\d+)</text>', svg)] == list(range(30, 71, 5))
    assert age_chart(0, np.zeros((2, 10), dtype=np.int64)) == '<p id="ages">No users.</p>'


@pytest.mark.parametrize(
    ("accept", "json"),
    [
        ("", False),
        ("*/*", False),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),  # a browser
        ("application/json", True),
        ("application/json, text/plain, */*", True),
        ("text/html;q=0.5, application/json", True),
        ("application/json;q=0.4, text/*;q=0.5", False),
        ("application/*", True),
        ("application/json;q=2", False),  # malformed q: as if absent
        ("APPLICATION/JSON", True),
    ],
)
def test_json_only_for_clients_that_prefer_it(accept: str, json: bool) -> None:
    assert prefers_json(accept) is json


# --- over HTTP -------------------------------------------------------------------------------------


async def seed_hostile(store: LocalStore) -> None:
    await seed(store)
    await store.put(HOSTILE_KEY, HOSTILE_HEADER)


@pytest.fixture
async def client(aiohttp_client: ClientFactory, tmp_path: Path) -> TestClient[Any, Any]:
    store = LocalStore(tmp_path, "datalake")
    await seed_hostile(store)
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))
    await wait_ready(client)
    return client


def distinct_ages() -> list[int]:
    return sorted({age_on(born) for born, _ in PEOPLE.values()})


async def test_the_page_over_http(client: TestClient[Any, Any]) -> None:
    response = await client.get("/", headers={"Accept": "text/html"})
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    parsed = _Page(page)
    assert set(parsed.tags) <= PAGE_TAGS
    text = "".join(parsed.text)
    assert HOSTILE_KEY in text and "<img src=x onerror=alert(1)>" in text  # the key and the reason, as text
    assert "2 files are rejected. All of them" in " ".join(text.split())  # broken.csv and the hostile one: all shown
    assert re.findall(r'data-age="(\d+)"', page) == [str(age) for age in distinct_ages()]
    assert all(link.startswith("/") or link == "data:," for link in parsed.links)  # nothing from elsewhere

    csp = dict(d.strip().split(" ", 1) for d in response.headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'" and "script-src" not in csp and "unsafe" not in str(csp)
    style_hash = base64.b64encode(hashlib.sha256(parsed.style.encode()).digest()).decode()
    assert csp["style-src"] == f"'sha256-{style_hash}'"  # exactly the page's one <style> block
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Vary"] == "Accept"

    assert (await client.get("/")).content_type == "text/html"  # no Accept header (curl): the page too


async def test_api_clients_get_an_index_of_routes_that_exist(client: TestClient[Any, Any]) -> None:
    response = await client.get("/", headers={"Accept": "application/json"})
    assert response.status == 200
    index = await response.json()
    assert index["version"] == __version__
    assert {(tuple(r["methods"]), r["path"]) for r in index["routes"]} == {
        (r.methods, r.path) for r in dashboard.ROUTES
    }
    router = client.app.router
    for route in index["routes"]:
        path = route["path"].replace("{user_id}", "1000")
        for method in route["methods"]:
            match = await router.resolve(make_mocked_request(method, path))
            assert match.http_exception is None, (method, path)
    listed = {r["path"] for r in index["routes"]}
    registered = {resource.canonical for resource in router.resources()}
    assert registered - listed == {"/graphiql-assets/{name}"}  # what the GraphiQL page loads, not an API


class Unreachable(LocalStore):
    async def ensure_bucket(self) -> None:
        raise StorageError("cannot create bucket 'datalake': ClientConnectorError: connection refused")


async def test_before_data_is_loaded_the_page_says_why_with_a_503(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    down = await aiohttp_client(create_app(Settings(schedule=NEVER), store=Unreachable(tmp_path / "a", "datalake")))
    response = await down.get("/", headers={"Accept": "text/html"})
    assert response.status == 503 and response.headers["Retry-After"] == "5"
    assert "No data is served yet: the object store has not been read since start-up" in await response.text()
    assert "Content-Security-Policy" in response.headers

    store = SlowStore(tmp_path / "b")
    await seed(store)
    store.gate.clear()  # the first run cannot finish
    client = await aiohttp_client(create_app(Settings(schedule=NEVER), store=store))
    for _ in range(100):
        page = await (await client.get("/")).text()
        if "the first run is in progress" in page:
            break
        await asyncio.sleep(0.05)
    assert "No data is served yet: the first run is in progress." in page
    store.gate.set()
    await wait_ready(client)
    assert (await client.get("/")).status == 200


# --- in a browser ----------------------------------------------------------------------------------


async def test_the_page_in_headless_chromium(client: TestClient[Any, Any]) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set CHROMIUM_BIN)")
    origin = str(client.make_url("/")).rstrip("/")  # a real server on 127.0.0.1, with data loaded
    started = time.monotonic()
    async with chromium_page(binary) as page:
        for domain in ("Page", "Runtime", "Network", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Page.navigate", url=f"{origin}/")
        await page.wait_for("document.readyState === 'complete' && !!document.querySelector('svg.ages')", "the page")

        ages = await page.evaluate("[...document.querySelectorAll('svg.ages g.bar')].map(g => +g.dataset.age)")
        assert ages == distinct_ages()
        heights = await page.evaluate("[...document.querySelectorAll('svg.ages g.bar')].map(g => g.getBBox().height)")
        assert all(h > 0 for h in heights)  # drawn, not just present: the stylesheet and SVG were accepted
        fill = await page.evaluate("getComputedStyle(document.querySelector('svg.ages rect.with')).fill")
        assert fill == "rgb(43, 108, 176)"  # the <style> block applied: CSP allowed it by its hash
        assert await page.evaluate("document.scripts.length") == 0
        assert HOSTILE_KEY in await page.evaluate("document.getElementById('rejected').innerText")
        shot = await page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
        resources = await page.evaluate("[location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
        events = list(page.events)

    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    elsewhere = [url for url in [*requested, *resources] if not url.startswith((origin + "/", "data:"))]
    assert elsewhere == [], f"requests outside the origin: {elsewhere}"
    errors = [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"]
    errors += [e["params"]["entry"] for e in events if e["method"] == "Log.entryAdded"
               and e["params"]["entry"]["level"] == "error"]  # fmt: skip
    errors += [e["params"] for e in events if e["method"] == "Runtime.consoleAPICalled"]  # the page has no script
    assert errors == [], f"browser errors: {errors}"
    print(f"browser test took {time.monotonic() - started:.1f}s")
