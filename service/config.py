"""Settings: each one defined once (variable, default, parser), read from the environment, typed, validated,
failing fast with the variable's name."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cronsim import CronSim, CronSimError

from .errors import ConfigError, InvalidKey
from .storage import check_key, check_prefix

T = TypeVar("T")

DEFAULT_FETCH_CONCURRENCY = 64
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PAGE_SIZE = 10_000
#: Inside the package (gitignored), where `scripts/fetch_graphiql_assets.py` installs by default.
DEFAULT_GRAPHIQL_ASSETS_DIR = Path(__file__).resolve().parent / "_graphiql_assets"
MASK = "***"
_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?$")
_KEY_RULES = " (no leading '/', no empty, '.' or '..' segments, no backslash)"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# The MinIO password an earlier .env.example shipped: it is public, so it protects nothing.
_PUBLISHED_EXAMPLE_SECRET = "change-me-to-a-long-random-password"  # noqa: S105

Parse = Callable[[str, str], T]
"""Turns a variable's text (never blank) into its setting; `ConfigError` names the variable."""


@dataclass(frozen=True)
class Variable:
    """The environment variable behind one setting."""

    name: str
    parse: Parse[Any]
    secret: bool = False


def _setting(name: str, default: T, parse: Parse[T], *, secret: bool = False) -> T:
    """A `Settings` field: its default here, and only here; secrets are kept out of `repr`."""
    return field(default=default, repr=not secret, metadata={"variable": Variable(name, parse, secret)})


def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw)


def _number(kind: Callable[[str], T], what: str, low: float, high: float, unit: str = "") -> Parse[T]:
    """A parser of numbers of `kind` (int or float) from `low` to `high`."""

    def parse(name: str, raw: str) -> T:
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
        if not low <= value <= high:  # type: ignore[operator]
            raise ConfigError(f"{name} must be between {low:g} and {high:g}{unit}, got {raw}")
        return value

    return parse


def _integer(low: int, high: int) -> Parse[int]:
    return _number(int, "an integer", low, high)


def _seconds(low: int, high: int) -> Parse[float]:
    whole = _integer(low, high)
    return lambda name, raw: float(whole(name, raw))


def _fraction(low: float, high: float) -> Parse[float]:
    return _number(float, "a number of seconds", low, high, " seconds")


def _boolean(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _one_of(*choices: str) -> Parse[str]:
    def parse(name: str, raw: str) -> str:
        if raw.lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw.lower()!r}")
        return raw.lower()

    return parse


def _endpoint(name: str, raw: str) -> str:
    if not _ENDPOINT.match(raw):
        raise ConfigError(f"{name} must be host:port without a scheme, got {raw!r}")
    return raw


def _bucket(name: str, raw: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", raw):
        raise ConfigError(f"{name} must be a valid S3 bucket name (3-63 of a-z 0-9 . -), got {raw!r}")
    return raw


def _prefix(name: str, raw: str) -> str:
    return raw if raw.endswith("/") else raw + "/"


def _schedule(name: str, raw: str) -> str:
    try:
        CronSim(raw, datetime.now(UTC))  # aiocron's own parser
    except CronSimError as exc:
        raise ConfigError(f"{name} is not a valid cron expression: {raw!r} ({exc})") from None
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything configurable, each field with its variable. Secrets are excluded from `repr`."""

    minio_endpoint: str | None = _setting("MINIO_ENDPOINT", None, _endpoint)
    minio_access_key: str | None = _setting("MINIO_ACCESS_KEY", None, _text, secret=True)
    minio_secret_key: str | None = _setting("MINIO_SECRET_KEY", None, _text, secret=True)
    minio_secure: bool = _setting("MINIO_SECURE", False, _boolean)
    minio_timeout: float = _setting("MINIO_TIMEOUT", 30.0, _seconds(1, 3600))
    minio_retries: int = _setting("MINIO_RETRIES", 3, _integer(0, 20))
    data_dir: Path = _setting("DATA_DIR", Path("data"), _path)  # noqa: RUF009 - a Field, like field()
    bucket: str = _setting("BUCKET", "datalake", _bucket)
    src_prefix: str = _setting("SRC_PREFIX", "src-data/", _prefix)
    output_key: str = _setting("OUTPUT_KEY", "processed_data/output.csv", _text)
    fetch_concurrency: int = _setting("FETCH_CONCURRENCY", DEFAULT_FETCH_CONCURRENCY, _integer(1, 1024))
    # A service in a container listens on all interfaces.
    host: str = _setting("HOST", "0.0.0.0", _text)  # noqa: S104
    port: int = _setting("PORT", 8080, _integer(0, 65535))
    schedule: str = _setting("SCHEDULE", "*/5 * * * *", _schedule)
    api_token: str | None = _setting("API_TOKEN", None, _text, secret=True)
    # Bucket events (POST /events) are accepted only with this token; unset, the route does not exist.
    events_token: str | None = _setting("EVENTS_TOKEN", None, _text, secret=True)
    events_window: float = _setting("EVENTS_WINDOW", 0.3, _fraction(0, 60))
    published_address: str | None = _setting("PUBLISHED_ADDRESS", None, _text)
    max_page_size: int = _setting("MAX_PAGE_SIZE", DEFAULT_MAX_PAGE_SIZE, _integer(1, 1_000_000))
    max_image_bytes: int = _setting("MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, _integer(1, 1 << 40))
    log_format: str = _setting("LOG_FORMAT", "text", _one_of("text", "json"))
    introspection: bool = _setting("GRAPHQL_INTROSPECTION", True, _boolean)
    graphiql_assets_dir: Path = _setting("GRAPHIQL_ASSETS_DIR", DEFAULT_GRAPHIQL_ASSETS_DIR, _path)  # noqa: RUF009
    lease_ttl: float = _setting("LEASE_TTL", 30.0, _fraction(1, 3600))
    follow_interval: float = _setting("FOLLOW_INTERVAL", 2.0, _fraction(0.05, 3600))
    replica_id: str | None = _setting("REPLICA_ID", None, _text)
    workers: int = _setting("WORKERS", 1, _integer(1, 64))
    response_cache_bytes: int = _setting("RESPONSE_CACHE_BYTES", 64 << 20, _integer(0, 1 << 40))
    persisted_query_bytes: int = _setting("PERSISTED_QUERY_BYTES", 4 << 20, _integer(0, 1 << 40))

    def replica(self) -> str:
        """This process's name among the replicas: REPLICA_ID, else the host name and the process id
        (worked out when asked: worker processes are forked after the settings are read)."""
        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    def __post_init__(self) -> None:
        if self.minio_endpoint is not None and (self.minio_access_key is None or self.minio_secret_key is None):
            raise ConfigError("MINIO_ACCESS_KEY and MINIO_SECRET_KEY are required when MINIO_ENDPOINT is set")
        if self.minio_secret_key == _PUBLISHED_EXAMPLE_SECRET:
            raise ConfigError(
                "MINIO_SECRET_KEY is the example password of an earlier .env.example, which anyone can read: "
                "choose a random one, e.g. `openssl rand -hex 24` (with docker compose: MINIO_ROOT_PASSWORD in .env)"
            )
        _check_published_address(self.published_address, self.api_token)
        _check_locations(self.src_prefix, self.output_key)


def _variables() -> list[tuple[str, Variable]]:
    """(field name, variable) of every setting, in the order of `Settings`."""
    return [(f.name, f.metadata["variable"]) for f in fields(Settings)]


def variables() -> list[str]:
    """The names of every variable the settings are read from."""
    return [variable.name for _, variable in _variables()]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from `env` (default: the process environment); `ConfigError` names a bad variable.

    A variable that is unset, empty or blank leaves its setting at the default: compose passes optional
    variables through as empty strings.
    """
    env = os.environ if env is None else env
    given: dict[str, Any] = {}
    for attribute, variable in _variables():
        if raw := env.get(variable.name, "").strip():
            given[attribute] = variable.parse(variable.name, raw)
    return Settings(**given)


def describe(settings: Settings) -> list[str]:
    """`NAME=value` for every setting, as `load_settings` would read it back; a secret that is set shows as
    `MASK`, and an unset one is empty."""
    return [f"{variable.name}={_shown(getattr(settings, attribute), variable)}" for attribute, variable in _variables()]


def _shown(value: object, variable: Variable) -> str:
    if value is None:
        return ""
    if variable.secret:
        return MASK
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _check_locations(src_prefix: str, output_key: str) -> None:
    """Refuse at start-up what the stores would refuse on every run, with an error naming no setting.

    The stores list with `check_prefix` and read each listed key with `check_key`, so the prefix must
    pass both: `a//` lists keys that can never be read.
    """
    try:
        check_prefix(src_prefix)
        check_key(src_prefix.removesuffix("/"))
    except InvalidKey:
        raise ConfigError(f"SRC_PREFIX must be a relative key prefix{_KEY_RULES}, got {src_prefix!r}") from None
    try:
        check_key(output_key)
    except InvalidKey:
        raise ConfigError(f"OUTPUT_KEY must be a relative object key{_KEY_RULES}, got {output_key!r}") from None
    # Listed with the sources, `output.csv` would be read as user "output"'s file and rejected every run.
    if output_key.startswith(src_prefix):
        raise ConfigError(f"OUTPUT_KEY {output_key!r} must not be under SRC_PREFIX {src_prefix!r}")


def _check_published_address(address: str | None, api_token: str | None) -> None:
    """Where the deployment publishes the port; anywhere but loopback, starting runs must need API_TOKEN.

    Inside a container the service listens on all interfaces, so only the deployment (docker-compose.yml)
    knows whether the port is reachable from the network, and it says so in PUBLISHED_ADDRESS.
    """
    if address is not None and not (api_token or "").strip() and not _is_loopback(address):
        raise ConfigError(
            f"API_TOKEN must be set when PUBLISHED_ADDRESS is {address!r}, not a loopback address: "
            "otherwise anyone who can reach the port can start runs"
        )


def _is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
