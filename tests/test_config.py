"""Settings from the environment."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from service.aggregator import Aggregator
from service.config import (
    DEFAULT_FETCH_CONCURRENCY,
    DEFAULT_GRAPHIQL_ASSETS_DIR,
    DEFAULT_MAX_IMAGE_BYTES,
    MASK,
    Settings,
    describe,
    load_settings,
    variables,
)
from service.errors import ConfigError
from service.local_store import LocalStore

S3 = {"MINIO_ENDPOINT": "minio:9000", "MINIO_ACCESS_KEY": "access", "MINIO_SECRET_KEY": "s3cr3t-value"}


def test_defaults() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert (settings.bucket, settings.src_prefix, settings.output_key) == (
        "datalake", "src-data/", "processed_data/output.csv"
    )  # fmt: skip
    assert settings.data_dir == Path("data")
    assert settings.fetch_concurrency == DEFAULT_FETCH_CONCURRENCY
    assert settings.max_image_bytes == DEFAULT_MAX_IMAGE_BYTES == 20 * 1024 * 1024
    assert settings.minio_endpoint is None
    assert settings.graphiql_assets_dir == DEFAULT_GRAPHIQL_ASSETS_DIR


def test_minio_settings_and_secrets_hidden() -> None:
    settings = load_settings({**S3, "MINIO_SECURE": "true", "API_TOKEN": "tok-123", "SRC_PREFIX": "in"})
    assert settings.minio_endpoint == "minio:9000" and settings.minio_secure
    assert settings.src_prefix == "in/"
    for shown in (repr(settings), str(settings), f"{settings}"):
        assert "s3cr3t-value" not in shown and "tok-123" not in shown


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"FETCH_CONCURRENCY": "many"}, "FETCH_CONCURRENCY"),
        ({"FETCH_CONCURRENCY": "0"}, "FETCH_CONCURRENCY"),
        ({"PORT": "70000"}, "PORT"),
        (
            {"MINIO_ENDPOINT": "http://minio:9000", "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b"},
            "MINIO_ENDPOINT",
        ),
        ({"MINIO_ENDPOINT": "minio:9000"}, "MINIO_ACCESS_KEY"),
        ({**S3, "MINIO_SECURE": "maybe"}, "MINIO_SECURE"),
        ({"BUCKET": "Not_A_Bucket"}, "BUCKET"),
        ({"SRC_PREFIX": "../up"}, "SRC_PREFIX"),
        ({"OUTPUT_KEY": "src-data/output.csv"}, "OUTPUT_KEY"),
        ({"SRC_PREFIX": "in", "OUTPUT_KEY": "in/output.csv"}, "OUTPUT_KEY"),
        ({"SCHEDULE": "every minute"}, "SCHEDULE"),
        ({"MAX_IMAGE_BYTES": "20M"}, "MAX_IMAGE_BYTES"),
        ({"MAX_IMAGE_BYTES": "0"}, "MAX_IMAGE_BYTES"),
        ({**S3, "MINIO_SECRET_KEY": "change-me-to-a-long-random-password"}, "MINIO_SECRET_KEY"),
        ({"PUBLISHED_ADDRESS": "0.0.0.0"}, "API_TOKEN"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        load_settings(env)
    assert "s3cr3t-value" not in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("SRC_PREFIX", "./src-data/", "'./src-data/'"),
        ("SRC_PREFIX", "src-data/./2024/", "'src-data/./2024/'"),
        ("SRC_PREFIX", "src-data//2024/", "'src-data//2024/'"),
        ("SRC_PREFIX", "src-data//", "'src-data//'"),
        ("SRC_PREFIX", "src\\data", "'src\\\\data/'"),
        ("SRC_PREFIX", "/src-data/", "'/src-data/'"),
        ("OUTPUT_KEY", "processed_data//output.csv", "'processed_data//output.csv'"),
        ("OUTPUT_KEY", "./output.csv", "'./output.csv'"),
        ("OUTPUT_KEY", "processed_data/../output.csv", "'processed_data/../output.csv'"),
        ("OUTPUT_KEY", "processed_data\\output.csv", "'processed_data\\\\output.csv'"),
        ("OUTPUT_KEY", "processed_data/", "'processed_data/'"),
        ("OUTPUT_KEY", "/output.csv", "'/output.csv'"),
    ],
)
def test_keys_the_stores_would_refuse_stop_start_up(variable: str, value: str, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value})
    message = str(caught.value)
    assert message.startswith(variable) and shown in message


def test_settings_built_in_code_follow_the_same_rules() -> None:
    with pytest.raises(ConfigError, match="SRC_PREFIX"):
        Settings(src_prefix="./src-data/")
    with pytest.raises(ConfigError, match="OUTPUT_KEY"):
        Settings(output_key="out//put.csv")
    with pytest.raises(ConfigError, match="OUTPUT_KEY"):
        Settings(output_key="src-data/output.csv")


def test_locations_beside_the_source_prefix() -> None:
    settings = load_settings({"SRC_PREFIX": "in/2024", "OUTPUT_KEY": "in/2024-output.csv"})
    assert (settings.src_prefix, settings.output_key) == ("in/2024/", "in/2024-output.csv")


def test_max_image_bytes() -> None:
    assert load_settings({"MAX_IMAGE_BYTES": "1048576"}).max_image_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("192.0.2.10", False),
        ("service.example.org", False),
    ],
)
def test_a_port_published_beyond_loopback_needs_an_api_token(address: str, loopback: bool) -> None:
    """Runs cost the store a full listing: off this machine, starting one must take the token."""
    assert load_settings({"PUBLISHED_ADDRESS": address, "API_TOKEN": "tok-123"}).published_address == address
    if loopback:
        assert load_settings({"PUBLISHED_ADDRESS": address}).api_token is None
    else:
        with pytest.raises(ConfigError, match=rf"API_TOKEN .*PUBLISHED_ADDRESS is '{re.escape(address)}'"):
            load_settings({"PUBLISHED_ADDRESS": address, "API_TOKEN": "  "})


def test_without_a_published_address_no_token_is_needed() -> None:
    """Outside compose (`docker run -p`, a local run) the service cannot know where it is published."""
    settings = load_settings({})
    assert settings.published_address is None and settings.api_token is None


def test_every_setting_has_one_variable() -> None:
    names = variables()
    assert len(names) == len(set(names)) == len(fields(Settings))
    assert "GRAPHIQL_ASSETS_DIR" in names


def test_an_empty_variable_leaves_every_setting_at_its_default() -> None:
    # compose passes optional variables through as empty strings
    assert load_settings(dict.fromkeys(variables(), "")) == Settings()
    assert load_settings(dict.fromkeys(variables(), "  ")) == Settings()


def test_graphiql_assets_dir_is_a_setting() -> None:
    assert load_settings({"GRAPHIQL_ASSETS_DIR": "/opt/assets"}).graphiql_assets_dir == Path("/opt/assets")


def test_described_settings_read_back_the_same_with_secrets_masked() -> None:
    env = {
        **S3, "API_TOKEN": "tok-123", "MINIO_SECURE": "true", "MINIO_TIMEOUT": "5", "PORT": "9000",
        "SCHEDULE": "0 * * * *", "GRAPHQL_INTROSPECTION": "off", "DATA_DIR": "/srv/data", "LOG_FORMAT": "JSON",
    }  # fmt: skip
    settings = load_settings(env)
    lines = describe(settings)
    assert [line.partition("=")[0] for line in lines] == variables()
    shown = dict(line.partition("=")[::2] for line in lines)
    secrets = ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "API_TOKEN")
    assert {name: shown[name] for name in secrets} == dict.fromkeys(secrets, MASK)
    assert "s3cr3t-value" not in "\n".join(lines) and "tok-123" not in "\n".join(lines)
    read_back = load_settings(shown | {name: env[name] for name in secrets})
    assert read_back == settings
    assert dict(line.partition("=")[::2] for line in describe(Settings()))["API_TOKEN"] == ""  # unset: empty


async def test_one_constructor_for_the_aggregator(tmp_path: Path) -> None:
    settings = Settings(src_prefix="in/", output_key="out/users.csv", fetch_concurrency=2)
    store = LocalStore(tmp_path, "datalake")
    (tmp_path / "datalake" / "in").mkdir(parents=True)
    (tmp_path / "datalake" / "in" / "7.csv").write_text("first_name,last_name,birthts\nAda,Lovelace,0\n")

    aggregator = Aggregator.from_settings(store, settings)

    assert aggregator.output_key == "out/users.csv"
    assert (await aggregator.run()).report.users == 1
    assert (tmp_path / "datalake" / "out" / "users.csv").read_text().splitlines()[1] == "7,Ada,Lovelace,0,"
