"""The CLI end to end: train -> plan -> run on real data (cascades), local and on S3, and its errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from batchplan.app.cli import app
from batchplan.core.contracts import PLAN_SCHEMA, RESULT_SCHEMA
from batchplan.core.history import load_history, synthetic_history, with_holdout
from batchplan.core.storage import Storage, join
from tests.support.factories import EXAMPLE_HISTORY, write_history

runner = CliRunner()


@pytest.fixture(scope="module")
def history_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    real = data_dir / "cascades"
    if (real / "queries.parquet").exists():
        return str(real)
    return write_history(synthetic_history(600, 6, seed=4), tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def trained(history_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A predictor trained by the CLI and a queue of the held-out queries with a few bad rows appended."""
    root = tmp_path_factory.mktemp("cli")
    result = runner.invoke(app, ["train", "--history", history_dir, "--out", str(root / "models")])
    assert result.exit_code == 0, result.output
    queue = with_holdout(load_history(history_dir)).as_queue("test")
    lines = [json.dumps(r) for r in queue.to_dicts()]
    lines += [
        json.dumps({"query_id": queue["query_id"][0], "prompt": "duplicate"}),
        "{broken",
        json.dumps({"query_id": "z", "prompt": ""}),
    ]
    (root / "queue.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "models"), str(root / "queue.jsonl")


def _run(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _replayed(queue: str, models: str, history_dir: str, out: Path) -> list[str]:
    """The flags ``plan`` and ``run`` take alike here: a $0.01 budget on the replay backend."""
    return ["--queue", queue, "--predictors", models, "--budget-usd", "0.01", "--out", str(out),
            "--backend", "replay", "--replay-history", history_dir]  # fmt: skip


def test_plan_writes_one_plan_per_valid_query(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    out = tmp_path / "plan.parquet"
    _run(["plan", *_replayed(queue, models, history_dir, out)])
    plan = pl.read_parquet(out)
    assert plan.schema == PLAN_SCHEMA
    assert plan["query_id"].is_unique().all()
    assert plan["expected_cost_usd"].sum() <= 0.01 + 1e-9
    # the duplicate differs from its original: both copies are quarantined, with the broken and empty rows
    assert pl.read_parquet(tmp_path / "plan.quarantine.parquet").height == 4


def test_plan_queue_is_the_plan_commands_path_and_drops_the_prompts(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    """``pipeline.plan_queue`` is what ``batchplan plan`` runs (and bench/solver.py times, stage by stage): the
    same plan as the command, every stage reported in order, and the prompts gone once predicted (held
    through the solve, 1M all-distinct prompts peaked at 6.8 GiB)."""
    from polars.testing import assert_frame_equal

    from batchplan.app import pipeline
    from batchplan.core.request import PlanRequest

    models, queue = trained
    out = tmp_path / "plan.parquet"
    _run(["plan", "--queue", queue, "--predictors", models, "--budget-usd", "0.01", "--out", str(out)])
    stages: list[str] = []
    seen: list[int] = []
    planned = pipeline.plan_queue(
        queue, Storage(), models, PlanRequest(budget_usd=0.01), on_ingested=lambda i: seen.append(i.quarantine.height),
        lap=stages.append,
    )
    assert stages == list(pipeline.PLAN_STAGES)
    assert seen == [4]
    assert "prompt" not in planned.ingested.queue.columns
    assert planned.ingested.queue.height == planned.outcome.plan.height
    assert_frame_equal(planned.outcome.plan, pl.read_parquet(out))


def test_run_replays_within_budget_and_resumes(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    out = tmp_path / "run"
    args = ["run", *_replayed(queue, models, history_dir, out)]
    output = _run(args)
    assert "oracle" in output
    assert (out / "rounds" / "3" / "observations.parquet").exists()  # the default: 3 rounds of the plan
    assert f"quarantined 4 rows -> {out / 'quarantine.parquet'}" in output.replace("\n", "")
    results = pl.read_parquet(out / "results.parquet")
    assert results.schema == RESULT_SCHEMA
    report = json.loads((out / "report.json").read_text())
    assert report["spent_usd"] <= 0.01 + 1e-12
    assert report["quarantined"] == 4
    assert report["queries"] == results.height
    assert report["accuracy"] is not None
    assert (out / "report.html").exists()
    assert report["frontier"]  # planned beside the plan, drawn by the report
    assert (out / "plan.frontier.json").exists()
    assert (out / "report.html").read_text().count("<svg") == 3
    # Running the same command again pays nothing more.
    _run(args)
    again = json.loads((out / "report.json").read_text())
    assert again["spent_usd"] == pytest.approx(report["spent_usd"])
    # (a deferred query is retried; its message may word the remaining budget differently)
    columns = ["query_id", "answer", "models_called", "cost_usd", "status"]
    rerun = pl.read_parquet(out / "results.parquet").select(columns).sort("query_id")
    assert rerun.equals(results.select(columns).sort("query_id"))
    # Another budget into the same run would be reported but not enforced (the stored plan stands): refused.
    changed = runner.invoke(app, [*args[:6], "0.5", *args[7:]])
    assert changed.exit_code == 2, changed.output
    message = " ".join(changed.output.split())
    assert "was planned for another request (budget_usd: 0.01 -> 0.5)" in message
    assert "write this run to a new --out directory" in message
    assert json.loads((out / "report.json").read_text())["budget_usd"] == 0.01


def test_run_holds_each_tenant_to_its_budget(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    out = tmp_path / "run"
    tenant = load_history(history_dir).queries["dataset"][0]  # the queue's tenant: its data set
    common = ["--predictors", models, "--backend", "replay", "--replay-history", history_dir, "--out", str(out)]
    # single shot: its one dispatcher manifest holds the tenant caps
    _run(["run", "--queue", queue, "--budget-usd", "0.01", "--tenant-budget", f"{tenant}=0.004", "--rounds", "1", *common])
    manifest = json.loads((out / "dispatch" / "manifest.json").read_text())
    assert manifest["tenant_budgets_usd"] == {tenant: 0.004}
    assert 0 < manifest["tenant_spent_usd"][tenant] <= 0.004
    assert json.loads((out / "report.json").read_text())["spent_usd"] <= 0.004 + 1e-12


def test_run_on_s3(
    trained: tuple[str, str], history_dir: str, s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchplan.core.settings import get_settings

    monkeypatch.setenv("BATCHPLAN_S3_ENDPOINT_URL", s3_endpoint)
    get_settings.cache_clear()
    storage = Storage(s3_endpoint_url=s3_endpoint)
    models, queue = trained
    queue_uri = join(s3_bucket, "queue", "2026-11-22", "part-0.jsonl")
    storage.write_bytes(queue_uri, Path(queue).read_bytes())
    out = join(s3_bucket, "results", "run-1")
    try:
        _run(
            [
                "run",
                "--queue",
                join(s3_bucket, "queue", "2026-11-22"),
                "--predictors",
                models,
                "--budget-usd",
                "0.02",
                "--backend",
                "replay",
                "--replay-history",
                history_dir,
                "--out",
                out,
            ]
        )
    finally:
        get_settings.cache_clear()
    report = json.loads(storage.read_text(join(out, "report.json")))
    assert report["spent_usd"] <= 0.02 + 1e-12
    assert storage.read_frame(join(out, "results.parquet")).height == report["queries"]
    assert storage.exists(join(out, "quarantine.parquet"))


def _error_line(args: list[str]) -> str:
    """Run the CLI; it must fail with exit code 2 and one line ``error: ...`` as its last, no traceback."""
    result = runner.invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], result.output
    return lines[-1]


def test_infeasible_budget_is_one_clear_line(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    models, queue = trained
    replay = ["--backend", "replay", "--replay-history", history_dir]
    line = _error_line(
        ["plan", "--queue", queue, "--predictors", models, "--budget-usd", "0.0000001", "--out", str(tmp_path / "p.parquet"), *replay]
    )
    assert re.fullmatch(
        r"error: --budget-usd 0\.0000001 cannot answer all \d+ queries: at least \$0\.\d+ is needed, "
        r"or pass --allow-deferral",
        line,
    ), line
    assert not (tmp_path / "p.parquet").exists()
    # the suggested minimum is enough
    need = re.search(r"at least \$([\d.]+)", line)
    assert need is not None
    _run(["plan", "--queue", queue, "--predictors", models, "--budget-usd", need[1], "--out", str(tmp_path / "p.parquet"), *replay])


def test_missing_budget_and_target_is_refused(trained: tuple[str, str], tmp_path: Path) -> None:
    models, queue = trained
    line = _error_line(["plan", "--queue", queue, "--predictors", models, "--out", str(tmp_path / "p.parquet")])
    assert "--budget-usd" in line
    assert "--accuracy-target" in line


def test_a_constraint_naming_what_the_batch_lacks_exits_2(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    models, queue = trained
    tenant = load_history(history_dir).queries["dataset"][0]
    common = ["--queue", queue, "--predictors", models, "--budget-usd", "0.01", "--backend", "replay"]
    common += ["--replay-history", history_dir]
    typos = ["--tenant-budget", f"{tenant}x=0.5", "--max-calls", "gpt-5=10", "--task-floor", "mbbp=0.5"]
    result = runner.invoke(app, ["plan", *common, *typos, "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"tenant budget: tenant '{tenant}x' is not in this batch (tenants, closest first: '{tenant}')" in message
    assert "max calls: model 'gpt-5' is not in this batch" in message
    assert "task floor: task 'mbbp' is not in this batch" in message
    assert not (tmp_path / "p.parquet").exists()
    # opted in (a config naming every tenant): it runs, and the report lists what bound nothing
    out = tmp_path / "run"
    _run(["run", *common, "--tenant-budget", "acme=0.5", "--allow-unused-constraints", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["unused_constraints"] == ["tenant budget: tenant 'acme' is not in this batch"]
    assert "Constraint that bound nothing: tenant budget: tenant 'acme'" in (out / "report.md").read_text()
    assert "Constraint that bound nothing" in (out / "report.html").read_text()


def test_queries_the_replay_history_cannot_answer_fail_and_the_rest_run(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    models, queue = trained
    rows = Path(queue).read_text().splitlines()
    unknown = [
        json.dumps({"query_id": f"new-{i}", "prompt": f"a question nobody recorded {i}", "task": "mmlu2"})
        for i in range(2)
    ]
    (tmp_path / "queue.jsonl").write_text("\n".join([*rows, *unknown]) + "\n")
    out = tmp_path / "run"
    common = ["--predictors", models, "--budget-usd", "0.01", "--backend", "replay", "--replay-history", history_dir]
    _run(["run", "--queue", str(tmp_path / "queue.jsonl"), *common, "--out", str(out)])
    results = pl.read_parquet(out / "results.parquet")
    failed = results.filter(pl.col("query_id").str.starts_with("new-"))
    assert failed["status"].to_list() == ["failed", "failed"]
    assert set(failed["error"].to_list()) == {
        "no LLM the backend offers can answer this query: the replay history has no outcome for it"
    }
    report = json.loads((out / "report.json").read_text())
    assert report["status"]["failed"] >= 2
    assert report["status"]["done"] > 0
    # a task the predictor never saw is named, not guessed at silently
    assert report["unseen_tasks"] == ["mmlu2"]
    assert "Tasks the predictor never saw: mmlu2" in (out / "report.md").read_text()
    planned = " ".join(
        _run(["plan", "--queue", str(tmp_path / "queue.jsonl"), *common, "--out", str(tmp_path / "p.parquet")]).split()
    )
    assert "note: 2 queries no offered model can answer (plan kind 'unanswerable')" in planned
    assert "note: Tasks the predictor never saw: mmlu2" in planned


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--budget-usd", "-1"], "error: --budget-usd must be >= 0, got -1"),
        (["--budget-usd", "1", "--accuracy-target", "1.5"], "error: --accuracy-target must be in (0, 1], got 1.5"),
        (["--budget-usd", "1", "--kinds", "vote"], "error: --kinds must include 'single'"),
        (["--budget-usd", "1", "--plans", "vote"], "error: --kinds must include 'single'"),  # the old name
        (
            ["--budget-usd", "1", "--backend", "openia"],
            "error: unknown --backend 'openia': the known backends are openai, replay, bedrock",
        ),
        (["--budget-usd", "1", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"], "error: the openai backend needs --prices"),
        (
            ["--budget-usd", "1", "--backend", "openai", "--prices", "PRICES"],
            "error: the openai backend needs --base-url",
        ),
        (["--budget-usd", "1"], "error: the replay backend needs --replay-history"),
        (["--budget-usd", "abc"], "error: Invalid value for '--budget-usd'"),
    ],
)
def test_flag_errors_are_one_line_naming_the_flag(
    flags: list[str], expected: str, history_dir: str, tmp_path: Path
) -> None:
    flags = [str(Path(history_dir) / "models.csv") if f == "PRICES" else f for f in flags]
    line = _error_line(["run", "--queue", "q.jsonl", "--predictors", "models", "--out", str(tmp_path / "r"), *flags])
    assert line.startswith(expected), line
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_flag_error_comes_before_the_heavy_imports() -> None:
    """A mistyped flag is answered at once: nothing heavy (polars, LightGBM, the solvers) is imported first."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from batchplan.app.cli import app\n"
        "for flags in (['--budget-usd', '-1'], ['--budget-usd', '1', '--backend', 'openia'], ['--budget-usd', 'x'],\n"
        "              ['--budget-usd', '1', '--backend', 'openai'], ['--budget-usd', '1']):\n"
        "    result = CliRunner().invoke(app, ['run', '--queue', 'q', '--predictors', 'm', '--out', 'o', *flags])\n"
        "    assert result.exit_code == 2, result.output\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'polars', 'numpy', 'lightgbm', 'cvxpy'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_version_and_examples_in_help() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"batchplan {version('batchplan')}"
    for command in ("train", "plan", "run", "demo", "show-report"):
        shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert f"Example: batchplan {command}" in shown, shown
        assert "<bool>" not in shown, shown  # flags take no value
    shown = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "One of --budget-usd / --accuracy-target is required" in shown
    assert "CURRENT.json" in shown  # --predictor-version: the promoted version, else the newest


def _flags(command: str) -> set[str]:
    shown = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
    return set(re.findall(r"--[a-z][a-z-]*", shown))


def test_renamed_flags_are_shown_under_their_new_names_only() -> None:
    for command in ("plan", "run"):
        flags = _flags(command)
        assert {"--predictors", "--kinds", "--predictor-version"} <= flags
        assert not {"--model", "--plans", "--model-version"} & flags
    flags = _flags("train")
    assert {"--templates", "--no-templates", "--predictor"} <= flags
    assert not {"--plans", "--no-plans"} & flags
    # the errors' field -> flag map names flags the commands have, under their current names
    from batchplan.app.cli import FLAGS

    assert set(FLAGS.values()) <= _flags("train") | _flags("plan") | _flags("run")


def test_old_flag_spellings_still_work(trained: tuple[str, str], history_dir: str, tmp_path: Path) -> None:
    """``--model``/``--plans``/``--model-version`` (plan, run) and ``train --plans/--no-plans``, renamed to the glossary, for a release."""
    models, queue = trained
    replay = ["--backend", "replay", "--replay-history", history_dir, "--budget-usd", "0.01"]
    for i, old in enumerate((["--model", models, "--plans", "single"], [f"--model={models}", "--plans=single"])):
        out = tmp_path / f"plan{i}.parquet"
        result = runner.invoke(app, ["plan", "--queue", queue, *old, *replay, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "note: --model is now --predictors" in result.output
        assert set(pl.read_parquet(out)["kind"]) <= {"single", "defer", "unanswerable"}
    from batchplan.app import artifacts

    version = artifacts.load(Storage(), models).predictor.metadata["version"]
    base = ["plan", "--queue", queue, "--predictors", models, *replay, "--out", str(tmp_path / "v.parquet")]
    result = runner.invoke(app, [*base, "--model-version", version])
    assert result.exit_code == 0, result.output
    assert "note: --model-version is now --predictor-version" in result.output
    result = runner.invoke(app, [*base, "--model-version", "v0"])
    assert result.exit_code == 2
    assert "no predictor version 'v0'" in result.output, result.output
    assert "--predictor-version" in result.output, result.output
    root = tmp_path / "registry"
    for flag in ("--no-plans", "--no-templates"):
        shown = _run(["train", "--history", history_dir, "--out", str(root), "--predictor", "prior", flag])
        assert " 0 vote/cascade templates" in " ".join(shown.split()), shown


def test_templates_json_is_written_and_an_old_plans_json_still_read(trained: tuple[str, str], tmp_path: Path) -> None:
    from batchplan.app import artifacts

    models, _ = trained
    version = artifacts.load(Storage(), models).predictor.metadata["version"]
    written = Path(models) / str(version)
    assert (written / artifacts.TEMPLATES_FILE).exists()
    assert not (written / artifacts.OLD_TEMPLATES_FILE).exists()
    templates = artifacts.load_templates(Storage(), models, str(version))
    assert templates.templates  # the cascades history has templates worth offering
    # a version trained before the rename keeps its templates in plans.json
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / artifacts.OLD_TEMPLATES_FILE).write_text((written / artifacts.TEMPLATES_FILE).read_text())
    assert artifacts.load_templates(Storage(), str(tmp_path), "old").to_json() == templates.to_json()
    assert not artifacts.load_templates(Storage(), str(tmp_path), "missing").templates


def _show_report_on_s3(endpoint: str, run: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``batchplan show-report <run>`` with ``BATCHPLAN_S3_ENDPOINT_URL=endpoint``: its one error line."""
    from batchplan.core.settings import get_settings

    monkeypatch.setenv("BATCHPLAN_S3_ENDPOINT_URL", endpoint)
    get_settings.cache_clear()
    try:
        return _error_line(["show-report", run])
    finally:
        get_settings.cache_clear()


def test_s3_without_credentials_is_one_line(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the credentials earlier tests found
    line = _show_report_on_s3(s3_endpoint, "s3://bucket/runs/r1", monkeypatch)
    assert line.startswith(
        "error: no AWS credentials to read or write s3://bucket/runs/r1/report.md: set AWS_ACCESS_KEY_ID"
    ), line


def test_s3_with_a_dead_endpoint_is_one_line(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{free.getsockname()[1]}"
    line = _show_report_on_s3(dead, "s3://bucket/runs/r1", monkeypatch)
    assert line.startswith(f"error: cannot reach the S3 endpoint {dead} for s3://bucket/runs/r1/report.md"), line


def test_s3_missing_bucket_is_one_line(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    line = _show_report_on_s3(s3_endpoint, "s3://no-such-bucket/runs/r1", monkeypatch)
    assert line.startswith("error: no such bucket: s3://no-such-bucket"), line


def test_a_run_held_by_another_process_is_one_line(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    models, queue = trained
    out = tmp_path / "run"
    lock = out / "dispatch" / "lock.json"
    lock.parent.mkdir(parents=True)
    holder = {"writer": "other", "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
    lock.write_text(json.dumps(holder))
    line = _error_line(
        ["run", "--queue", queue, "--predictors", models, "--budget-usd", "0.01", "--replay-history", history_dir, "--out", str(out), "--rounds", "1"]
    )  # single shot: its ledger is <out>/dispatch (each round's is <out>/rounds/<k>/dispatch)
    assert line.startswith(f"error: {out / 'dispatch'} is being dispatched by pid {os.getpid()}"), line
    assert json.loads(lock.read_text()) == holder  # the holder's lease is left alone


ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_examples_are_shipped_and_ignored_outputs() -> None:
    """The README's command lines use examples/queue.jsonl (20 valid rows from the test split of the shipped
    synthetic history), and git ignores every output they (and the demo, and dags/README's Airflow home)
    tell a user to create."""
    from batchplan.app.ingest import read_queue

    readme = (ROOT / "README.md").read_text()
    assert "--queue examples/queue.jsonl" in readme
    assert "--replay-history examples/history" in readme
    assert ".batchplan/demo/run/report.html" in readme  # where the demo's report really is
    ingested = read_queue(str(ROOT / "examples" / "queue.jsonl"), Storage())
    assert ingested.queue.height == 20
    assert ingested.quarantine.height == 0
    history = load_history(str(EXAMPLE_HISTORY))
    test_ids = set(history.split("test").queries["query_id"].to_list())
    assert set(ingested.queue["query_id"].to_list()) <= test_ids  # train never sees them
    assert set(ingested.queue["query_id"].to_list()) <= set(history.outcomes["query_id"].to_list())
    created = [*re.findall(r"--out (\S+)", readme), ".batchplan/demo/run/report.html", ".airflow/airflow.db"]
    assert {"models/", "runs/r1", "runs/plan.parquet"} <= set(created)
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *created], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert sorted(ignored.stdout.split()) == sorted(created), ignored.stdout


def test_run_in_rounds_writes_each_round_and_reports_its_estimate(
    trained: tuple[str, str], history_dir: str, tmp_path: Path
) -> None:
    models, queue = trained
    out = tmp_path / "run"
    base = ["run", "--queue", queue, "--model", models, "--budget-usd", "0.01", "--backend", "replay"]
    args = [*base, "--replay-history", history_dir, "--out", str(out), "--rounds", "3"]
    output = _run(args)
    assert "estimated after the run" in output
    report = json.loads((out / "report.json").read_text())
    assert 0.0 < report["estimated_accuracy"] <= 1.0
    assert report["spent_usd"] <= 0.01 + 1e-12
    assert (out / "rounds" / "1" / "calls.parquet").exists()
    assert (out / "rounds" / "3" / "observations.parquet").exists()
    assert not (out / "dispatch").exists()  # the rounds' own ledgers, not the single-shot one
    # the report reads the rounds' ledgers: spend per LLM sums to the spend, calls per LLM, one line per round
    assert report["spend_per_model"]
    assert sum(r["spent_usd"] for r in report["spend_per_model"]) == pytest.approx(report["spent_usd"])
    assert sum(r["calls"] for r in report["spend_per_model"]) >= report["status"]["done"]
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert sum(r["charged_usd"] for r in report["rounds"]) == pytest.approx(report["spent_usd"])
    assert "## Rounds" in (out / "report.md").read_text()
    results = pl.read_parquet(out / "results.parquet")
    assert results.schema == RESULT_SCHEMA
    assert report["queries"] == results.height
    # bad flags: one line, exit 2, nothing sent
    bad = runner.invoke(app, [*base, "--replay-history", history_dir, "--out", str(tmp_path / "x"), "--rounds", "0"])
    assert bad.exit_code == 2
    unknown = [*base, "--replay-history", history_dir, "--out", str(tmp_path / "y"), "--rounds", "2"]
    bad = runner.invoke(app, [*unknown, "--round-planner", "oracle"])
    assert bad.exit_code == 2
    assert "--round-planner 'oracle'" in bad.output
    assert not (tmp_path / "y" / "rounds").exists()
