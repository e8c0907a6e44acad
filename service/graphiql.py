"""GraphiQL served entirely from this service (no CDN), for networks without internet access.

Strawberry's stock GraphiQL page (``strawberry/static/graphiql.html``) loads React, GraphiQL and the
Explorer plugin from unpkg.com, so on an offline network ``/graphql`` renders a blank page. Here the
same page is rebuilt against local copies of those bundles:

* ``scripts/fetch_graphiql_assets.py`` downloads the pinned npm packages at build/install time and
  installs their browser bundles into a directory (nothing is committed to git): the setting
  ``GRAPHIQL_ASSETS_DIR``, by default :data:`DEFAULT_ASSETS_DIR`;
* :func:`add_routes` serves those files under ``/graphiql-assets/``;
* :class:`OfflineGraphQLView` is Strawberry's aiohttp ``GraphQLView`` with ``render_graphql_ide``
  overridden to return :func:`graphiql_html` instead of the CDN page.

When the assets are not installed the view answers with :func:`missing_assets_html` (HTTP 503): a page
that says so and how to install them. It deliberately does **not** fall back to the CDN page: on the
networks this is for, that page would be blank anyway, and elsewhere it would silently send every IDE
user's browser to a third-party host. The GraphQL endpoint itself is unaffected either way.

Wiring::

    from service.graphiql import OfflineGraphQLView, add_routes

    app.router.add_route("*", "/graphql", OfflineGraphQLView(schema=schema))
    add_routes(app, directory=settings.graphiql_assets_dir)
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
from pathlib import Path
from typing import Final

from aiohttp import web
from strawberry.aiohttp.views import GraphQLView
from strawberry.http.typevars import Context, RootValue

from .config import DEFAULT_GRAPHIQL_ASSETS_DIR

__all__ = [
    "ASSETS_ENV_VAR",
    "ASSET_FILES",
    "DEFAULT_ASSETS_DIR",
    "DEFAULT_ASSET_BASE",
    "FETCH_COMMAND",
    "OfflineGraphQLView",
    "add_routes",
    "assets_fingerprint",
    "graphiql_html",
    "installed",
    "missing_assets_html",
]

logger = logging.getLogger(__name__)

ASSETS_ENV_VAR: Final = "GRAPHIQL_ASSETS_DIR"
#: The default of the ``GRAPHIQL_ASSETS_DIR`` setting, inside the package directory (gitignored). Docker
#: images set the variable instead, since a non-editable install puts the package in site-packages.
DEFAULT_ASSETS_DIR: Final = DEFAULT_GRAPHIQL_ASSETS_DIR
DEFAULT_ASSET_BASE: Final = "/graphiql-assets"
FETCH_COMMAND: Final = "python3 scripts/fetch_graphiql_assets.py"
MANIFEST_NAME: Final = "manifest.json"

#: The files the page loads, as installed by ``scripts/fetch_graphiql_assets.py`` (keep both in sync).
#: Only these names are served; everything else under the asset base is a 404.
ASSET_FILES: Final = frozenset(
    {
        "react.production.min.js",
        "react-dom.production.min.js",
        "graphiql.min.js",
        "graphiql.min.css",
        "plugin-explorer.umd.js",
        "plugin-explorer.css",
    }
)

ASSET_BASE_KEY: Final = web.AppKey("graphiql_asset_base", str)
ASSETS_DIR_KEY: Final = web.AppKey("graphiql_assets_dir", Path)
_IMMUTABLE: Final = "public, max-age=31536000, immutable"
_REVALIDATE: Final = "no-cache"

# Same behaviour as Strawberry's page: ?q=, ?variables= and ?headers= prefill the editors (the query
# parameter is `q`, not `query`: a GET with ?query= is executed by the GraphQL view instead), edits are
# mirrored into the URL, subscriptions go over graphql-ws (graphql-transport-ws) to the same URL, and a
# `csrftoken` cookie, if any, is sent as x-csrftoken. The graphql-ws client and graphql-js are bundled
# inside graphiql.min.js (GraphiQL 3.x UMD build), so no separate files are needed for them.
_GLUE_JS: Final = """
(function () {
  "use strict";
  var root = document.getElementById("graphiql");
  if (typeof React === "undefined" || typeof ReactDOM === "undefined" || typeof GraphiQL === "undefined") {
    root.className = "graphiql-offline-error";
    root.textContent =
      "The GraphiQL files could not be loaded from " + root.getAttribute("data-asset-base") +
      "/. Reinstall them on the server (" + root.getAttribute("data-fetch-command") +
      ") and reload. The GraphQL endpoint itself is not affected.";
    return;
  }

  var EXAMPLE_QUERY = [
    "# Welcome to GraphiQL (served offline by this service)",
    "#",
    "# Type queries here; autocompletion and validation use the live schema.",
    "# Run: Ctrl-Enter or the play button.  Autocomplete: Ctrl-Space.",
    "",
    "",
  ].join("\\n");

  var parameters = {};
  window.location.search.slice(1).split("&").forEach(function (entry) {
    var eq = entry.indexOf("=");
    if (eq >= 0) {
      parameters[decodeURIComponent(entry.slice(0, eq))] = decodeURIComponent(
        entry.slice(eq + 1).replace(/\\+/g, " ")
      );
    }
  });

  function updateURL(data) {
    Object.assign(parameters, data);
    var search = Object.keys(parameters)
      .filter(function (key) { return Boolean(parameters[key]); })
      .map(function (key) {
        return encodeURIComponent(key) + "=" + encodeURIComponent(parameters[key]);
      })
      .join("&");
    history.replaceState(null, "", "?" + search);
  }

  function readCookie(name) {
    var prefix = name + "=";
    var parts = document.cookie ? document.cookie.split("; ") : [];
    for (var i = 0; i < parts.length; i++) {
      if (parts[i].indexOf(prefix) === 0) {
        return decodeURIComponent(parts[i].slice(prefix.length));
      }
    }
    return undefined;
  }

  var fetchURL = window.location.href.split("?")[0].split("#")[0];
  var subscriptionURL = new URL(fetchURL);
  subscriptionURL.protocol = subscriptionURL.protocol === "https:" ? "wss:" : "ws:";

  var defaultHeaders = {};
  var csrfToken = readCookie("csrftoken");
  if (csrfToken) {
    defaultHeaders["x-csrftoken"] = csrfToken;
  }

  var fetcher = GraphiQL.createFetcher({
    url: fetchURL,
    headers: defaultHeaders,
    subscriptionUrl: subscriptionURL.toString(),
  });

  var plugins = [];
  if (typeof GraphiQLPluginExplorer !== "undefined") {
    plugins.push(GraphiQLPluginExplorer.explorerPlugin());
  }

  function GraphiQLWithExplorer() {
    var queryState = React.useState(parameters.q || EXAMPLE_QUERY);
    var variablesState = React.useState(parameters.variables);
    var headersState = React.useState(parameters.headers);
    return React.createElement(GraphiQL, {
      fetcher: fetcher,
      defaultEditorToolsVisibility: true,
      plugins: plugins,
      query: queryState[0],
      variables: variablesState[0],
      headers: headersState[0],
      onEditQuery: function (value) { queryState[1](value); updateURL({ q: value }); },
      onEditVariables: function (value) { variablesState[1](value); updateURL({ variables: value }); },
      onEditHeaders: function (value) { headersState[1](value); },
      inputValueDeprecation: true,
      isHeadersEditorEnabled: true,
      shouldPersistHeaders: true,
    });
  }

  ReactDOM.createRoot(root).render(React.createElement(GraphiQLWithExplorer));
})();
"""

_STYLE: Final = """
body { height: 100%; margin: 0; width: 100%; overflow: hidden; }
#graphiql { height: 100vh; display: flex; }
.graphiql-explorer-actions select { margin-left: 4px; }
.graphiql-offline-error { padding: 2em; font: 16px/1.5 system-ui, sans-serif; }
"""

_PAGE: Final = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <meta http-equiv="Content-Security-Policy" content="{csp}" />
    <title>GraphiQL</title>
    <link rel="icon" href="data:," />
    <style>{style}</style>
{stylesheets}
{scripts}
  </head>
  <body>
    <div id="graphiql" class="graphiql-container" data-asset-base="{asset_base}"
         data-fetch-command="{fetch_command}">Loading...</div>
    <noscript>GraphiQL needs JavaScript.</noscript>
    <script>{glue}</script>
  </body>
</html>
"""

_MISSING_PAGE: Final = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'" />
    <title>GraphiQL offline assets are not installed</title>
    <link rel="icon" href="data:," />
    <style>
      body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 46em; margin: 3em auto; padding: 0 1em; }}
      code, pre {{ background: #f2f2f2; padding: 0.1em 0.3em; }}
      pre {{ padding: 0.6em; overflow-x: auto; }}
    </style>
  </head>
  <body>
    <h1>GraphiQL offline assets are not installed</h1>
    <p>This service serves the GraphiQL explorer from its own files instead of a public CDN, so that it
      works without internet access. Those files (React, GraphiQL and the Explorer plugin, fetched from
      npm) are not installed on this server, so the explorer cannot be shown.</p>
    <p><strong>The GraphQL API at this URL works normally</strong>, for example:</p>
    <pre>curl -H 'Content-Type: application/json' \\
     --data '{{"query": "{{ __typename }}"}}' &lt;this URL&gt;</pre>
    <h2>How to install them</h2>
    <p>On a machine with Node.js/npm and access to the npm registry, from the project checkout:</p>
    <pre>{fetch_command}</pre>
    <p>This installs into <code>service/_graphiql_assets/</code>, or into the directory named by the
      <code>{env_var}</code> environment variable if it is set{env_state}. To prepare them elsewhere,
      run the script with <code>--dest DIR</code>, copy <code>DIR</code> to this server and point
      <code>{env_var}</code> at it. Then reload this page (no restart needed).</p>
  </body>
</html>
"""


def _normalise_asset_base(asset_base: str) -> str:
    base = asset_base.rstrip("/")
    if not base.startswith("/") or base.startswith("//") or "://" in base:
        raise ValueError(f"asset_base must be an absolute path on this server, got {asset_base!r}")
    return base


def _csp(script_hash: str) -> str:
    # 'self' also covers same-origin ws:/wss: for subscriptions. Inline styles are needed by React and
    # CodeMirror; the only inline script is the glue, allowed by its hash.
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src 'self' 'sha256-{script_hash}'",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "font-src 'self' data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
        )
    )


def graphiql_html(asset_base: str = DEFAULT_ASSET_BASE, *, cache_token: str | None = None) -> str:
    """The GraphiQL page, loading its scripts and styles from ``asset_base`` on the same origin only.

    ``cache_token`` (the installed assets' fingerprint, see :func:`assets_fingerprint`) is appended
    as ``?v=`` so browsers may cache the files forever and still pick up a new install.
    """
    base = _normalise_asset_base(asset_base)
    suffix = f"?v={cache_token}" if cache_token else ""

    def url(name: str) -> str:
        return html.escape(f"{base}/{name}{suffix}", quote=True)

    stylesheets = "\n".join(
        f'    <link rel="stylesheet" href="{url(name)}" />' for name in ("graphiql.min.css", "plugin-explorer.css")
    )
    scripts = "\n".join(
        f'    <script src="{url(name)}"></script>'
        for name in (
            "react.production.min.js",
            "react-dom.production.min.js",
            "graphiql.min.js",
            "plugin-explorer.umd.js",
        )
    )
    script_hash = base64.b64encode(hashlib.sha256(_GLUE_JS.encode()).digest()).decode()
    return _PAGE.format(
        csp=html.escape(_csp(script_hash), quote=True),
        style=_STYLE,
        stylesheets=stylesheets,
        scripts=scripts,
        asset_base=html.escape(base, quote=True),
        fetch_command=html.escape(FETCH_COMMAND, quote=True),
        glue=_GLUE_JS,
    )


def missing_assets_html(directory: Path) -> str:
    """The page served instead of GraphiQL when the offline assets are not installed in `directory`.

    It says whether the variable is set but never names the directory: the page is public.
    """
    env_state = " (it is not set)" if directory == DEFAULT_ASSETS_DIR else " (it is currently set)"
    return _MISSING_PAGE.format(
        fetch_command=html.escape(FETCH_COMMAND),
        env_var=ASSETS_ENV_VAR,
        env_state=env_state,
    )


def _read_manifest(directory: Path) -> dict[str, object] | None:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def installed(directory: Path) -> bool:
    """Whether `directory` holds a complete install of the assets.

    It does when the fetch script's ``manifest.json`` (written last) is there and every file in
    :data:`ASSET_FILES` exists. Checked on every call, so installing the assets into a running service
    takes effect on the next page load.
    """
    if _read_manifest(directory) is None:
        return False
    return all((directory / name).is_file() for name in ASSET_FILES)


def assets_fingerprint(directory: Path) -> str | None:
    """Content fingerprint of an install (from its manifest), used to version the asset URLs."""
    manifest = _read_manifest(directory)
    token = manifest.get("fingerprint") if manifest else None
    if isinstance(token, str) and token.isalnum():
        return token
    return None


async def _serve_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSET_FILES:
        raise web.HTTPNotFound
    directory = request.config_dict[ASSETS_DIR_KEY]
    if not installed(directory):
        raise web.HTTPNotFound(text=f"GraphiQL offline assets are not installed; run {FETCH_COMMAND}")
    token = assets_fingerprint(directory)
    versioned = token is not None and request.query.get("v") == token
    # Versioned URLs (what the page uses) never change content: cache for a year. Anything else must
    # revalidate; aiohttp answers If-None-Match / If-Modified-Since with 304 from ETag/Last-Modified.
    # aiohttp serves the pre-compressed `<name>.gz` written by the fetch script when the client
    # accepts gzip.
    return web.FileResponse(
        directory / name,
        headers={
            "Cache-Control": _IMMUTABLE if versioned else _REVALIDATE,
            "X-Content-Type-Options": "nosniff",
            "Cross-Origin-Resource-Policy": "same-origin",
        },
    )


def add_routes(
    app: web.Application, asset_base: str = DEFAULT_ASSET_BASE, directory: Path = DEFAULT_ASSETS_DIR
) -> None:
    """Serve the asset files installed in `directory` at ``GET/HEAD {asset_base}/{name}``.

    Also records ``asset_base`` and `directory` in the app so :class:`OfflineGraphQLView` builds
    matching URLs from the same install.
    """
    base = _normalise_asset_base(asset_base)
    app[ASSET_BASE_KEY] = base
    app[ASSETS_DIR_KEY] = directory
    app.router.add_get(f"{base}/{{name}}", _serve_asset, name="graphiql-assets")
    if not installed(directory):
        logger.warning(
            "GraphiQL offline assets not found in %s; /graphql will show an installation notice "
            "instead of the IDE until you run `%s` (or set %s).",
            directory,
            FETCH_COMMAND,
            ASSETS_ENV_VAR,
        )


class OfflineGraphQLView(GraphQLView[Context, RootValue]):
    """Strawberry's aiohttp ``GraphQLView`` whose GraphiQL page uses the locally served assets.

    Generic in the context and root value types exactly like ``GraphQLView``; subclass it the same way
    (e.g. ``class MyView(OfflineGraphQLView[MyContext, None])`` overriding ``get_context``). The asset
    URL prefix and install directory are the ones passed to :func:`add_routes`, or :attr:`asset_base`
    and :attr:`assets_directory` if that was not called on this app (e.g. when the files are served by
    a reverse proxy).
    """

    asset_base: str = DEFAULT_ASSET_BASE
    assets_directory: Path = DEFAULT_ASSETS_DIR

    async def render_graphql_ide(self, request: web.Request) -> web.Response:
        if self.graphql_ide != "graphiql":  # apollo-sandbox / pathfinder: Strawberry's own pages
            return await super().render_graphql_ide(request)
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        directory = request.config_dict.get(ASSETS_DIR_KEY, self.assets_directory)
        if not installed(directory):
            page = missing_assets_html(directory)
            return web.Response(status=503, text=page, content_type="text/html", headers=headers)
        base = request.config_dict.get(ASSET_BASE_KEY, self.asset_base)
        page = graphiql_html(base, cache_token=assets_fingerprint(directory))
        return web.Response(text=page, content_type="text/html", headers=headers)
