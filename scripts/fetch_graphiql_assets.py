#!/usr/bin/env python3
"""Download the GraphiQL explorer's browser bundles so `/graphql` works without internet access.

Strawberry's stock GraphiQL page loads React, GraphiQL and the Explorer plugin from unpkg.com; on a
network without internet that page stays blank. This script fetches the same kind of bundles from the
npm registry *at build/install time* (never committed to git) and installs them into the directory
that `service.graphiql` serves them from:

    python3 scripts/fetch_graphiql_assets.py                # $GRAPHIQL_ASSETS_DIR or service/_graphiql_assets
    python3 scripts/fetch_graphiql_assets.py --dest /assets # e.g. in a Docker build stage

Requirements: Python 3.9+ (standard library only, the service's dependencies are not needed) and
`npm` on PATH with access to the npm registry (or the mirror configured in .npmrc / npm_config_registry;
`npm pack` honours npm's proxy and registry settings). Each tarball is checked against the sha512
pinned below before anything is extracted, so a mirror cannot substitute other content.

What gets installed (flat, fixed file names - `service.graphiql.ASSET_FILES` must list the same):

    react.production.min.js       react@18.3.1       umd/react.production.min.js
    react-dom.production.min.js   react-dom@18.3.1   umd/react-dom.production.min.js
    graphiql.min.js               graphiql@3.9.0     graphiql.min.js  (UMD; bundles graphql-js and the
                                                      graphql-ws client used for subscriptions)
    graphiql.min.css              graphiql@3.9.0     graphiql.min.css (fonts inlined as data: URIs)
    plugin-explorer.umd.js        @graphiql/plugin-explorer@3.2.6  dist/index.umd.js
    plugin-explorer.css           @graphiql/plugin-explorer@3.2.6  dist/style.css

plus a `.gz` next to each file (served pre-compressed by aiohttp), the packages' LICENSE files under
`licenses/`, and `manifest.json` (written last; the service only treats the directory as installed
when the manifest and every file listed in it are present).

Why GraphiQL 3.x: it is the last major line with a UMD build that runs from plain <script> tags next
to React 18's UMD build (React 19 ships no UMD build). GraphiQL 4.x still ships a deprecated UMD
build, GraphiQL 5 is ESM-only (Monaco + web workers) and needs a bundler or esm.sh. Strawberry's own
page uses GraphiQL 3.8.3; 3.9.0 is the newest 3.x and @graphiql/plugin-explorer 3.2.6 is the Explorer
release built against the same @graphiql/react (^0.29).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
ENV_VAR = "GRAPHIQL_ASSETS_DIR"
DEFAULT_DEST = Path(__file__).resolve().parent.parent / "service" / "_graphiql_assets"
NPM_TIMEOUT_S = 300

# package -> (exact version, sha512 integrity of the registry tarball, {installed name: path in tarball})
PACKAGES: dict[str, tuple[str, str, dict[str, str]]] = {
    "react": (
        "18.3.1",
        "sha512-wS+hAgJShR0KhEvPJArfuPVN1+Hz1t0Y6n5jLrGQbkb4urgPE/0Rve+1kMB1v/oWgHgm4WIcV+i7F2pTVj+2iQ==",
        {"react.production.min.js": "umd/react.production.min.js"},
    ),
    "react-dom": (
        "18.3.1",
        "sha512-5m4nQKp+rZRb09LNH59GM4BxTh9251/ylbKIbpe7TpGxfJ+9kv6BLkLBXIjjspbgbnIBNqlI23tRnTWT0snUIw==",
        {"react-dom.production.min.js": "umd/react-dom.production.min.js"},
    ),
    "graphiql": (
        "3.9.0",
        "sha512-rJYFlHdBbug9+YbFSwRVvgfPjCayC7wHecZkx/qB4XLuQPFQZw/yB9pmHFtOJV6RiNBBHro3u1GdocKa3YcGRA==",
        {"graphiql.min.js": "graphiql.min.js", "graphiql.min.css": "graphiql.min.css"},
    ),
    "@graphiql/plugin-explorer": (
        "3.2.6",
        "sha512-MXzG/zVNzZfes4Em253bHyAbD/lwwAZkPKvxCAQkjz0i3dtcv4uF3D8iqJ7214iu3SCphbORYZZUC93fik1yew==",
        {"plugin-explorer.umd.js": "dist/index.umd.js", "plugin-explorer.css": "dist/style.css"},
    ),
}

# Sanity checks on bundle contents: GraphiQL's fetcher must carry the graphql-ws client
# (subscriptions over the graphql-transport-ws protocol) since no separate graphql-ws file is loaded.
REQUIRED_MARKERS: dict[str, tuple[bytes, ...]] = {
    "graphiql.min.js": (b"graphql-transport-ws", b"subscriptionUrl", b"createFetcher"),
}
LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt")


class FetchError(RuntimeError):
    pass


def default_dest() -> Path:
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env) if env else DEFAULT_DEST


def _pins() -> dict[str, str]:
    return {name: version for name, (version, _, _) in sorted(PACKAGES.items())}


def _sri_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(
            "npm was not found on PATH. Install Node.js (which includes npm), or run this script in a "
            "node:20-slim build stage, then copy the result directory to the target machine."
        )
    return npm


def _npm_pack(npm: str, spec: str, workdir: Path) -> Path:
    """`npm pack <spec>` downloads the registry tarball without installing or running anything."""
    before = set(workdir.iterdir())
    cmd = [npm, "pack", spec, "--pack-destination", str(workdir), "--ignore-scripts", "--json"]
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"`npm pack {spec}` timed out after {NPM_TIMEOUT_S}s") from exc
    if proc.returncode != 0:
        raise FetchError(
            f"`npm pack {spec}` failed (exit {proc.returncode}); is the npm registry reachable?\n{proc.stderr.strip()}"
        )
    new = [p for p in workdir.iterdir() if p not in before and p.name.endswith(".tgz")]
    if len(new) != 1:
        raise FetchError(f"`npm pack {spec}` produced {len(new)} tarballs, expected 1: {new}")
    return new[0]


def _read_member(tar: tarfile.TarFile, name: str, spec: str) -> bytes:
    try:
        member = tar.getmember(f"package/{name}")
    except KeyError as exc:
        raise FetchError(f"{spec}: the tarball has no file {name!r}") from exc
    if not member.isfile():
        raise FetchError(f"{spec}: {name!r} is not a regular file")
    fh = tar.extractfile(member)
    if fh is None:
        raise FetchError(f"{spec}: cannot read {name!r}")
    with fh:
        return fh.read()


def _download(workdir: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Return ({installed file name: content}, {license file name: content})."""
    npm = _npm()
    files: dict[str, bytes] = {}
    licenses: dict[str, bytes] = {}
    for name, (version, integrity, wanted) in PACKAGES.items():
        spec = f"{name}@{version}"
        print(f"fetching {spec}", file=sys.stderr)
        tgz = _npm_pack(npm, spec, workdir)
        actual = _sri_sha512(tgz)
        if actual != integrity:
            raise FetchError(f"{spec}: tarball integrity mismatch: expected {integrity}, got {actual}")
        with tarfile.open(tgz, "r:gz") as tar:
            for target, source in wanted.items():
                files[target] = _read_member(tar, source, spec)
            for license_name in LICENSE_NAMES:
                try:
                    licenses[name.replace("/", "__") + ".LICENSE"] = _read_member(tar, license_name, spec)
                    break
                except FetchError:
                    continue
    for target, markers in REQUIRED_MARKERS.items():
        missing = [m.decode() for m in markers if m not in files[target]]
        if missing:
            raise FetchError(f"{target} does not contain {missing}; the pinned bundle is not what we expect")
    return files, licenses


def _manifest(files: dict[str, bytes]) -> dict[str, object]:
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    fingerprint = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
    return {"format": MANIFEST_FORMAT, "packages": _pins(), "files": digests, "fingerprint": fingerprint}


def is_up_to_date(dest: Path) -> bool:
    """True when `dest` holds a complete install of exactly the pinned packages."""
    try:
        manifest = json.loads((dest / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("packages") != _pins():
        return False
    digests = manifest.get("files")
    expected = {target for _, _, wanted in PACKAGES.values() for target in wanted}
    if not isinstance(digests, dict) or set(digests) != expected:
        return False
    for name, digest in digests.items():
        try:
            if hashlib.sha256((dest / name).read_bytes()).hexdigest() != digest:
                return False
        except OSError:
            return False
    return True


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def install(dest: Path, *, force: bool = False) -> bool:
    """Install the pinned assets into `dest`; return False if they were already up to date."""
    if not force and is_up_to_date(dest):
        return False
    with tempfile.TemporaryDirectory(prefix="graphiql-npm-") as tmp:
        files, licenses = _download(Path(tmp))
    dest.mkdir(parents=True, exist_ok=True)
    # The manifest goes first out and last in, so a half-written directory never counts as installed.
    (dest / MANIFEST_NAME).unlink(missing_ok=True)
    for name, data in files.items():
        _write(dest / name, data)
        _write(dest / f"{name}.gz", gzip.compress(data, compresslevel=9, mtime=0))
    (dest / "licenses").mkdir(exist_ok=True)
    for name, data in licenses.items():
        _write(dest / "licenses" / name, data)
    _write(dest / MANIFEST_NAME, (json.dumps(_manifest(files), indent=2, sort_keys=True) + "\n").encode())
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help=f"target directory (default: ${ENV_VAR} if set, else {DEFAULT_DEST})",
    )
    parser.add_argument("--force", action="store_true", help="download even if the pinned assets are present")
    args = parser.parse_args(argv)
    dest: Path = (args.dest or default_dest()).resolve()
    try:
        changed = install(dest, force=args.force)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pins = ", ".join(f"{name}@{version}" for name, version in _pins().items())
    print(f"GraphiQL assets {'installed' if changed else 'already up to date'} in {dest} ({pins})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
