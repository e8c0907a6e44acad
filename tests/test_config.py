"""Settings from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import DEFAULT_FETCH_CONCURRENCY, DEFAULT_MAX_IMAGE_BYTES, Settings, load_settings
from service.errors import ConfigError

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
    assert not settings.uses_minio


def test_minio_settings_and_secrets_hidden() -> None:
    settings = load_settings({**S3, "MINIO_SECURE": "true", "API_TOKEN": "tok-123", "SRC_PREFIX": "in"})
    assert settings.uses_minio and settings.minio_secure
    assert settings.src_prefix == "in/"
    assert "s3cr3t-value" not in repr(settings) and "tok-123" not in repr(settings)


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
        ({"SCHEDULE": "every minute"}, "SCHEDULE"),
        ({"MAX_IMAGE_BYTES": "20M"}, "MAX_IMAGE_BYTES"),
        ({"MAX_IMAGE_BYTES": "0"}, "MAX_IMAGE_BYTES"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        load_settings(env)
    assert "s3cr3t-value" not in str(caught.value)


def test_max_image_bytes() -> None:
    assert load_settings({"MAX_IMAGE_BYTES": "1048576"}).max_image_bytes == 1024 * 1024
