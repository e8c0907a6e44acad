"""Bucket event notifications, as the stores send them to a webhook: which keys of the bucket changed.

Two payloads are understood:

- MinIO's webhook target: `{"EventName": ..., "Key": "<bucket>/<key>", "Records": [...]}`, the records
  in the S3 event structure (`eventName`, `s3.bucket.name`, `s3.object.key` URL-encoded as a query
  string: `+` for a space). Only object creations and removals name a change; other events (reads,
  for one: the service's own GETs would come back as events) are ignored.
- SeaweedFS's filer webhook: `{"event_type": "create|update|delete|rename", "key": "/buckets/<bucket>/
  <key>", "message": {"old_entry": ..., "new_entry": ..., "new_parent_path": ...}}`. `key` is the old
  path (the new one for a creation); a rename also names the new path. A folder that is deleted or
  renamed is named as a folder, whose files are all looked at again (the filer need not send an event
  for each file it held); that a folder was created or touched says nothing about any file.

A notification says that a key may have changed, not what it holds now: the run that follows asks the
store. So a late, repeated or reordered event does no harm.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from .aggregator import Targets
from .errors import BadRequest

MINIO_CHANGES = ("s3:ObjectCreated:", "s3:ObjectRemoved:")
SEAWEED_EVENTS = frozenset({"create", "update", "delete", "rename"})
SEAWEED_FOLDER_CHANGES = frozenset({"delete", "rename"})
SEAWEED_BUCKETS = "/buckets/"
"""Where the SeaweedFS filer keeps S3 buckets (its default `buckets_folder`)."""


@dataclass(frozen=True)
class Notice:
    """What one notification names in this service's bucket, and how many of its records it ignores
    (another bucket, or an event that changes no object)."""

    targets: Targets
    ignored: int


def parse(body: bytes, bucket: str) -> Notice:
    """The keys and folders of `bucket` that a notification names; `BadRequest` when it is neither
    payload (the message says what is wrong)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    if "Records" in payload:
        return _minio(payload["Records"], bucket)
    if "event_type" in payload:
        return _seaweed(payload, bucket)
    raise BadRequest("not a bucket notification: expected MinIO's 'Records' or SeaweedFS's 'event_type'")


def _minio(records: object, bucket: str) -> Notice:
    if not isinstance(records, list):
        raise BadRequest("'Records' must be a list")
    keys: set[str] = set()
    ignored = 0
    for at, record in enumerate(records):
        name, record_bucket, key = _record(record, at)
        if record_bucket != bucket or not name.startswith(MINIO_CHANGES):
            ignored += 1
            continue
        keys.add(key)
    return Notice(Targets(frozenset(keys)), ignored)


def _record(record: object, at: int) -> tuple[str, str, str]:
    """A record's event name, bucket and (decoded) object key."""
    name = _field(record, ("eventName",), f"Records[{at}]")
    bucket = _field(record, ("s3", "bucket", "name"), f"Records[{at}]")
    encoded = _field(record, ("s3", "object", "key"), f"Records[{at}]")
    try:
        return name, bucket, unquote_plus(encoded, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(f"Records[{at}].s3.object.key is not URL-encoded UTF-8") from None


def _field(node: object, path: tuple[str, ...], where: str) -> str:
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            raise BadRequest(f"{where}.{'.'.join(path)} is missing")
        node = node[name]
    if not isinstance(node, str):
        raise BadRequest(f"{where}.{'.'.join(path)} must be a string")
    return node


def _seaweed(payload: dict[str, Any], bucket: str) -> Notice:
    event_type, path, message = payload.get("event_type"), payload.get("key"), payload.get("message")
    if event_type not in SEAWEED_EVENTS:
        raise BadRequest(f"event_type must be one of {', '.join(sorted(SEAWEED_EVENTS))}")
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadRequest("key must be an absolute filer path")
    if not isinstance(message, dict):
        raise BadRequest("message must be an object")
    old, new = _entry(message, "old_entry"), _entry(message, "new_entry")
    paths = {path: _is_folder(old if old is not None else new)}
    if new is not None:  # the same path but for a rename
        paths.setdefault(_new_path(message, new, path), _is_folder(new))
    keys: set[str] = set()
    prefixes: set[str] = set()
    ignored = 0
    root = f"{SEAWEED_BUCKETS}{bucket}"
    for filer_path, folder in paths.items():
        outside = filer_path != root and not filer_path.startswith(root + "/")
        if outside or (folder and event_type not in SEAWEED_FOLDER_CHANGES):
            ignored += 1
        elif folder:
            prefixes.add(filer_path.removeprefix(root).strip("/") + "/" if filer_path != root else "")
        else:
            keys.add(filer_path.removeprefix(root + "/"))
    return Notice(Targets(frozenset(keys), frozenset(prefixes)), ignored)


def _entry(message: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = message.get(name)
    if entry is not None and not isinstance(entry, dict):
        raise BadRequest(f"message.{name} must be an object")
    return entry


def _is_folder(entry: dict[str, Any] | None) -> bool:
    return entry is not None and entry.get("is_directory") is True


def _new_path(message: dict[str, Any], new: dict[str, Any], path: str) -> str:
    """Where the new entry is: in `new_parent_path` under its own name (the old path without them)."""
    parent, name = message.get("new_parent_path"), new.get("name")
    if not parent and name is None:
        return path
    if not isinstance(parent, str) or not isinstance(name, str) or not name or "/" in name:
        raise BadRequest("message.new_parent_path and message.new_entry.name must name the new path")
    return f"{parent.rstrip('/')}/{name}"
