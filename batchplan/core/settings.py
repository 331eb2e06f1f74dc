"""Settings from the environment (``BATCHPLAN_*``); every field has an embedded default.

Secrets (API keys, AWS credentials) are never settings: they come from the environment the providers'
own clients read, or from Airflow connections, and are never logged.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # batchplan/core/settings.py -> the checkout


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATCHPLAN_", extra="ignore")

    data_dir: str = Field(
        default=str(PROJECT_ROOT.parent / "shared" / "data"),
        description="Outcome histories (one sub-directory per data set); default ../shared/data beside the checkout.",
    )
    work_dir: str = Field(default=str(PROJECT_ROOT / ".batchplan"), description="Local root for demo runs.")
    root: str | None = Field(
        default=None,
        description="Root of the bucket layout (s3://bucket/prefix or a local directory); overrides bucket and prefix.",
    )
    bucket: str = Field(
        default="batchplan", description="The batchplan bucket (the DAGs' layout root is s3://bucket/prefix)."
    )
    prefix: str = Field(default="", description="Key prefix inside the bucket for every batchplan path.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (moto, MinIO); None = AWS.")
    s3_region: str | None = None
    seed: int = 0
    max_prompt_chars: int = Field(
        default=100_000,
        description="Longest prompt + system prompt (characters) ingest accepts; longer rows are quarantined "
        "before anything is paid (a pasted file, not a question). The real histories' longest is ~2,900.",
    )
    bedrock_batch_uri: str | None = Field(
        default=None,
        description="s3://bucket/prefix where Bedrock batch jobs read their JSONL input and write their output.",
    )
    bedrock_batch_role_arn: str | None = Field(
        default=None, description="The IAM service role Bedrock batch jobs run as (reads and writes that prefix)."
    )
    bedrock_batch_min_records: int = Field(
        default=100,
        ge=1,
        description="Records a Bedrock batch job needs at least (per LLM): the account's service quota, 100 by "
        "default. The planner prices no batch call for an LLM below it, and the sender sends such calls in real time.",
    )
    holdout_fraction: float = Field(
        default=0.3, description="Share of a train-only data set held out as its test split (by query_id hash)."
    )
    batch_poll_s: float = Field(
        default=30.0, gt=0, description="Seconds between status requests for an open provider batch job (--batch-api)."
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
