"""The status page at ``GET /``: what is served, the last runs, the rejected files and the ages, at a glance.

It is rendered on the server into one HTML document with the age chart as inline SVG: no script at all
and nothing from another host, so it works on networks without internet access, and its
Content-Security-Policy can forbid every script and every other origin (an injected tag could not run).
Every value the page shows is escaped where it is written: keys, reasons, errors and replica names come
from whoever writes to the bucket or configures a replica. The work per request does not grow with the
data: the newest `RUNS_SHOWN` runs, the first `REJECTED_SHOWN` rejected files, and one bar per age from
the snapshot's per-day age histogram.

A client that prefers JSON (``Accept: application/json``) gets an index of the routes instead.
"""

from __future__ import annotations

import base64
import hashlib
import html
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final
from urllib.parse import quote

import numpy as np
from aiohttp import hdrs, web

from . import __version__, query
from .report import Outcome, RunReport
from .rest import STATE
from .runner import Runner
from .snapshot import IntArray, Snapshot

__all__ = [
    "REJECTED_SHOWN",
    "ROUTES",
    "RUNS_SHOWN",
    "Route",
    "Status",
    "age_chart",
    "index",
    "prefers_json",
    "render",
    "route_index",
]

SERVICE: Final = "user-datalake-service"
RUNS_SHOWN: Final = 10
REJECTED_SHOWN: Final = 20
RETRY_AFTER_S: Final = 5


@dataclass(frozen=True, slots=True)
class Route:
    """One route of the service, for the page's list of links and the JSON index."""

    methods: tuple[str, ...]
    path: str
    doc: str
    example: str | None = None  # a URL to follow from the page, for the routes a plain GET answers


ROUTES: Final = (
    Route(("GET",), "/", "This page; with Accept: application/json, this index of the routes.", "/"),
    Route(("GET", "POST"), "/graphql", "GraphQL; GraphiQL in a browser.", "/graphql"),
    Route(("GET",), "/data", "A page of users as JSON; the filters are query parameters.", "/data?limit=10"),
    Route(("POST",), "/data", "Run the aggregation now; returns the run's report."),
    Route(("GET",), "/stats", "Count and age statistics, with the same filters.", "/stats"),
    Route(("GET",), "/images/{user_id}", "A user's image."),
    Route(("GET",), "/healthz", "Liveness.", "/healthz"),
    Route(("GET",), "/readyz", "Readiness: 200 once data is served, 503 before.", "/readyz"),
    Route(("GET",), "/metrics", "Prometheus metrics.", "/metrics"),
)

REJECTED_QUERY: Final = "{ rejectedFiles { totalCount runId files { key reason } } }"
RUNS_QUERY: Final = (
    "{ runs(limit: 20) { runId replica trigger startedAt outcome error listed fetched rejectedCount users } }"
)

_STYLE: Final = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 64em; padding: 0 1em; color: #1a202c; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.muted { color: #5a6577; } .starting { background: #fff4e5; border: 1px solid #f0b45a; padding: 0.8em 1em; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border-bottom: 1px solid #e2e8f0; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.key { font-family: ui-monospace, monospace; word-break: break-all; }
.outcome-succeeded { color: #276749; } .outcome-failed { color: #c53030; } .outcome-superseded { color: #975a16; }
dl.stats { display: flex; flex-wrap: wrap; gap: 0.4em 2em; } dl.stats div { min-width: 7em; }
dl.stats dt { font-size: 0.85em; color: #5a6577; } dl.stats dd { margin: 0; font-size: 1.2em; }
svg.ages { width: 100%; max-width: 760px; height: auto; }
.ages .with, .legend .with { fill: #2b6cb0; background: #2b6cb0; }
.ages .without, .legend .without { fill: #90cdf4; background: #90cdf4; }
.ages .axis { stroke: #4a5568; } .ages text { font-size: 11px; fill: #4a5568; }
.legend span { display: inline-block; width: 0.8em; height: 0.8em; margin: 0 0.3em 0 1em; }
"""
_STYLE_HASH: Final = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
CSP: Final = "; ".join(
    (
        "default-src 'none'",  # no script, no connection, no frame: the page only shows
        f"style-src 'sha256-{_STYLE_HASH}'",  # the one <style> block above, nothing else
        "img-src data:",  # the empty favicon, so the browser asks for no /favicon.ico
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Vary": "Accept",
}


@dataclass(frozen=True, slots=True)
class Status:
    """What the page shows, read from the service state at one moment."""

    now: datetime
    snapshot: Snapshot | None
    runs: Sequence[RunReport]  # newest first, at most RUNS_SHOWN
    replica: str
    reason: str = ""  # while `snapshot` is None: why nothing is served yet

    @classmethod
    def of(cls, snapshot: Snapshot | None, runner: Runner, now: datetime) -> Status:
        runs = list(itertools.islice(reversed(runner.history), RUNS_SHOWN))
        reason = "" if snapshot is not None else _starting_reason(runner)
        return cls(now, snapshot, runs, runner.replica, reason)


def _starting_reason(runner: Runner) -> str:
    """Why no data is served yet, in the words an operator needs to act on."""
    if runner.held:
        return "the object store has not been read since start-up; the service keeps trying"
    last = runner.last_report
    if last is not None and last.outcome is not Outcome.SUCCEEDED:
        return f"the last run {last.outcome.value}: {last.error or 'no reason given'}"
    return "the first run is in progress"


async def index(request: web.Request) -> web.Response:
    """``GET /``: the status page (503 while nothing is served yet), or the index of the routes as JSON."""
    if prefers_json(request.headers.get(hdrs.ACCEPT, "")):
        return web.json_response(route_index(), headers={"Vary": "Accept"})
    state = request.app[STATE]
    status = Status.of(state.snapshot, state.runner, datetime.now(UTC))
    if status.snapshot is not None:
        return web.Response(text=render(status), content_type="text/html", headers=_HEADERS)
    headers = _HEADERS | {"Retry-After": str(RETRY_AFTER_S)}
    return web.Response(text=render(status), status=503, content_type="text/html", headers=headers)


def route_index() -> dict[str, object]:
    """The JSON answer of ``GET /`` for API clients: the service, its version and its routes."""
    routes = [{"methods": list(r.methods), "path": r.path, "description": r.doc} for r in ROUTES]
    return {"service": SERVICE, "version": __version__, "routes": routes}


# --- content negotiation ---------------------------------------------------------------------------

_QVALUE = re.compile(r"q=(0(\.\d{0,3})?|1(\.0{0,3})?)", re.IGNORECASE)


def prefers_json(accept: str) -> bool:
    """Whether `accept` ranks JSON above HTML. Browsers, ``*/*`` and no header at all get the page; at equal
    q, the type the client names wins over a wildcard (``application/json, */*`` is a JSON client)."""
    json = _rank(accept, "application/json")
    return json[0] > 0 and json > _rank(accept, "text/html")  # q=0 means "not acceptable"


def _rank(accept: str, media_type: str) -> tuple[float, int]:
    """(q, specificity) of the most specific range in an Accept header that matches `media_type`: specificity
    2 for the type itself, 1 for ``type/*``, 0 for ``*/*``; (0, -1) when no range matches."""
    wanted = {media_type: 2, media_type.partition("/")[0] + "/*": 1, "*/*": 0}
    best = (-1, 0.0)
    for item in accept.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        specificity = wanted.get(name.lower())
        if specificity is not None:
            best = max(best, (specificity, _q(params)))
    return best[1], best[0]


def _q(params: list[str]) -> float:
    """A range's q parameter (1 without one); a malformed q counts as 0, as if the range were absent."""
    for param in params:
        if param.lower().startswith("q="):
            return float(param[2:]) if _QVALUE.fullmatch(param) else 0.0
    return 1.0


# --- the page --------------------------------------------------------------------------------------


def _e(value: object) -> str:
    """Every value goes through here on its way into the page: text and attribute values alike."""
    return html.escape(str(value), quote=True)


def _graphiql(query_text: str) -> str:
    """A link that opens GraphiQL with `query_text` in the editor (GraphiQL reads ``?q=``)."""
    return "/graphql?q=" + quote(query_text, safe="")


def _time(moment: datetime, now: datetime | None = None) -> str:
    """`moment` in UTC to the second, and how long before `now` it was when `now` is given."""
    stamp = moment.astimezone(UTC)
    text = f"{stamp:%Y-%m-%d %H:%M:%S} UTC" + (f" ({_ago(now - stamp)})" if now is not None else "")
    return f'<time datetime="{_e(stamp.isoformat())}">{_e(text)}</time>'


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def render(status: Status) -> str:
    """The whole page for `status`; while nothing is served, the reason, the runs and the routes."""
    snapshot, now = status.snapshot, status.now
    sections: tuple[str, ...]
    if snapshot is None:
        sections = (_starting(status.reason), _runs(status), _routes())
    else:
        today = now.astimezone(UTC).date()
        sections = (_served(snapshot, now), _ages(snapshot, today), _runs(status), _rejected(snapshot), _routes())
    refresh = f'\n<meta http-equiv="refresh" content="{RETRY_AFTER_S}">' if snapshot is None else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}
<title>{_e(SERVICE)}</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<h1>{_e(SERVICE)}</h1>
<p class="muted">Service version {_e(__version__)}, replica <code>{_e(status.replica)}</code>,
as of {_time(status.now)}.</p>
{"".join(sections)}
</body>
</html>
"""


def _starting(reason: str) -> str:
    return f"""<h2>Starting</h2>
<p class="starting" id="starting">No data is served yet: {_e(reason)}.
This page reloads every {RETRY_AFTER_S} seconds.</p>
"""


def _served(snapshot: Snapshot, now: datetime) -> str:
    stats = query.stats(snapshot, query.UserFilter(), now.astimezone(UTC).date())
    run = f", by run {_e(snapshot.report.run_id)}" if snapshot.report is not None else ""
    numbers = "".join(
        f"<div><dt>{_e(field.rest.replace('_', ' '))}</dt><dd>{_e(_number(getattr(stats, field.name)))}</dd></div>"
        for field in query.STATS_FIELDS
    )
    return f"""<h2>Served data</h2>
<p id="version">Output version <strong>{_e(snapshot.version)}</strong>, committed
{_time(snapshot.committed_at, now)}{run}: <strong>{_e(_number(len(snapshot)))}</strong> users.</p>
<dl class="stats" id="stats">{numbers}</dl>
"""


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"


def _ages(snapshot: Snapshot, today: date) -> str:
    lowest, counts = snapshot.age_counts(today)
    return f"""<h2>Ages</h2>
{age_chart(lowest, counts)}
<p class="legend muted"><span class="with"></span>with an image<span class="without"></span>without</p>
"""


_RUN_COUNTS: Final = ("listed", "fetched", "added", "updated", "removed", "rejected_count", "users")


def _runs(status: Status) -> str:
    if not status.runs:
        return "<h2>Last runs</h2>\n<p>No run yet.</p>\n"
    rows = "".join(_run_row(run, status.now) for run in status.runs)
    counts = "".join(f'<th class="n">{name.removesuffix("_count")}</th>' for name in _RUN_COUNTS)
    return f"""<h2>Last runs</h2>
<p class="muted">Newest first, at most {RUNS_SHOWN}, from the history all replicas share.
<a href="{_e(_graphiql(RUNS_QUERY))}">More in GraphiQL (runs)</a>.</p>
<table id="runs">
<tr><th>run</th><th>trigger</th><th>started</th><th class="n">seconds</th><th>outcome</th>{counts}
<th>error</th></tr>
{rows}</table>
"""


def _run_row(run: RunReport, now: datetime) -> str:
    replica = f' <span class="muted">on {_e(run.replica)}</span>' if run.replica else ""
    cells = "".join(f'<td class="n">{_e(_number(getattr(run, name)))}</td>' for name in _RUN_COUNTS)
    return (
        f"<tr><td>{_e(run.run_id)}{replica}</td><td>{_e(run.trigger)}</td><td>{_time(run.started_at, now)}</td>"
        f'<td class="n">{_e(f"{run.duration_seconds:.2f}")}</td>'
        f'<td class="outcome-{_e(run.outcome.value)}">{_e(run.outcome.value)}</td>{cells}'
        f"<td>{_e(run.error or '')}</td></tr>\n"
    )


def _rejected(snapshot: Snapshot) -> str:
    rejected = snapshot.rejected
    link = f'<a href="{_e(_graphiql(REJECTED_QUERY))}">All of them in GraphiQL (rejectedFiles)</a>'
    if not len(rejected):
        return f'<h2>Rejected files</h2>\n<p id="rejected-count">None. {link}.</p>\n'
    files = rejected.page(slice(0, REJECTED_SHOWN))
    rows = "".join(f'<tr><td class="key">{_e(f.key)}</td><td>{_e(f.reason)}</td></tr>\n' for f in files)
    shown = f"; the first {len(files)} by key" if len(files) < len(rejected) else ""
    return f"""<h2>Rejected files</h2>
<p id="rejected-count"><strong>{_e(_number(len(rejected)))}</strong> files are rejected{shown}. {link}.</p>
<table id="rejected">
<tr><th>key</th><th>reason</th></tr>
{rows}</table>
"""


def _routes() -> str:
    items = "".join(
        f"<li><code>{_e(' '.join(r.methods))} {_e(r.path)}</code> {_e(r.doc)}"
        + (f' <a href="{_e(r.example)}">{_e(r.example)}</a>' if r.example else "")
        + "</li>\n"
        for r in ROUTES
    )
    return f'<h2>Routes</h2>\n<ul id="routes">\n{items}</ul>\n'


# --- the age chart ---------------------------------------------------------------------------------

_WIDTH, _HEIGHT = 760, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 14, 40  # margins around the plot: room for the axis labels
_TICK_STEPS = (1, 2, 5, 10, 20, 50, 100)
_MAX_TICKS = 12


@dataclass(frozen=True, slots=True)
class _Scale:
    """Where an age's bar goes and how tall a count is, in the SVG's coordinates."""

    first_age: int
    slot: float  # width per age
    per_user: float  # height per user

    def x(self, age: int) -> float:
        return _LEFT + (age - self.first_age) * self.slot

    def height(self, users: int) -> float:
        return max(users * self.per_user, 1.0) if users else 0.0  # a single user still shows


def age_chart(lowest: int, counts: IntArray) -> str:
    """Users by age as an SVG bar chart: one ``g.bar`` per age that has users, stacked with/without an image.

    `counts` is `Snapshot.age_counts`'s: row 1 counts users with an image, column `a` age `lowest + a`.
    Ages without users keep their place on the axis but get no bar.
    """
    per_age = counts.sum(axis=0)
    present = np.flatnonzero(per_age)
    if not len(present):
        return '<p id="ages">No users.</p>'
    first, last = lowest + int(present[0]), lowest + int(present[-1])
    tallest = int(per_age.max())
    scale = _Scale(first, (_WIDTH - _LEFT - _RIGHT) / (last - first + 1), (_HEIGHT - _TOP - _BOTTOM) / tallest)
    bars = "".join(
        _bar(lowest + int(a), int(counts[1, a]), int(counts[0, a]), scale) for a in present
    )  # at most one per age from 1800 to today: bounded whatever the number of users
    return (
        f'<svg class="ages" id="ages" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'aria-label="Users by age, from {first} to {last} years">\n'
        f"{_axes(first, last, tallest, scale)}{bars}</svg>"
    )


def _bar(age: int, with_image: int, without_image: int, scale: _Scale) -> str:
    x, width = scale.x(age) + scale.slot * 0.1, scale.slot * 0.8
    base = _HEIGHT - _BOTTOM
    low, high = scale.height(without_image), scale.height(with_image)
    users = with_image + without_image
    title = f"{age} years: {users:,} users, {with_image:,} with an image"
    rects = "".join(
        f'<rect class="{kind}" x="{x:.2f}" y="{top:.2f}" width="{width:.2f}" height="{height:.2f}"/>'
        for kind, top, height in (("without", base - low, low), ("with", base - low - high, high))
        if height
    )
    return f'<g class="bar" data-age="{age}" data-users="{users}"><title>{_e(title)}</title>{rects}</g>\n'


def _axes(first: int, last: int, tallest: int, scale: _Scale) -> str:
    base, right = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT
    step = next((s for s in _TICK_STEPS if (last - first) // s < _MAX_TICKS), _TICK_STEPS[-1])
    ticks = "".join(
        f'<text x="{scale.x(age) + scale.slot / 2:.2f}" y="{base + 14}" text-anchor="middle">{age}</text>'
        for age in range(-(-first // step) * step, last + 1, step)
    )
    return (
        f'<line class="axis" x1="{_LEFT}" y1="{base}" x2="{right}" y2="{base}"/>'
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}"/>'
        f'<text x="{_LEFT - 6}" y="{base}" text-anchor="end">0</text>'
        f'<text x="{_LEFT - 6}" y="{_TOP + 8}" text-anchor="end">{tallest:,}</text>'
        f'<text x="{(_LEFT + right) / 2}" y="{_HEIGHT - 6}" text-anchor="middle">age (years)</text>\n{ticks}\n'
    )
