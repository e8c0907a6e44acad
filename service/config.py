"""Settings: read once from the environment, typed, validated, failing fast with the variable's name."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cronsim import CronSim, CronSimError

from .errors import ConfigError, InvalidKey
from .storage import check_key, check_prefix

DEFAULT_FETCH_CONCURRENCY = 64
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PAGE_SIZE = 10_000
_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?$")
_KEY_RULES = " (no leading '/', no empty, '.' or '..' segments, no backslash)"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# The MinIO password an earlier .env.example shipped: it is public, so it protects nothing.
_PUBLISHED_EXAMPLE_SECRET = "change-me-to-a-long-random-password"  # noqa: S105


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Secrets are excluded from `repr`."""

    minio_endpoint: str | None = None
    minio_access_key: str | None = field(default=None, repr=False)
    minio_secret_key: str | None = field(default=None, repr=False)
    minio_secure: bool = False
    minio_timeout: float = 30.0
    minio_retries: int = 3
    data_dir: Path = Path("data")
    bucket: str = "datalake"
    src_prefix: str = "src-data/"
    output_key: str = "processed_data/output.csv"
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY
    host: str = "0.0.0.0"  # noqa: S104 - a service in a container listens on all interfaces
    port: int = 8080
    schedule: str = "*/5 * * * *"
    api_token: str | None = field(default=None, repr=False)
    published_address: str | None = None
    max_page_size: int = DEFAULT_MAX_PAGE_SIZE
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    log_format: str = "text"
    introspection: bool = True

    def __post_init__(self) -> None:
        _check_locations(self.src_prefix, self.output_key)

    @property
    def uses_minio(self) -> bool:
        return self.minio_endpoint is not None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from `env` (default: the process environment); `ConfigError` names a bad variable."""
    env = os.environ if env is None else env
    endpoint = _text(env, "MINIO_ENDPOINT")
    if endpoint is not None and not _ENDPOINT.match(endpoint):
        raise ConfigError(f"MINIO_ENDPOINT must be host:port without a scheme, got {endpoint!r}")
    access, secret = _text(env, "MINIO_ACCESS_KEY"), _secret_key(env)
    if endpoint is not None and (access is None or secret is None):
        raise ConfigError("MINIO_ACCESS_KEY and MINIO_SECRET_KEY are required when MINIO_ENDPOINT is set")
    return Settings(
        minio_endpoint=endpoint,
        minio_access_key=access,
        minio_secret_key=secret,
        minio_secure=_bool(env, "MINIO_SECURE", default=False),
        minio_timeout=float(_int(env, "MINIO_TIMEOUT", 30, 1, 3600)),
        minio_retries=_int(env, "MINIO_RETRIES", 3, 0, 20),
        data_dir=Path(_text(env, "DATA_DIR") or "data"),
        bucket=_bucket(env),
        src_prefix=_prefix(env),
        output_key=_text(env, "OUTPUT_KEY") or "processed_data/output.csv",
        fetch_concurrency=_int(env, "FETCH_CONCURRENCY", DEFAULT_FETCH_CONCURRENCY, 1, 1024),
        host=_text(env, "HOST") or "0.0.0.0",  # noqa: S104
        port=_int(env, "PORT", 8080, 0, 65535),
        schedule=_schedule(env),
        api_token=_text(env, "API_TOKEN"),
        published_address=_published_address(env),
        max_page_size=_int(env, "MAX_PAGE_SIZE", DEFAULT_MAX_PAGE_SIZE, 1, 1_000_000),
        max_image_bytes=_int(env, "MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, 1, 1 << 40),
        log_format=_choice(env, "LOG_FORMAT", ("text", "json")),
        introspection=_bool(env, "GRAPHQL_INTROSPECTION", default=True),
    )


def _text(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = (_text(env, name) or choices[0]).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _bucket(env: Mapping[str, str]) -> str:
    bucket = _text(env, "BUCKET") or "datalake"
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"BUCKET must be a valid S3 bucket name (3-63 of a-z 0-9 . -), got {bucket!r}")
    return bucket


def _prefix(env: Mapping[str, str]) -> str:
    prefix = _text(env, "SRC_PREFIX") or "src-data/"
    return prefix if prefix.endswith("/") else prefix + "/"


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


def _secret_key(env: Mapping[str, str]) -> str | None:
    secret = _text(env, "MINIO_SECRET_KEY")
    if secret == _PUBLISHED_EXAMPLE_SECRET:
        raise ConfigError(
            "MINIO_SECRET_KEY is the example password of an earlier .env.example, which anyone can read: "
            "choose a random one, e.g. `openssl rand -hex 24` (with docker compose: MINIO_ROOT_PASSWORD in .env)"
        )
    return secret


def _published_address(env: Mapping[str, str]) -> str | None:
    """Where the deployment publishes the port; anywhere but loopback, starting runs must need API_TOKEN.

    Inside a container the service listens on all interfaces, so only the deployment (docker-compose.yml)
    knows whether the port is reachable from the network, and it says so here.
    """
    address = _text(env, "PUBLISHED_ADDRESS")
    if address is not None and _text(env, "API_TOKEN") is None and not _is_loopback(address):
        raise ConfigError(
            f"API_TOKEN must be set when PUBLISHED_ADDRESS is {address!r}, not a loopback address: "
            "otherwise anyone who can reach the port can start runs"
        )
    return address


def _is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _schedule(env: Mapping[str, str]) -> str:
    schedule = _text(env, "SCHEDULE") or "*/5 * * * *"
    try:
        CronSim(schedule, datetime.now(UTC))  # aiocron's own parser
    except CronSimError as exc:
        raise ConfigError(f"SCHEDULE is not a valid cron expression: {schedule!r} ({exc})") from None
    return schedule
