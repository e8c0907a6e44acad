"""GraphiQL served offline: page contents, fallback page, asset route, and a real headless-Chromium run.

The browser test drives Debian's `chromium` over the Chrome DevTools Protocol with aiohttp's websocket
client (no selenium/chromedriver). It is skipped only when no Chromium binary exists; if the GraphiQL
assets are not installed it installs them with scripts/fetch_graphiql_assets.py (needs npm and the
npm registry) and fails with the script's output if that is impossible.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import strawberry
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from browser import ARTIFACTS, chromium_page, find_chromium

from service import graphiql
from service.app import create_app
from service.config import Settings, load_settings
from service.graphiql import OfflineGraphQLView, add_routes, graphiql_html
from service.local_store import LocalStore

REPO = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO / "scripts" / "fetch_graphiql_assets.py"
STATS_QUERY = "{ stats { count averageAge } }"
SUBSCRIPTION_QUERY = "subscription { ticks(upto: 3) }"


# --- a minimal schema ------------------------------------------------------------------------------


@strawberry.type
class Stats:
    count: int
    average_age: float


@strawberry.type
class Query:
    @strawberry.field
    def stats(self) -> Stats:
        return Stats(count=3, average_age=41.5)


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def ticks(self, upto: int = 3) -> AsyncGenerator[int, None]:
        for i in range(1, upto + 1):
            await asyncio.sleep(0.05)
            yield i


SCHEMA = strawberry.Schema(query=Query, subscription=Subscription)


class ContextView(OfflineGraphQLView[dict[str, object], None]):
    """Like the service's view: a typed context, and subscriptions over graphql-transport-ws only."""

    async def get_context(self, request: web.Request, response: web.StreamResponse) -> dict[str, object]:
        return {"request": request, "response": response}


def make_app(directory: Path) -> web.Application:
    app = web.Application()
    view = ContextView(schema=SCHEMA, subscription_protocols=("graphql-transport-ws",))
    app.router.add_route("*", "/graphql", view)
    add_routes(app, directory=directory)
    return app


# --- helpers ---------------------------------------------------------------------------------------


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [value or "" for name, value in attrs if name in {"src", "href", "action"}]


def html_refs(page: str) -> list[str]:
    parser = _Refs()
    parser.feed(page)
    return parser.refs


def fake_install(directory: Path) -> dict[str, bytes]:
    """A stand-in install (valid manifest, tiny files) for tests that need no real bundles."""
    directory.mkdir(parents=True, exist_ok=True)
    contents = {name: f"/* {name} */\n".encode() for name in graphiql.ASSET_FILES}
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    manifest = {"format": 1, "packages": {}, "files": {}, "fingerprint": "0123abcd"}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return contents


def load_fetch_script() -> Any:
    spec = importlib.util.spec_from_file_location("fetch_graphiql_assets", FETCH_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- tests without a browser -----------------------------------------------------------------------


def test_page_references_only_local_assets() -> None:
    page = graphiql_html("/graphiql-assets", cache_token="abc123")
    assert re.findall(r"(?i)\b(?:https?|wss?)://", page) == []
    assert "//" not in "".join(html_refs(page))
    refs = html_refs(page)
    assets = [ref for ref in refs if ref != "data:,"]
    assert sorted(ref.split("?")[0].rsplit("/", 1)[1] for ref in assets) == sorted(graphiql.ASSET_FILES)
    assert all(ref.startswith("/graphiql-assets/") and ref.endswith("?v=abc123") for ref in assets)
    assert "unpkg" not in page
    assert "cdn" not in page.lower()


def test_page_rejects_external_asset_base() -> None:
    for base in ("https://cdn.example.com/x", "//cdn.example.com/x", "assets"):
        with pytest.raises(ValueError, match="absolute path"):
            graphiql_html(base)


def test_fetch_script_installs_exactly_the_files_the_page_loads() -> None:
    script = load_fetch_script()
    installed = {target for _, _, wanted in script.PACKAGES.values() for target in wanted}
    assert installed == set(graphiql.ASSET_FILES)
    assert script.MANIFEST_NAME == graphiql.MANIFEST_NAME
    assert script.ENV_VAR == graphiql.ASSETS_ENV_VAR
    assert script.DEFAULT_DEST == graphiql.DEFAULT_ASSETS_DIR
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", version) for version, _, _ in script.PACKAGES.values())


async def test_fallback_page_when_assets_dir_is_empty(aiohttp_client: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not graphiql.installed(empty)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(make_app(empty))

    resp = await client.get("/graphql", headers={"Accept": "text/html"})
    assert resp.status == 503
    page = await resp.text()
    assert "GraphiQL offline assets are not installed" in page
    assert graphiql.FETCH_COMMAND in page
    assert graphiql.ASSETS_ENV_VAR in page
    assert "it is currently set" in page and str(tmp_path) not in page  # a public page names no path
    assert re.findall(r"(?i)\b(?:https?|wss?)://", page) == []
    assert [ref for ref in html_refs(page) if ref != "data:,"] == []

    resp = await client.get("/graphiql-assets/graphiql.min.js")
    assert resp.status == 404

    # The API itself still works.
    resp = await client.post("/graphql", json={"query": STATS_QUERY})
    assert resp.status == 200
    assert await resp.json() == {"data": {"stats": {"count": 3, "averageAge": 41.5}}}

    # Installing into the running service takes effect on the next request.
    fake_install(empty)
    resp = await client.get("/graphql", headers={"Accept": "text/html"})
    assert resp.status == 200
    assert "/graphiql-assets/graphiql.min.js?v=0123abcd" in await resp.text()


async def test_asset_route_caching(aiohttp_client: Any, tmp_path: Path) -> None:
    contents = fake_install(tmp_path / "assets")
    client: TestClient[web.Request, web.Application] = await aiohttp_client(make_app(tmp_path / "assets"))

    resp = await client.get("/graphiql-assets/graphiql.min.js?v=0123abcd")
    assert resp.status == 200
    assert await resp.read() == contents["graphiql.min.js"]
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert resp.headers["Content-Type"].split(";")[0] in {"text/javascript", "application/javascript"}

    resp = await client.get("/graphiql-assets/graphiql.min.css")  # unversioned: revalidate
    assert resp.status == 200
    assert resp.headers["Cache-Control"] == "no-cache"
    etag = resp.headers["ETag"]
    resp = await client.get("/graphiql-assets/graphiql.min.css", headers={"If-None-Match": etag})
    assert resp.status == 304

    for name in ("manifest.json", "..%2Fmanifest.json", "nope.js"):
        resp = await client.get(f"/graphiql-assets/{name}")
        assert resp.status == 404, name

    page = await (await client.get("/graphql", headers={"Accept": "text/html"})).text()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None
    assert "default-src &#x27;none&#x27;" in csp.group(1)


async def test_the_service_finds_the_assets_through_its_settings(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_install(tmp_path / "assets")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv(graphiql.ASSETS_ENV_VAR, str(tmp_path / "elsewhere"))  # read once, by load_settings only
    settings = Settings(schedule="0 0 1 1 *", graphiql_assets_dir=tmp_path / "assets")
    app = create_app(settings, store=LocalStore(tmp_path / "data", "datalake"))
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)

    assert (await client.get("/graphiql-assets/graphiql.min.js?v=0123abcd")).status == 200
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status == 200 and "?v=0123abcd" in await page.text()


# --- the browser test ------------------------------------------------------------------------------


def ensure_assets_installed() -> Path:
    directory = load_settings().graphiql_assets_dir  # where the fetch script installs, too
    if graphiql.installed(directory):
        return directory
    proc = subprocess.run([sys.executable, str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"GraphiQL assets are not installed and {FETCH_SCRIPT.name} could not install them "
            f"(exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )
    assert graphiql.installed(directory), proc.stdout + proc.stderr
    return directory


def codemirror_value_js(container: str) -> str:
    """JS expression: the text of the CodeMirror editor inside `container` ('' if not rendered yet)."""
    return (
        f"(() => {{ const cm = document.querySelector({json.dumps(container + ' .CodeMirror')});"
        " return cm ? cm.CodeMirror.getValue() : ''; })()"
    )


async def test_graphiql_renders_and_runs_a_query_offline(aiohttp_server: Any) -> None:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set CHROMIUM_BIN)")
    directory = ensure_assets_installed()
    token = graphiql.assets_fingerprint(directory)
    started = time.monotonic()
    server: TestServer = await aiohttp_server(make_app(directory))
    origin = str(server.make_url("/")).rstrip("/")
    ws_origin = "ws" + origin.removeprefix("http")
    response_js = codemirror_value_js(".graphiql-response")

    async with chromium_page(binary) as page:
        for domain in ("Page", "Runtime", "Network", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)

        # Query: prefilled through ?q= (Strawberry executes GET ?query= instead of rendering the IDE).
        await page.send("Page.navigate", url=f"{origin}/graphql?q={STATS_QUERY}")
        await page.wait_for("!!document.querySelector('.graphiql-execute-button')", "the GraphiQL editor")
        await page.wait_for(
            f"{codemirror_value_js('.graphiql-query-editor')} === {json.dumps(STATS_QUERY)}",
            "the query in the editor",
        )
        assert await page.evaluate("typeof GraphiQLPluginExplorer") == "object"
        await page.click(".graphiql-execute-button")
        text = await page.wait_for(
            f"(() => {{ const t = {response_js}; return t.includes('41.5') && t; }})()",
            "the result",
        )
        assert json.loads(text) == {"data": {"stats": {"count": 3, "averageAge": 41.5}}}
        await page.wait_for("document.fonts.status === 'loaded'", "fonts")
        shot = await page.send("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "graphiql.png").write_bytes(base64.b64decode(shot["data"]))

        resources = await page.evaluate("[location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")

        # Subscription: runs over graphql-ws (graphql-transport-ws) to the same server.
        await page.send("Page.navigate", url=f"{origin}/graphql?q={SUBSCRIPTION_QUERY}")
        await page.wait_for(
            f"{codemirror_value_js('.graphiql-query-editor')} === {json.dumps(SUBSCRIPTION_QUERY)}",
            "the subscription in the editor",
        )
        await page.click(".graphiql-execute-button")
        text = await page.wait_for(
            f"(() => {{ const t = {response_js}; return t.includes('3') && t; }})()",
            "the subscription result",
        )
        assert json.loads(text) == {"data": {"ticks": 3}}

        events = list(page.events)

    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    websockets = [e["params"]["url"] for e in events if e["method"] == "Network.webSocketCreated"]
    assert f"{origin}/graphiql-assets/graphiql.min.js?v={token}" in requested
    assert websockets, "the subscription did not open a websocket"
    local = [url for url in [*resources, *requested, *websockets] if not url.startswith("data:")]
    external = [url for url in local if not (url.startswith((origin + "/", ws_origin + "/")))]
    assert external == [], f"requests to other hosts: {external}"
    assert all(urlsplit(url).hostname == "127.0.0.1" for url in local)

    errors = [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"]
    errors += [
        e["params"]["entry"]
        for e in events
        if e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
    ]
    errors += [
        e["params"] for e in events if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"
    ]
    assert errors == [], f"browser errors: {errors}"
    print(f"browser test took {time.monotonic() - started:.1f}s")
