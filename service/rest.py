"""The original task's REST endpoints, answered by the same query functions as GraphQL."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import hdrs, web
from multidict import MultiMapping

from . import query
from .errors import BadRequest, InvalidKey, ObjectNotFound, StorageError
from .keys import IMAGE_EXTENSIONS
from .report import Outcome
from .snapshot import Snapshot
from .state import ServiceState
from .storage import ObjectStream

logger = logging.getLogger(__name__)

STATE = web.AppKey("state", ServiceState)
IMAGE_CHUNK_BYTES = 256 * 1024
FILTER_PARAMS = frozenset(field.rest for field in query.FILTERS)
_PAGE_PARAMS = frozenset({"limit", "offset"})
_GROUP_BY = "group_by"
_TRUE, _FALSE = frozenset({"true", "True", "1"}), frozenset({"false", "False", "0"})
_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
_MAX_INT = 2**31 - 1  # the range of a GraphQL Int: REST reads no larger number either
_ENCODED_AT_ONCE = 1000  # rows


def parse_filter(params: MultiMapping[str], allowed: frozenset[str] = FILTER_PARAMS) -> query.UserFilter:
    """The filters of `query.FILTERS` from a query string; `BadRequest` names a bad one, or one that is not
    in `allowed`, or one given twice."""
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    repeated = sorted(name for name in allowed if len(params.getall(name, [])) > 1)
    if repeated:
        raise BadRequest(f"{repeated[0]} is given more than once")
    values = {field.name: _parse(field, params[field.rest]) for field in query.FILTERS if field.rest in params}
    return query.UserFilter(**values).validate(query.Api.REST)


def _parse(field: query.FilterField[Any], value: str) -> Any:
    """A filter's value of its type, as a query string spells it (bounds are the domain's to check)."""
    if field.type is bool:
        return _bool(field.rest, value)
    if field.type is int:
        return _natural(field.rest, value)
    return value


def _bool(name: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f"{name} must be true or false (or 1/0), got {value[:50]!r}")


def _natural(name: str, value: str) -> int:
    """A decimal integer from 0 to a GraphQL Int's maximum; its length is checked before `int()` reads it."""
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"{name} must be a non-negative integer, got {value[:50]!r}")
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(_MAX_INT)) or int(digits) > _MAX_INT:
        raise BadRequest(f"{name} must be at most {_MAX_INT} (a 32-bit integer, as over GraphQL), got {value[:50]!r}")
    return int(digits)


async def get_data(request: web.Request) -> web.Response:
    """A JSON array of output rows, one page of them (without `limit`, MAX_PAGE_SIZE rows). The headers
    give the number of matching rows (`X-Total-Count`) and, unless this is the last page, the next (`Link`)."""
    state, params = request.app[STATE], request.query
    flt = parse_filter(params, FILTER_PARAMS | _PAGE_PARAMS)
    limit = _natural("limit", params["limit"]) if "limit" in params else None
    offset = _natural("offset", params["offset"]) if "offset" in params else 0
    page, body = await asyncio.to_thread(
        _records, state.current(), flt, limit=limit, offset=offset, maximum=state.settings.max_page_size
    )
    headers = {"X-Total-Count": str(page.total)}
    if page.next_offset is not None:
        headers["Link"] = f'<{request.rel_url.update_query(offset=page.next_offset)}>; rel="next"'
    return web.Response(body=body, content_type="application/json", charset="utf-8", headers=headers)


def _records(
    snapshot: Snapshot, flt: query.UserFilter, *, limit: int | None, offset: int, maximum: int
) -> tuple[query.Page, bytes]:
    """The page and its JSON (as `json.dumps` writes it), made in a thread: 10,000 rows take ~0.1 s."""
    today = query.today_utc()
    page = query.page(query.select(snapshot, flt, today), limit, offset, maximum)
    rows = [  # the output's columns, as the original task's clients expect them
        {"user_id": r.user_id, "first_name": r.first_name, "last_name": r.last_name, "birthts": r.birthts,
         "img_path": r.img_path}
        for r in query.users(snapshot, page.positions, today)
    ]  # fmt: skip
    # json.dumps holds the GIL until it returns: encoded a slice at a time, the event loop gets its turns.
    slices = (json.dumps(rows[at : at + _ENCODED_AT_ONCE])[1:-1] for at in range(0, len(rows), _ENCODED_AT_ONCE))
    return page, ("[" + ", ".join(slices) + "]").encode()


async def post_data(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.authorize(request.headers.get("Authorization"))
    report = await state.runner.run("rest")
    status = 200 if report.outcome is Outcome.SUCCEEDED else 502
    return web.json_response(report.to_json(), status=status)


async def get_stats(request: web.Request) -> web.Response:
    """The statistics of the matching users: one JSON object, or with `group_by` an array of one per group."""
    params = request.query
    flt = parse_filter(params, FILTER_PARAMS | {_GROUP_BY})
    grouping = _grouping(params[_GROUP_BY]) if _GROUP_BY in params else None
    snapshot, today = request.app[STATE].current(), query.today_utc()
    answer: Callable[[], query.Stats | list[query.StatsGroup]] = (
        partial(query.stats, snapshot, flt, today)
        if grouping is None
        else partial(query.stats_by, snapshot, grouping, flt, today)
    )
    # A filter the histograms cannot answer searches every row: in a thread, as /data.
    result = await asyncio.to_thread(answer) if flt.reads_rows() else answer()
    if isinstance(result, query.Stats):
        return web.json_response({field.rest: getattr(result, field.name) for field in query.STATS_FIELDS})
    return web.json_response([{f.rest: getattr(group, f.name) for f in query.GROUP_FIELDS} for group in result])


def _grouping(value: str) -> query.Grouping:
    for grouping in query.GROUPINGS:
        if grouping.rest == value:
            return grouping
    allowed = ", ".join(g.rest for g in query.GROUPINGS)
    raise BadRequest(f"{_GROUP_BY} must be one of {allowed}, got {value[:50]!r}")


async def get_image(request: web.Request) -> web.StreamResponse:
    """The user's image, streamed: memory per request stays at one chunk, whatever the image's size."""
    state = request.app[STATE]
    user_id = request.match_info["user_id"]
    key = _image_key(state, user_id)
    limit = state.settings.max_image_bytes
    try:
        async with state.store.open(key) as image:
            if image.size > limit:
                # 413, not 404: the image exists, and none of it is read.
                error = f"the image of user {user_id[:100]} is larger than MAX_IMAGE_BYTES ({limit} bytes)"
                return web.json_response({"error": error}, status=413)
            return await _send(request, image, key)
    except InvalidKey as exc:  # a hand-edited output with a key the store refuses: nothing to serve
        raise ObjectNotFound(f"no image for user {user_id[:100]}") from exc


def _image_key(state: ServiceState, user_id: str) -> str:
    snapshot = state.current()
    position = snapshot.position(user_id)
    key = str(snapshot.table["img_path"].iat[position]) if position is not None else ""
    # Only keys the aggregator took from the source listing are served: nothing outside the prefix.
    if not key or not key.startswith(state.settings.src_prefix) or _extension(key) not in IMAGE_EXTENSIONS:
        raise ObjectNotFound(f"no image for user {user_id[:100]}")
    return key


def _extension(key: str) -> str:
    return key.rpartition(".")[2].lower()


async def _send(request: web.Request, image: ObjectStream, key: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = _CONTENT_TYPES[_extension(key)]
    response.content_length = image.size
    await response.prepare(request)
    if request.method == hdrs.METH_HEAD:
        return response
    try:
        async for chunk in image.chunks(IMAGE_CHUNK_BYTES):
            await response.write(chunk)
    except StorageError as exc:
        # The status line is out: closing the connection is the only way left to tell the client.
        logger.warning("image %s cut short: %s", key, exc.for_log())
        response.force_close()
        return response
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/data", get_data)
    app.router.add_post("/data", post_data)
    app.router.add_get("/stats", get_stats)
    app.router.add_get("/images/{user_id}", get_image)
