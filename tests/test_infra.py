"""infra/ checked with what this machine can run.

- docker-compose: parsed as YAML (anchors and merge keys resolved); the Airflow 3 services, their
  healthchecks, the start-up order and the S3 bucket creation are asserted. Docker itself is not run.
- Helm values: parsed and checked for the structure the official chart expects (executor, secrets as
  environment variables, IRSA annotations), and for the absence of any static credential.
- Terraform: `terraform fmt -check`, `init` (offline from a provider mirror when one is present),
  `validate` and `terraform test` (a mocked AWS provider; asserts encryption, versioning, TLS-only
  policy, lifecycle and the web-identity role). Skipped when no terraform binary is on PATH; a text
  check of the same properties always runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"
COMPOSE = INFRA / "compose" / "docker-compose.yaml"
HELM = INFRA / "helm"
TERRAFORM = INFRA / "terraform"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
AWS_KEY_PATTERN = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_airflow3_services_postgres_and_s3(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*AIRFLOW_SERVICES, "postgres", "minio", "minio-init", "airflow-init"):
        assert name in services, name
    commands = {name: services[name]["command"] for name in AIRFLOW_SERVICES}
    assert commands == {
        "airflow-apiserver": "api-server",
        "airflow-scheduler": "scheduler",
        "airflow-dag-processor": "dag-processor",
        "airflow-triggerer": "triggerer",
    }


def test_compose_services_have_healthchecks_and_wait_for_them(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*AIRFLOW_SERVICES, "postgres", "minio"):
        check = services[name].get("healthcheck")
        assert check, name
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
    assert "db migrate" in " ".join(services["airflow-init"]["command"])
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_creates_the_bucket_and_wires_airflow_to_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services["minio-init"]["entrypoint"]
    assert "mc mb --ignore-existing local/batchplan" in init
    assert "mc version enable local/batchplan" in init
    env = services["airflow-scheduler"]["environment"]
    assert env["BATCHPLAN_BUCKET"] == "batchplan"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    conn = json.loads(
        env["AIRFLOW_CONN_BATCHPLAN_S3"]
        .replace("${MINIO_ROOT_USER:-batchplan}", "u")
        .replace("${MINIO_ROOT_PASSWORD:-batchplan-secret}", "p")
    )
    assert conn["conn_type"] == "aws"
    assert conn["extra"]["endpoint_url"] == "http://minio:9000"
    dags_mount = [v for v in services["airflow-scheduler"]["volumes"] if v.endswith(":/opt/batchplan/dags")]
    assert dags_mount == ["../../dags:/opt/batchplan/dags"]
    assert (COMPOSE.parent / "../../dags").resolve().is_dir()
    build = services["airflow-scheduler"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve().is_file()


def _helm(name: str) -> dict[str, Any]:
    return yaml.safe_load((HELM / name).read_text())


def test_helm_values_run_batchplan_on_kubernetes_with_irsa_and_secret_connections() -> None:
    values = _helm("values.yaml")
    assert values["executor"] in {"KubernetesExecutor", "CeleryExecutor", "CeleryExecutor,KubernetesExecutor"}
    assert values["airflowVersion"].startswith("3.")
    secrets = {s["envName"]: s for s in values["secret"]}
    assert set(secrets["AIRFLOW_CONN_BATCHPLAN_S3"]) == {"envName", "secretName", "secretKey"}
    assert values["postgresql"]["enabled"] is False
    assert values["data"]["metadataSecretName"]
    assert values["fernetKeySecretName"]
    assert values["dagProcessor"]["enabled"] is True
    role = "eks.amazonaws.com/role-arn"
    for component in ("workers", "triggerer", "apiServer"):
        account = values[component]["serviceAccount"]
        assert account["create"] is True
        assert account["annotations"][role].startswith("arn:aws:iam::"), component
    assert values["config"]["logging"]["remote_log_conn_id"] == "batchplan_s3"
    env = {e["name"]: e["value"] for e in values["env"]}
    assert "BATCHPLAN_BUCKET" in env


# Key paths of the official chart's values.yaml (apache/airflow chart/values.yaml at 002e5532, the chart for
# Airflow 3.0.x), read one by one for the keys these values use. The chart itself is not installable offline;
# `helm lint -f infra/helm/values.yaml` against the real schema is in infra/README.md.
CHART_KEYS = frozenset(
    {
        "executor",
        "airflowVersion",
        "defaultAirflowTag",
        "env",
        "secret",
        "fernetKeySecretName",
        "apiSecretKeySecretName",
        "jwtSecretName",
        "data",
        "data.metadataSecretName",
        "postgresql",
        "postgresql.enabled",
        "pgbouncer",
        "pgbouncer.enabled",
        "redis",
        "redis.enabled",
        "config",
        "images",
        "images.airflow",
        "images.airflow.repository",
        "images.airflow.tag",
        "images.airflow.pullPolicy",
        "dags",
        "dags.persistence",
        "dags.persistence.enabled",
        "dags.gitSync",
        "dags.gitSync.enabled",
        "dags.gitSync.repo",
        "dags.gitSync.branch",
        "dags.gitSync.subPath",
        "logs",
        "logs.persistence",
        "logs.persistence.enabled",
        "workers",
        "workers.replicas",
        "workers.resources",
        "scheduler",
        "scheduler.replicas",
        "dagProcessor",
        "dagProcessor.enabled",
        "triggerer",
        "apiServer",
    }
    | {
        f"{c}.serviceAccount{k}"
        for c in ("workers", "triggerer", "apiServer", "scheduler", "dagProcessor")
        for k in ("", ".create", ".name", ".annotations")
    }
)
# Free-form sub-trees: their keys are Airflow config sections, env items, annotations, k8s resources.
FREE_FORM = ("config.", "env", "secret", "workers.resources.", ".annotations.")


def _key_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict):
            paths.extend(_key_paths(value, f"{path}."))
    return paths


@pytest.mark.parametrize("name", ["values.yaml", "values-celery.yaml"])
def test_helm_values_use_only_keys_of_the_official_chart(name: str) -> None:
    unknown = [
        p
        for p in _key_paths(_helm(name))
        if p not in CHART_KEYS and not any(p.startswith(f) or f in p for f in FREE_FORM)
    ]
    assert unknown == [], f"{name}: keys the chart does not define: {unknown}"


def test_helm_celery_overlay_and_no_static_credentials() -> None:
    overlay = _helm("values-celery.yaml")
    assert overlay["executor"] == "CeleryExecutor"
    assert overlay["workers"]["serviceAccount"]["annotations"]
    for path in HELM.glob("*.yaml"):
        text = path.read_text()
        assert not AWS_KEY_PATTERN.search(text), path
    accounts = {_helm("values.yaml")[c]["serviceAccount"]["name"] for c in ("workers", "triggerer", "apiServer")}
    default_accounts = re.search(
        r'variable "service_accounts".*?default\s*=\s*\[(.*?)\]', (TERRAFORM / "variables.tf").read_text(), re.S
    )
    assert default_accounts
    assert accounts == set(re.findall(r'"([^"]+)"', default_accounts.group(1))), (
        "Terraform must trust the chart's accounts"
    )


def test_terraform_text_declares_the_required_controls() -> None:
    text = "\n".join(p.read_text() for p in TERRAFORM.glob("*.tf"))
    for resource in (
        "aws_s3_bucket_server_side_encryption_configuration",
        "aws_s3_bucket_versioning",
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_policy",
        "aws_s3_bucket_lifecycle_configuration",
        "aws_iam_role",
    ):
        assert f'resource "{resource}"' in text, resource
    assert '"aws:SecureTransport" = "false"' in text
    assert "sts:AssumeRoleWithWebIdentity" in text
    assert "aws_iam_access_key" not in text
    assert "aws_iam_user" not in text
    assert not AWS_KEY_PATTERN.search(text)


def _terraform(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": os.devnull}
    return subprocess.run(
        ["terraform", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
def test_terraform_fmt_validate_and_mocked_test(tmp_path: Path) -> None:
    module = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, module, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    fmt = _terraform(["fmt", "-check", "-recursive", "-no-color"], module)
    assert fmt.returncode == 0, f"terraform fmt would change: {fmt.stdout}{fmt.stderr}"
    mirror = os.environ.get("BATCHPLAN_TF_PLUGIN_DIR", "/opt/tf-plugins")
    init_args = ["init", "-backend=false", "-input=false", "-no-color"]
    if Path(mirror).is_dir():
        init_args.append(f"-plugin-dir={mirror}")
    init = _terraform(init_args, module)
    if init.returncode != 0:
        pytest.skip(f"terraform init cannot get the AWS provider here: {init.stderr[-400:]}")
    validate = _terraform(["validate", "-no-color"], module)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    result = _terraform(["test", "-no-color"], module)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed, 0 failed" in result.stdout
