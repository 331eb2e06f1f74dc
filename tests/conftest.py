"""Shared fixtures: a real S3 protocol endpoint (moto's server on 127.0.0.1) and outcome histories."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchplan.core.history import History, load_history, synthetic_history, with_holdout
from batchplan.core.settings import get_settings
from batchplan.core.storage import Storage

DATASETS = ("cascades", "routerbench", "overruling")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's threaded server on an ephemeral 127.0.0.1 port; credentials are dummies set for the session."""
    from moto.server import ThreadedMotoServer

    previous = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket per test; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_storage(s3_endpoint: str) -> Storage:
    return Storage(s3_endpoint_url=s3_endpoint, s3_region="us-east-1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(get_settings().data_dir)


@pytest.fixture(scope="session")
def real_history(data_dir: Path) -> History:
    """All bundled real histories, with a held-out test split where a data set has none.

    CI has ``../shared/data`` beside the clone; elsewhere these tests run on a synthetic history instead.
    """
    dirs = [str(data_dir / d) for d in DATASETS if (data_dir / d / "queries.parquet").exists()]
    if not dirs:
        return synthetic_history(1_500, 8, seed=1)
    return with_holdout(load_history(dirs))


@pytest.fixture(scope="session")
def small_history() -> History:
    return synthetic_history(400, 5, seed=2)
