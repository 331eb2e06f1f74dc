"""One interface over local paths and ``s3://bucket/key`` URIs.

Everything the job reads or writes goes through here, so the same job runs on a laptop directory and on
S3. Writes are atomic (local: temp file + rename; S3: a PUT is atomic per object). ``put_if_absent`` is
the primitive for locks and exactly-once markers (S3 conditional write ``If-None-Match: *``).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from batchplan.core.errors import UserError


class StorageError(UserError, RuntimeError):
    """A file or object cannot be read or written: missing, unreachable, refused. The message says which and why."""


class NotFound(StorageError):
    """No such file or object: the one storage error that callers may take as 'not written yet'."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with '/', whatever the backend."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"not an s3 URI with a bucket: {uri!r}")
    return bucket, key


class Backend(Protocol):
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def put_if_absent(self, uri: str, data: bytes) -> bool: ...
    def exists(self, uri: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, uri: str) -> None: ...


class LocalBackend:
    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError as error:
            raise NotFound(f"no such file: {uri}") from error

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def list(self, prefix: str) -> list[str]:
        root = Path(prefix)
        if root.is_file():
            return [str(root)]
        if not root.exists():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)


class S3Backend:
    """boto3 client; endpoint from ``endpoint_url`` or the standard ``AWS_ENDPOINT_URL``/credential chain."""

    def __init__(self, endpoint_url: str | None = None, region_name: str | None = None, client: Any = None) -> None:
        if client is None:
            import boto3

            region = region_name or os.environ.get("AWS_DEFAULT_REGION")
            client = boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region)
        self._client: Any = client

    @contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """botocore's errors as one line each, saying what to fix: credentials, endpoint, bucket, key."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        endpoint = self._client.meta.endpoint_url
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as error:
            raise StorageError(
                f"no AWS credentials to read or write {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) in the environment"
            ) from error
        except BotoConnectionError as error:
            raise StorageError(
                f"cannot reach the S3 endpoint {endpoint} for {uri} ({type(error).__name__}): is it running? "
                "(set BATCHPLAN_S3_ENDPOINT_URL for MinIO or moto)"
            ) from error
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise NotFound(f"no such object: {uri}") from error
            if code == "NoSuchBucket":
                raise StorageError(f"no such bucket: s3://{split_s3(uri)[0]} (at {endpoint}), for {uri}") from error
            if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}:
                raise StorageError(f"S3 refused access to {uri} ({code}): check the AWS credentials") from error
            message = error.response.get("Error", {}).get("Message", "")
            raise StorageError(f"S3 error on {uri} at {endpoint}: {code} {message}".rstrip()) from error
        except BotoCoreError as error:
            raise StorageError(f"S3 error on {uri} at {endpoint}: {error}") from error

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        with self._errors(uri):
            return bytes(self._client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        with self._errors(uri):
            self._client.put_object(Bucket=bucket, Key=key, Body=data)

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        with self._errors(uri):
            try:
                self._client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in {"PreconditionFailed", "ConditionalRequestConflict"}:
                    return False
                raise
        return True

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            with self._errors(uri):
                self._client.head_object(Bucket=bucket, Key=key)
        except NotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        bucket, key = split_s3(prefix)
        keys: list[str] = []
        with self._errors(prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(f"s3://{bucket}/{k}" for k in keys if not k.rsplit("/", 1)[-1].startswith("."))

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        with self._errors(uri):
            self._client.delete_object(Bucket=bucket, Key=key)


@dataclass
class Storage:
    """Routes each URI to its backend and reads/writes frames in parquet, jsonl, csv or json."""

    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_client: Any = None  # a ready boto3 S3 client (e.g. from an Airflow connection); else one is made

    def __post_init__(self) -> None:
        self._local = LocalBackend()
        self._s3: S3Backend | None = None

    def backend(self, uri: str) -> Backend:
        if is_s3(uri):
            if self._s3 is None:
                self._s3 = S3Backend(self.s3_endpoint_url, self.s3_region, client=self.s3_client)
            return self._s3
        return self._local

    def read_bytes(self, uri: str) -> bytes:
        return self.backend(uri).read_bytes(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        self.backend(uri).write_bytes(uri, data)

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        return self.backend(uri).put_if_absent(uri, data)

    def exists(self, uri: str) -> bool:
        return self.backend(uri).exists(uri)

    def list(self, prefix: str) -> list[str]:
        return self.backend(prefix).list(prefix)

    def delete(self, uri: str) -> None:
        self.backend(uri).delete(uri)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode()

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode())

    def read_frame(self, uri: str) -> pl.DataFrame:
        """Read one file, or every parquet/jsonl part under a directory/prefix, into one frame."""
        files = [uri] if _format(uri) else [u for u in self.list(uri) if _format(u) in {"parquet", "jsonl"}]
        if not files:
            raise StorageError(f"no parquet or jsonl data at {uri}")
        frames = [_decode(self.read_bytes(f), f) for f in files]
        return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]

    def write_frame(self, frame: pl.DataFrame, uri: str) -> None:
        self.write_bytes(uri, _encode(frame, uri))

    def iter_parts(self, prefix: str, suffix: str = ".parquet") -> Iterator[str]:
        yield from (u for u in self.list(prefix) if u.endswith(suffix))


def _format(uri: str) -> str | None:
    name = uri.rsplit("/", 1)[-1].lower()
    for ext, fmt in (
        (".parquet", "parquet"),
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".csv", "csv"),
        (".json", "json"),
    ):
        if name.endswith(ext):
            return fmt
    return None


def _decode(data: bytes, uri: str) -> pl.DataFrame:
    fmt = _format(uri)
    buffer = io.BytesIO(data)
    if fmt == "parquet":
        return pl.read_parquet(buffer)
    if fmt == "jsonl":
        return pl.read_ndjson(buffer, infer_schema_length=None) if data.strip() else pl.DataFrame()
    if fmt == "csv":
        return pl.read_csv(buffer)
    if fmt == "json":
        return pl.read_json(buffer)
    raise StorageError(f"unknown file format for {uri!r}: use .parquet, .jsonl, .csv or .json")


def _encode(frame: pl.DataFrame, uri: str) -> bytes:
    fmt = _format(uri)
    buffer = io.BytesIO()
    if fmt == "parquet":
        frame.write_parquet(buffer)
    elif fmt == "jsonl":
        frame.write_ndjson(buffer)
    elif fmt == "csv":
        frame.write_csv(buffer)
    elif fmt == "json":
        frame.write_json(buffer)
    else:
        raise StorageError(f"unknown file format for {uri!r}: use .parquet, .jsonl, .csv or .json")
    return buffer.getvalue()
