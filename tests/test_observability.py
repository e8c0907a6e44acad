"""Metrics, persisted run history, live events over graphql-transport-ws, and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import strawberry
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from s3server import free_ports
from support import NEVER, ClientFactory, gql, metric, wait_ready

from service.app import create_app
from service.config import Settings
from service.history import HistoryStore
from service.local_store import LocalStore
from service.logs import JsonFormatter, TextFormatter
from service.metrics import Metrics
from service.report import REJECTED_SAMPLE, Outcome, RejectedFile, RunReport

PROTOCOL = "graphql-transport-ws"


async def test_metrics(client: TestClient[Any, Any]) -> None:
    await gql(client, "{ stats { count } }")
    await gql(client, "{ a: users(limit: 1) { userId } }")
    await client.get("/stats", params={"min_age": "bad"})
    await gql(client, "mutation { reprocess { id } }")
    response = await client.get("/metrics")
    assert response.status == 200 and response.content_type == "text/plain"
    text = await response.text()
    assert metric(text, 'aggregation_runs_total{outcome="succeeded"}') == 2  # start-up and the mutation
    assert metric(text, "snapshot_users") == 7
    assert 0 <= metric(text, "snapshot_age_seconds") < 60
    assert metric(text, 'aggregation_last_run_objects{stage="rejected"}') == 1
    assert metric(text, 'graphql_operation_seconds_count{operation="query:stats"}') == 1
    assert metric(text, 'graphql_operation_seconds_count{operation="query:users"}') == 1  # an alias is not a label
    assert metric(text, 'http_responses_total{method="GET",route="/stats",status="400"}') == 1
    assert metric(text, 'http_responses_total{method="POST",route="/graphql",status="200"}') == 3


async def test_operation_labels_follow_the_schema_they_time() -> None:
    @strawberry.type
    class Query:
        @strawberry.field
        def first_field(self) -> int:
            return 1

    metrics = Metrics()
    schema = strawberry.Schema(query=Query, extensions=[metrics.extension()])
    for document in ("{ firstField }", "{ a: firstField }", "{ chosenByTheClient }", "{ __typename }"):
        await schema.execute(document)
    counts = {
        sample.labels["operation"]: sample.value
        for sample in metrics.queries.collect()[0].samples
        if sample.name.endswith("_count")
    }
    assert counts == {"query:firstField": 2, "query:other": 2}  # a name no field has is no label


async def test_run_history_survives_a_restart(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    first = await aiohttp_client(create_app(Settings(schedule=NEVER), store=local))
    await wait_ready(first)
    await gql(first, "mutation { reprocess { id } }")
    before = (await gql(first, "{ runs { id trigger outcome rejected { key } } }"))["data"]["runs"]
    await first.close()
    assert [r["trigger"] for r in before] == ["mutation", "startup"]

    second = await aiohttp_client(
        create_app(Settings(schedule=NEVER), store=LocalStore(local._root.parent, "datalake"))
    )
    await wait_ready(second)
    for _ in range(100):
        runs = (await gql(second, "{ runs { id trigger outcome rejected { key } } }"))["data"]["runs"]
        if len(runs) == 3:
            break
        await asyncio.sleep(0.05)
    assert runs[1:] == before  # the earlier runs, then the new start-up run on top
    assert runs[0]["trigger"] == "startup" and runs[0]["id"] == before[0]["id"] + 1


HISTORY_KEY = "processed_data/output.csv.runs.json"


def old_entry(run_id: int, rejected: list[RejectedFile]) -> dict[str, Any]:
    """A history entry as written before reports were bounded: every rejected file, no count."""
    entry = RunReport(run_id, "schedule", datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, 0, 1, tzinfo=UTC),
                      Outcome.SUCCEEDED, rejected=tuple(rejected)).to_json()  # fmt: skip
    del entry["rejected_count"]
    return entry


async def test_an_old_history_with_every_rejected_file_loads_cut_down(local_store: LocalStore) -> None:
    files = [RejectedFile(f"src-data/{i:05d}.csv", f"reason {i}") for i in range(3_000)][::-1]
    await local_store.put(HISTORY_KEY, json.dumps({"runs": [old_entry(1, files), old_entry(2, [])]}).encode())
    history = HistoryStore(local_store, HISTORY_KEY, limit=100)
    old, empty = await history.load()
    assert old.rejected_count == 3_000 and old.rejected == tuple(sorted(files, key=lambda f: f.key)[:REJECTED_SAMPLE])
    assert (empty.rejected_count, empty.rejected) == (0, ())
    await history.record(empty)  # merged into the history: every entry is written again
    assert len(await local_store.get(HISTORY_KEY)) < 4_000  # was over 200 KB
    assert await history.load() == [old, empty]


async def test_the_history_is_encoded_and_decoded_off_the_event_loop(
    local_store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []
    to_json, from_json = RunReport.to_json, RunReport.from_json

    def recording_to_json(report: RunReport) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return to_json(report)

    def recording_from_json(data: dict[str, Any]) -> RunReport:
        threads.append(threading.current_thread())
        return from_json(data)

    monkeypatch.setattr(RunReport, "to_json", recording_to_json)
    monkeypatch.setattr(RunReport, "from_json", recording_from_json)
    history = HistoryStore(local_store, HISTORY_KEY, limit=100)
    report = RunReport(1, "schedule", datetime.now(UTC), datetime.now(UTC), Outcome.SUCCEEDED)
    await history.record(report)
    assert await history.load() == [report]
    assert len(threads) == 2 and threading.current_thread() not in threads


async def subscribe(client: TestClient[Any, Any], query: str, payload: dict[str, str] | None = None) -> Any:
    ws = await client.ws_connect("/graphql", protocols=(PROTOCOL,))
    await ws.send_json({"type": "connection_init", "payload": payload or {}})
    ack = await ws.receive_json(timeout=5)
    assert ack["type"] == "connection_ack"
    await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": query}})
    return ws


async def test_run_events_stream_progress_then_the_report(client: TestClient[Any, Any]) -> None:
    ws = await subscribe(
        client, "subscription { runEvents { runId progress { listed toFetch fetched } report { outcome users } } }"
    )
    snapshots = await subscribe(client, "subscription { snapshots { version users } }")
    await asyncio.sleep(0.1)  # let both subscriptions register before the run starts
    await gql(client, "mutation { reprocess { id } }")
    events = []
    while True:
        message = await ws.receive_json(timeout=5)
        assert message["type"] == "next", message
        events.append(message["payload"]["data"]["runEvents"])
        if events[-1]["report"] is not None:
            break
    assert events[-1]["report"] == {"outcome": "SUCCEEDED", "users": 7}
    progress = [e["progress"] for e in events[:-1]]
    assert progress and progress[-1]["listed"] == 12 and all(p["fetched"] <= p["toFetch"] for p in progress)
    assert len({e["runId"] for e in events}) == 1
    published = await snapshots.receive_json(timeout=5)
    assert published["payload"]["data"]["snapshots"] == {"version": 1, "users": 7}
    await ws.close()
    await snapshots.close()


async def test_subscriptions_check_the_token_in_the_handshake(aiohttp_client: ClientFactory, local: LocalStore) -> None:
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, api_token="tok-3"), store=local))
    await wait_ready(client)
    ws = await client.ws_connect("/graphql", protocols=(PROTOCOL,))
    await ws.send_json({"type": "connection_init", "payload": {"Authorization": "Bearer wrong"}})
    closing = await ws.receive(timeout=5)
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED) and ws.close_code == 4403
    allowed = await subscribe(client, "subscription { snapshots { version } }", {"Authorization": "Bearer tok-3"})
    await allowed.close()


async def run_over_websocket(client: TestClient[Any, Any], payload: dict[str, Any], **headers: str) -> Any:
    """`reprocess` over graphql-transport-ws; the `next` message's payload."""
    ws = await client.ws_connect("/graphql", protocols=(PROTOCOL,), headers=headers)
    await ws.send_json({"type": "connection_init", "payload": payload})
    assert (await ws.receive_json(timeout=5))["type"] == "connection_ack"
    await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": "mutation { reprocess { trigger } }"}})
    result = await ws.receive_json(timeout=10)
    assert result["type"] == "next", result
    assert (await ws.receive_json(timeout=5))["type"] == "complete"
    await ws.close()
    return result["payload"]


@pytest.mark.parametrize(
    ("payload", "headers"),
    [
        ({"Authorization": "Bearer tok-4"}, {}),
        ({"authorization": "Bearer tok-4"}, {}),
        ({"headers": {"Authorization": "Bearer tok-4"}}, {}),
        ({}, {"Authorization": "Bearer tok-4"}),  # on the upgrade request, for clients that can set it
    ],
)
async def test_a_token_given_when_a_websocket_opens_authorizes_its_mutations(
    aiohttp_client: ClientFactory, local: LocalStore, payload: dict[str, Any], headers: dict[str, str]
) -> None:
    # Before: the mutation checked only the upgrade request's header, so a token in connection_init,
    # the one place a browser can put it, admitted subscriptions but not `reprocess`.
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, api_token="tok-4"), store=local))
    await wait_ready(client)
    assert await run_over_websocket(client, payload, **headers) == {"data": {"reprocess": {"trigger": "mutation"}}}


@pytest.mark.parametrize(
    "payload", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": 5}, {"headers": "Bearer tok-4"}]
)
async def test_a_websocket_without_the_token_is_refused_before_any_operation(
    aiohttp_client: ClientFactory, local: LocalStore, payload: dict[str, Any]
) -> None:
    client = await aiohttp_client(create_app(Settings(schedule=NEVER, api_token="tok-4"), store=local))
    await wait_ready(client)
    ws = await client.ws_connect("/graphql", protocols=(PROTOCOL,))
    await ws.send_json({"type": "connection_init", "payload": payload})
    closing = await ws.receive(timeout=5)
    assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED) and ws.close_code == 4403
    runs = (await gql(client, "{ runs { trigger } }"))["data"]["runs"]
    assert [run["trigger"] for run in runs] == ["startup"]


async def test_without_a_configured_token_websocket_mutations_are_open(client: TestClient[Any, Any]) -> None:
    assert await run_over_websocket(client, {}) == {"data": {"reprocess": {"trigger": "mutation"}}}


async def test_legacy_subscription_protocol_is_off(client: TestClient[Any, Any]) -> None:
    ws = await client.ws_connect("/graphql", protocols=("graphql-ws",))
    assert ws.protocol is None or ws.protocol != "graphql-ws"
    message = await ws.receive(timeout=5)
    assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)


async def test_one_log_line_per_run(client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service"):
        await gql(client, "mutation { reprocess { id } }")
    runs = [
        r.getMessage() for r in caplog.records if r.name == "service.runner" and "rejected" not in r.getMessage()[:30]
    ]
    assert len([m for m in runs if m.startswith("run ")]) == 1
    assert "(mutation) succeeded" in runs[0] and "users=7" in runs[0] and "rejected=1" in runs[0]
    # The start-up run logged the rejection; it has not changed since, so it is not logged again.
    assert not any("src-data/broken.csv" in r.getMessage() for r in caplog.records)


def test_json_log_lines() -> None:
    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "run %d done", (3,), None)
    record.status = 200
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"], line["status"]) == ("info", "service.x", "run 3 done", 200)
    assert line["time"].endswith("+00:00")


def test_app_factory_accepts_disabled_introspection(tmp_path: Path) -> None:
    app = create_app(Settings(introspection=False), store=LocalStore(tmp_path, "bucket"))
    assert isinstance(app, web.Application)


def test_text_logs_cannot_be_forged_by_user_input() -> None:
    formatter = TextFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "GET %s", ("/a\n2099 INFO forged\r\x1b[2J",), None)
    assert formatter.format(record) == "INFO GET /a\\n2099 INFO forged\\r\\x1b[2J"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert formatter.format(failed).count("\n") >= 2  # a traceback keeps its lines


async def test_store_errors_are_logged_as_they_are(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    (port,) = free_ports(1)
    settings = Settings(
        minio_endpoint=f"127.0.0.1:{port}", minio_access_key="key", minio_secret_key="s", minio_retries=1,
        schedule=NEVER,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="service"):
        await aiohttp_client(create_app(settings))
        for _ in range(100):
            logged = [r.getMessage() for r in caplog.records if "start-up" in r.getMessage()]
            if logged:
                break
            await asyncio.sleep(0.05)
    # A one-letter secret key is no reason to touch a message: it holds no secret to begin with.
    assert logged and "cannot create bucket 'datalake' after 2 attempts" in logged[0]
    assert f"at 127.0.0.1:{port}" in logged[0]  # the endpoint is in the log, not in any report
    assert "*" not in logged[0]
